"""The fault matrix (docs/faults.md): a hostile user's inputs and a hostile machine's failures, end to end through
`prdp_ds.train.main` (and `prdp_ds.evaluate.main`), one class per section. Each case states what must hold: a clear
error naming the key, file or path before any expensive work, nothing lost, nothing silent, resumes bit-identical.

Runs are in-process for errors found at start, and forked processes (tests/fault_injection.py) where a run must die.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fault_injection
import pytest
import torch
from helpers import REPO, SMALL, TIMING, Payload, _port, metrics, save_sd_folder, start_until

from prdp_ds import evaluate, train
from prdp_ds.models import build_tiny

# 3 epochs of 2 steps, a checkpoint and a sample grid every epoch, the noise pass every epoch: every phase recurs
TINY = ["--preset", "tiny_demo", *SMALL, "--set", "train.epochs=3", "--set", "output.save_every=1"]
TINY += ["--set", "output.sample_every=1", "--set", "output.noise_every=1"]


def _fails(capsys, argv, main=train.main):
    """main(argv) must stop with an error message -> that message (and what the run printed)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert isinstance(stop.value.code, str), f"exit code {stop.value.code!r} instead of an error message"
    return stop.value.code + capsys.readouterr().err


def _files(root):
    """{relative path: bytes} of every file under root but the lock (whose holder changes with each attempt)."""
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def _weights(run_dir, epoch=2):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"epoch_{epoch:04d}" / "unet" / "diffusion_pytorch_model.safetensors")


