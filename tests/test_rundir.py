"""The run directory's claim (prdp_ds/rundir.py): the lock, no silent overwrite, what a resume may change.
End-to-end runs of the same rules: tests/test_faults.py."""

import json
import os
import socket

import pytest

from prdp_ds import config as config_lib
from prdp_ds.rundir import HISTORY, LOCK, RunDirError, claim, record_changes


def _cfg(*overrides):
    return config_lib.resolve("tiny_demo", None, overrides)


def _checkpoint(out, cfg, name="epoch_0001"):
    """A folder that passes as a complete checkpoint of `cfg`."""
    ckpt = out / "checkpoints" / name
    (ckpt / "engine").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.yaml").write_text(config_lib.dump(cfg))
    (out / "checkpoints" / "latest").write_text(name)
    return ckpt


def test_the_lock_refuses_a_second_claim_naming_the_holder_and_is_free_after_release(tmp_path):
    first = claim(tmp_path / "run", _cfg())
    with pytest.raises(RunDirError, match=rf"is in use by another trainer \(pid {os.getpid()} on host "):
        claim(tmp_path / "run", _cfg(), resume="latest")
    assert json.loads((tmp_path / "run" / LOCK).read_text())["host"] == socket.gethostname()
    first.release()
    claim(tmp_path / "run", _cfg(), resume="latest").release()


def test_a_lock_file_left_by_a_dead_process_is_no_lock(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    claim(tmp_path / "run", _cfg()).release()


@pytest.mark.parametrize("content", [[], [LOCK]], ids=["empty", "lock_only"])
def test_a_fresh_run_may_use_an_empty_directory(tmp_path, content):
    (tmp_path / "run").mkdir()
    for name in content:
        (tmp_path / "run" / name).write_text("")
    c = claim(tmp_path / "run", _cfg())
    assert c.checkpoint is None and c.notes == []
    c.release()


def test_a_fresh_run_refuses_a_directory_with_a_run_and_restart_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoints, metrics.jsonl\)"):
        claim(out, _cfg())
    c = claim(out, _cfg(), restart=True)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK] and str(aside) in c.notes[0]
    c.release()
    with pytest.raises(RunDirError, match="give one"):
        claim(out, _cfg(), resume="latest", restart=True)


def test_resume_without_a_checkpoint_starts_fresh_saying_so(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 0}\n')  # a run killed before its first checkpoint
    c = claim(tmp_path / "run", _cfg(), resume="latest")
    assert c.checkpoint is None and "no complete checkpoint" in c.notes[0]
    c.release()


def test_resume_lists_every_refused_key_and_returns_the_changes_it_allows(tmp_path):
    out = tmp_path / "run"
    ckpt = _checkpoint(out, _cfg())
    with pytest.raises(RunDirError) as err:
        claim(out, _cfg("sampler.num_steps=4", "prompts.source=x.txt", "train.lr=1e-4"), resume="latest")
    lines = str(err.value).splitlines()
    assert "  sampler.num_steps: checkpoint 10, this run 4" in lines
    assert "  prompts.source: checkpoint 'animals', this run 'x.txt'" in lines
    assert not any("train.lr" in line for line in lines)
    c = claim(out, _cfg("train.lr=1e-4", "output.save_every=2", "train.images_per_chunk=auto"), resume="latest")
    assert c.checkpoint == ckpt
    assert c.changes == {"train.lr": (3e-4, 1e-4), "output.save_every": (6, 2)}  # 'auto' chunks: the checkpoint's
    c.release()


def test_record_changes_appends_one_line_per_resume(tmp_path):
    record_changes(tmp_path, {"train.lr": (3e-4, 1e-4)}, 4, 0, tmp_path / "epoch_0003")
    record_changes(tmp_path, {"train.epochs": (12, 16)}, 12, 1, tmp_path / "epoch_0012_step1")
    rows = [json.loads(line) for line in (tmp_path / HISTORY).read_text().splitlines()]
    assert [(r["from_epoch"], r["from_step"]) for r in rows] == [(4, 0), (12, 1)]
    assert rows[0]["changes"] == {"train.lr": {"was": 3e-4, "now": 1e-4}}
