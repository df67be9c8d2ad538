"""Finding the checkpoint to resume from (prdp_ds/checkpoint.py): names ordered by (epoch, step), numerically."""

import math

import pytest

from prdp_ds.checkpoint import checkpoint_name, checkpoint_position, find_checkpoint


def _complete(root, name):
    """A folder that passes as a complete checkpoint (trainer_state.json and engine/)."""
    (root / name / "engine").mkdir(parents=True)
    (root / name / "trainer_state.json").write_text("{}")


def test_positions_are_numeric_and_an_epoch_comes_after_its_mid_epoch_checkpoints():
    names = ["epoch_10000", "epoch_0002", "epoch_9999", "epoch_0002_step10", "epoch_0003_step1", "epoch_0002_step1"]
    assert sorted(names, key=checkpoint_position) == [
        "epoch_0002_step1",
        "epoch_0002_step10",
        "epoch_0002",
        "epoch_0003_step1",
        "epoch_9999",
        "epoch_10000",
    ]
    assert checkpoint_position(checkpoint_name(2, 1, 4)) == (2, 1)
    assert checkpoint_position(checkpoint_name(12345, 4, 4)) == (12345, math.inf)
    for other in ("latest", "epoch_0002.tmp", "epoch_x", "epoch_0002_step", "epoch_0002_stepA"):
        assert checkpoint_position(other) is None


@pytest.mark.parametrize("pointer", [None, "epoch_0042", ""], ids=["no_pointer", "stale_pointer", "empty_pointer"])
@pytest.mark.parametrize(
    "names, newest",
    [
        (["epoch_0002", "epoch_0002_step1"], "epoch_0002"),
        (["epoch_0002_step1", "epoch_0001"], "epoch_0002_step1"),
        (["epoch_9999", "epoch_10000"], "epoch_10000"),
        (["epoch_0003_step2", "epoch_0003_step10"], "epoch_0003_step10"),
    ],
)
def test_without_a_valid_latest_pointer_the_newest_by_epoch_and_step_is_found(tmp_path, names, newest, pointer):
    root = tmp_path / "checkpoints"
    for name in names:
        _complete(root, name)
    (root / "epoch_99999.tmp" / "engine").mkdir(parents=True)  # a killed save: ignored
    (root / "epoch_99998" / "engine").mkdir(parents=True)  # no trainer_state.json: incomplete, ignored
    if pointer is not None:
        (root / "latest").write_text(pointer)
    assert find_checkpoint(tmp_path, "latest") == root / newest


def test_a_valid_latest_pointer_wins_and_no_checkpoint_gives_none(tmp_path):
    assert find_checkpoint(tmp_path, "latest") is None
    root = tmp_path / "checkpoints"
    for name in ("epoch_0001", "epoch_0002"):
        _complete(root, name)
    (root / "latest").write_text("epoch_0001\n")
    assert find_checkpoint(tmp_path, "latest") == root / "epoch_0001"
