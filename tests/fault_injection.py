"""Trainer runs in forked processes: the tests' single-rank runs (tests/helpers.py `run`) and, for
tests/test_faults.py, runs that fail on purpose.

Each run is a fresh process forked from a server that imported the trainer once (multiprocessing's 'forkserver'),
so a case costs its training, not the imports (~6 s of each `python -m prdp_ds.train`). In the child, `_install`
wraps the function each PHASE runs through, counting entries; at the chosen entry of the chosen phase the fault
fires: 'kill' starts a timer thread that SIGKILLs the process `delay` seconds later (so the kill lands inside that
phase or just after it), 'enospc' raises OSError(ENOSPC) there, as a full disk would. A run without a fault is
`python -m prdp_ds.train` but for the imports: the exit code, stdout and stderr are the same (an error message ends
the run with code 1, as it does there).
"""

import collections
import errno
import functools
import json
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path

PHASES = ("sampling", "reward", "pass1", "pass2", "optimizer", "checkpoint")
_context = None


class _CountedReward:
    """A reward function that reports each call to `hit` ('reward'); everything else is the wrapped one's."""

    def __init__(self, fn, hit):
        self.fn, self.hit = fn, hit

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        self.hit("reward")
        return self.fn(*args, **kwargs)


def _install(fault, counts):
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from prdp_ds import train, twopass

    def hit(phase):
        counts[phase] += 1
        if fault is None or fault["phase"] != phase or counts[phase] != fault["at"]:
            return
        if fault["action"] == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{phase} write {counts[phase]}>")
        threading.Timer(fault["delay"], os.kill, (os.getpid(), signal.SIGKILL)).start()

    def wrap(owner, name, phase):
        real = getattr(owner, name)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            hit(phase)
            return real(*args, **kwargs)

        setattr(owner, name, counted)

    wrap(train, "sample", "sampling")
    wrap(train, "policy_log_ratios", "pass1")  # the log-ratio noise pass
    wrap(twopass, "policy_log_ratios", "pass1")  # pass 1 of steps 2..K
    wrap(DeepSpeedEngine, "backward", "pass2")
    wrap(DeepSpeedEngine, "step", "optimizer")
    wrap(TorchCheckpointEngine, "save", "checkpoint")
    build_reward = train.build_reward
    train.build_reward = lambda *args, **kwargs: _CountedReward(build_reward(*args, **kwargs), hit)


def _child(argv, fault, counts_file, out_file, err_file, threads, cwd):
    import torch

    from prdp_ds import train

    for fd, name in ((1, out_file), (2, err_file)):  # the server's stdout and stderr are its starter's: use files
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    if threads:
        torch.set_num_threads(threads)
    if cwd:
        os.chdir(cwd)
    with socket.socket() as s:  # the server's environment may name a port an in-process run of the parent held
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    counts = collections.Counter()
    _install(fault, counts)
    try:
        train.main(argv)
    finally:
        if counts_file:
            Path(counts_file).write_text(json.dumps(counts))


def _fork(argv, fault, counts_file, timeout, threads, cwd, merged):
    """The child's exit code, stdout and stderr; merged: both in the first text, as written, and '' in the second."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["prdp_ds.train", "deepspeed", "fault_injection"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stdout"
        err = out if merged else Path(tmp) / "stderr"
        args = (list(argv), fault, counts_file and str(counts_file), str(out), str(err), threads, cwd and str(cwd))
        proc = _context.Process(target=_child, args=args)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            raise TimeoutError(f"prdp_ds.train {' '.join(argv)} ran past {timeout} s")
        read = lambda path: path.read_text() if path.exists() else ""  # noqa: E731
        return proc.exitcode, read(out), "" if merged else read(err)


def run(argv, fault=None, counts_file=None, timeout=600):
    """`prdp_ds.train.main(argv)` in a forked process -> (its exit code (-9: killed), its stdout and stderr as one
    text). fault: None or {'phase': one of PHASES, 'at': the entry (1-based) that fires, 'action': 'kill' or 'enospc',
    'delay': seconds}. counts_file: where the child writes its entries per phase (when it is not killed)."""
    code, log, _ = _fork(argv, fault, counts_file, timeout, None, None, merged=True)
    return code, log


def run_train(argv, threads=None, cwd=None, timeout=900):
    """`python -m prdp_ds.train ARGV` as a forked process -> (exit code, stdout, stderr). threads: torch's
    intra-op threads (OMP_NUM_THREADS for a fresh process); cwd: the directory it runs in."""
    return _fork(argv, None, None, timeout, threads, cwd, merged=False)
