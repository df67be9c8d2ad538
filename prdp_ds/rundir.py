"""The run directory belongs to one run: a lock while training, no silent overwrite, resumes that honour or refuse.

`claim` runs on rank 0 before anything is built or written (other ranks receive its answer, `agree`):

- OUTPUT_DIR is created; a path that cannot be created or written is an error naming it and the cause.
- OUTPUT_DIR/.lock is locked (fcntl.flock: released by the kernel when the process ends, kill -9 included, so a
  crashed run leaves no stale lock) and holds the holder's pid, host and start time; a second trainer on the same
  directory is refused, naming them. (flock is local to one machine, or NFS v4 clients.)
- Without --resume, a directory holding anything but the lock is refused (it holds another run), unless --restart:
  that moves the old contents to OUTPUT_DIR.replaced-<UTC time> beside it; nothing is deleted.
- With --resume, the checkpoint's config.yaml is compared with this run's (config.resume_changes): changed keys that
  define what is computed are refused, all listed in one message; the others (config.RESUME_CHANGEABLE: learning
  rate, epochs, cadence, memory and speed options) take effect and `record_changes` appends them to
  OUTPUT_DIR/config_history.jsonl, from which epoch and step they apply. config.yaml keeps the config the run
  started with: it is never rewritten to describe epochs it did not govern.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

import torch.distributed as dist

from prdp_ds import config as config_lib
from prdp_ds.checkpoint import find_checkpoint

LOCK = ".lock"
HISTORY = "config_history.jsonl"


class RunDirError(Exception):
    """The run directory cannot be used as asked (held by another trainer, holds another run, unwritable, or a
    resume would change what the run computes). One line (or one line per key) the user acts on."""


@dataclasses.dataclass
class Claim:
    checkpoint: Path | None  # the checkpoint to resume from (None: a fresh start)
    changes: dict  # key -> (checkpoint's value, this run's value): the RESUME_CHANGEABLE keys this resume changes
    notes: list  # what the claim did or found, for rank 0 to print (moved aside, no checkpoint to resume, ...)
    lock_fd: int | None = None  # rank 0's open lock file (the lock lives as long as it stays open)
    pid: int = dataclasses.field(default_factory=os.getpid)

    def release(self):
        if self.lock_fd is not None and self.pid == os.getpid():
            os.close(self.lock_fd)
            self.lock_fd = None


def _lock(out):
    """Lock OUTPUT_DIR/.lock for this process -> its fd; RunDirError naming the holder when another has it."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"--output-dir {out}: cannot write {path}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on host {h['host']}, running since {h['since']}"
        except (ValueError, KeyError, TypeError):
            who = f"a process whose lock file reads {holder!r}"
        raise RunDirError(
            f"--output-dir {out} is in use by another trainer ({who}; lock {path}): wait for it to end, or give "
            "another --output-dir"
        ) from None
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
    return fd


def _move_aside(out):
    """Move everything in OUTPUT_DIR but the lock to a new sibling folder -> that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    aside.mkdir()
    for entry in out.iterdir():
        if entry.name != LOCK:
            os.replace(entry, aside / entry.name)
    return aside


def _saved_config(ckpt):
    path = ckpt / "config.yaml"
    try:
        return config_lib.from_dict(config_lib.load_yaml(path))
    except config_lib.ConfigError as err:
        raise RunDirError(f"--resume {ckpt}: its config.yaml cannot be read as a training config: {err}") from None


def claim(output_dir, cfg, resume=None, restart=False):
    """Rank 0's checks and lock for a run of `cfg` in `output_dir` (module docstring) -> Claim; RunDirError."""
    out = Path(output_dir)
    if resume and restart:
        raise RunDirError("--resume continues the run in --output-dir and --restart moves it aside: give one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"--output-dir {out}: cannot create it: {err.strerror}") from None
    fd = _lock(out)
    try:
        return _check(out, cfg, resume, restart, fd)
    except BaseException:
        os.close(fd)
        raise


def _check(out, cfg, resume, restart, fd):
    notes = []
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if not resume:
        if held and not restart:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise RunDirError(
                f"--output-dir {out} already holds a run ({shown}): continue it with --resume, start over with "
                f"--restart (moves it to {out.name}.replaced-<time> beside it), or give another --output-dir"
            )
        if held:
            notes.append(f"--restart: the previous contents of {out} moved to {_move_aside(out)}")
        return Claim(None, {}, notes, fd)
    try:
        ckpt = find_checkpoint(out, resume)
    except FileNotFoundError as err:
        raise RunDirError(str(err)) from None
    if ckpt is None:
        notes.append(f"--resume {resume}: no complete checkpoint in {out / 'checkpoints'}; starting fresh")
        return Claim(None, {}, notes, fd)
    refused, changed = config_lib.resume_changes(_saved_config(ckpt), cfg)
    if refused:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in refused.items())
        raise RunDirError(
            f"--resume {ckpt}: this run changes keys that define what the run computes (trajectories, data or "
            f"objective), so it would not continue that run:\n{lines}\nDrop these --set overrides to resume, or "
            "start a new run in another --output-dir (or --restart this one)"
        )
    return Claim(ckpt, changed, notes, fd)


def agree(fn, rank):
    """fn() on rank 0, its result (or its RunDirError, raised) on every rank: one broadcast, so no rank builds
    models or enters a collective that another has left."""
    box = [None]
    if rank == 0:
        try:
            box = [("ok", fn())]
        except RunDirError as err:
            box = [("error", str(err))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise RunDirError(value)
    return value


def record_changes(output_dir, changes, epoch, step, checkpoint):
    """Append a resume's changed keys to OUTPUT_DIR/config_history.jsonl: they govern from (epoch, step) on."""
    entry = {
        "from_epoch": epoch,
        "from_step": step,
        "resumed_from": str(checkpoint),
        "changes": {k: {"was": a, "now": b} for k, (a, b) in changes.items()},
    }
    with (Path(output_dir) / HISTORY).open("a") as f:
        f.write(json.dumps(entry) + "\n")