def _same_run(a, b):
    """Bit-identical final weights, and the same metrics rows but for the timing columns."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(a)]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(b)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run uninterrupted -> (its folder, its entries per phase)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    counts = out.parent / "counts.json"
    code, log = fault_injection.run([*TINY, "--output-dir", str(out)], counts_file=counts)
    assert code == 0, log[-3000:]
    return out, json.loads(counts.read_text())


# 1. Bad values: every one stopped when the config is resolved, by key, before anything is written.
@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.clip_range=-1", "loss.clip_range"),
        ("loss.kl_weight=0", "loss.kl_weight"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch"),
        ("train.images_per_chunk=0", "train.images_per_chunk"),
        ("train.steps_per_chunk=0", "train.steps_per_chunk"),
        ("sampler.batch_size=0", "sampler.batch_size"),
        ("sampler.num_steps=0", "sampler.num_steps"),
        ("train.images_per_prompt=1", "train.images_per_prompt"),
        ("sampler.eta=0", "sampler.eta"),
        ("train.lr=nan", "train.lr"),
    ],
)
def test_bad_values_are_refused_at_resolve_by_key(tmp_path, capsys, override, key):
    message = _fails(capsys, [*TINY, "--output-dir", str(tmp_path / "run"), "--set", override])
    assert f"{key}: expected" in message
    assert not (tmp_path / "run").exists()


# 2. Model parts that do not fit: refused at load, naming the folder (train) or the model (evaluate).
@pytest.fixture(scope="module")
def misfit(tmp_path_factory):
    """A Stable Diffusion folder whose UNet takes 8 latent channels (its VAE has 4) -> its path."""
    root = tmp_path_factory.mktemp("misfit")
    models = build_tiny(0)
    from diffusers import UNet2DConditionModel

    models.unet = UNet2DConditionModel.from_config({**models.unet.config, "in_channels": 8})
    save_sd_folder(models, root)
    return root


def test_a_unet_that_does_not_fit_its_vae_stops_training_at_load_naming_the_folder(tmp_path, capsys, misfit):
    out = tmp_path / "run"
    message = _fails(capsys, [*TINY, "--output-dir", str(out), "--set", f"model.pretrained={misfit}"])
    assert f"model.pretrained='{misfit}'" in message and "takes 8 and gives 4 latent channels" in message
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_evaluate_refuses_a_model_that_does_not_fit_the_base_before_sampling(tmp_path, capsys, misfit):
    argv = ["--base", "tiny", "--model", f"misfit={misfit / 'unet'}", "--prompts", "animals", "--max-prompts", "1"]
    message = _fails(capsys, [*argv, "--samples", "1", "--output-dir", str(tmp_path / "eval")], evaluate.main)
    assert f"--model misfit ({misfit / 'unet'})" in message and "do not fit together" in message
    assert not list((tmp_path / "eval").glob("partial/*.safetensors"))


# 3. Custom rewards: refused when built, by name.
def test_a_custom_reward_that_is_not_callable_is_refused_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    message = _fails(capsys, [*TINY, "--output-dir", str(out), "--set", "reward={'math:pi': 1.0}"])
    assert "math:pi" in message and "callable" in message
    assert not (out / "metrics.jsonl").exists()


# 4. Resume honours or refuses.
def test_resume_refuses_changed_trajectory_keys_listing_them_and_writes_nothing(tmp_path, capsys, straight):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    before = _files(out)
    argv = [*TINY, "--output-dir", str(out), "--resume", "--set", "sampler.num_steps=4", "--set", "train.seed=1"]
    message = _fails(capsys, [*argv, "--set", "train.lr=1e-4"])
    assert (
        "sampler.num_steps: checkpoint 3, this run 4" in message and "train.seed: checkpoint 0, this run 1" in message
    )
    assert "train.lr" not in message  # a key a resume may change is not among the refused
    assert _files(out) == before


def test_a_changed_learning_rate_takes_effect_and_is_recorded_from_its_epoch(tmp_path, capsys, straight):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    config_before = (out / "config.yaml").read_text()
    (out / "checkpoints" / "latest").write_text("epoch_0000")  # resume after epoch 0
    sigterm = signal.getsignal(signal.SIGTERM)
    train.main([*TINY, "--output-dir", str(out), "--resume", "--set", "train.lr=1e-4"])
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the run's SIGTERM handler does not outlive it
    assert "train.lr: 0.0003 -> 0.0001" in capsys.readouterr().out
    assert [row["lr"] for row in metrics(out)] == [3e-4, 1e-4, 1e-4]
    assert (out / "config.yaml").read_text() == config_before  # it governed epoch 0, and still says so
    (entry,) = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert entry["from_epoch"] == 1 and entry["from_step"] == 0
    assert entry["changes"] == {"train.lr": {"was": 3e-4, "now": 1e-4}}
    assert "lr: 0.0001" in (out / "checkpoints" / "epoch_0002" / "config.yaml").read_text()


# 5. A run directory belongs to one run.
def test_a_second_trainer_on_a_busy_directory_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prdp_ds.train", *TINY, "--output-dir", str(out)]
    first, lines = start_until(cmd, "batch arithmetic", {"MASTER_PORT": str(_port())})  # the lock is held by then
    code, err = fault_injection.run([*TINY, "--output-dir", str(out)])
    assert code == 1
    assert f"--output-dir {out} is in use by another trainer (pid {first.pid} on host {socket.gethostname()}" in err
    lines += first.stdout.readlines()
    assert first.wait(timeout=600) == 0, "".join(lines)[-3000:]
    assert [row["epoch"] for row in metrics(out)] == [0, 1, 2]  # the first run's rows only, not interleaved
    assert (out / "checkpoints" / "latest").read_text() == "epoch_0002"


def test_a_fresh_run_into_a_finished_run_is_refused_and_restart_moves_it_aside(tmp_path, capsys, straight):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    before = _files(out)
    message = _fails(capsys, [*TINY, "--output-dir", str(out), "--set", "train.epochs=1"])
    assert "already holds a run" in message and "--resume" in message and "--restart" in message
    assert _files(out) == before
    train.main([*TINY, "--output-dir", str(out), "--set", "train.epochs=1", "--restart"])
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _files(aside) == before
    assert [row["epoch"] for row in metrics(out)] == [0]


def test_an_output_dir_that_cannot_be_created_is_refused_naming_it(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = _fails(capsys, [*TINY, "--output-dir", str(blocker / "run")])
    assert f"--output-dir {blocker / 'run'}: cannot create it: Not a directory" in message


# 6. Disk full: one line naming the checkpoint and the cause; the partial removed; the previous one intact.
def test_a_full_disk_stops_the_run_cleanly_and_resume_continues_bit_identically(tmp_path, straight):
    out = tmp_path / "run"
    fault = {"phase": "checkpoint", "at": 3, "action": "enospc"}  # the first file of epoch 1's checkpoint
    code, err = fault_injection.run([*TINY, "--output-dir", str(out)], fault)
    assert code == 1
    assert f"cannot write checkpoint {out / 'checkpoints' / 'epoch_0001'}: No space left on device" in err
    assert "epoch_0000 is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0000", "latest"]
    code, log = fault_injection.run([*TINY, "--output-dir", str(out), "--resume"])
    assert code == 0, log[-3000:]
    _same_run(straight[0], out)


# 7. Security: resuming executes no code from the checkpoint.
def test_a_checkpoint_with_a_planted_pickle_is_refused(tmp_path, capsys, straight):
    out, marker = tmp_path / "run", tmp_path / "planted_code_ran"
    shutil.copytree(straight[0], out)
    target = out / "checkpoints" / "epoch_0002" / "engine" / "state" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    state["module"]["extra"] = Payload(str(marker))
    torch.save(state, target)
    message = _fails(capsys, [*TINY, "--output-dir", str(out), "--resume", "--set", "train.epochs=4"])
    assert f"{target}: refused" in message and "posix.mkdir" in message
    assert not marker.exists()


# Kills: kill -9 at 20 random moments, each resumed; the final weights bit-identical to the straight run's.
_rng = random.Random(2026)
KILLS = [(fault_injection.PHASES[i % 6], _rng.random(), round(_rng.uniform(0, 0.05), 3)) for i in range(20)]


@pytest.mark.slow
@pytest.mark.parametrize("phase, where, delay", KILLS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(KILLS)])
def test_kill_9_then_resume_equals_the_straight_run(tmp_path, straight, phase, where, delay):
    out, counts = tmp_path / "run", straight[1]
    at = 1 + int(where * counts[phase])  # which entry of that phase, of the straight run's counts[phase]
    fault = {"phase": phase, "at": at, "action": "kill", "delay": delay}
    code, log = fault_injection.run([*TINY, "--output-dir", str(out)], fault)
    assert code == -signal.SIGKILL, log[-3000:]  # the kill landed before the run ended
    code, log = fault_injection.run([*TINY, "--output-dir", str(out), "--resume"])
    assert code == 0, log[-3000:]
    _same_run(straight[0], out)


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_other_within_60_s_and_the_run_resumes(tmp_path):
    import psutil

    out = tmp_path / "run"
    args = [*TINY, "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
    cmd = [*launcher, str(_port()), "--module", "prdp_ds.train", *args]
    proc, lines = start_until(cmd, "epoch=0 ", env)  # epoch 0 done: epoch 1's sampling and steps follow
    time.sleep(0.5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "prdp_ds.train" in " ".join(p.cmdline())]
    victim = [p for p in ranks if p.environ().get("RANK") == "1"]
    assert len(victim) == 1, "".join(lines)[-3000:]
    victim[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    lines += proc.stdout.readlines()
    code = proc.wait(timeout=120)
    assert code != 0 and time.monotonic() - killed < 60, "".join(lines)[-3000:]
    resumed = subprocess.run(
        [*launcher, str(_port()), "--module", "prdp_ds.train", *args, "--resume"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [row["epoch"] for row in metrics(out)] == [0, 1, 2]
    assert (out / "checkpoints" / "latest").read_text() == "epoch_0002"
