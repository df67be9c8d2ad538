import json
import math
import subprocess
import sys

import numpy as np
import pytest

from prdp_ds import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, records, algo=None):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if algo:
        (run_dir / "config.yaml").write_text(f"algo:\n  name: {algo}\nseed: 0\n")
    return run_dir


def rec(epoch, reward, **extra):
    return {
        "epoch": epoch,
        "reward_mean": reward,
        "reward_std": 2.0,
        "num_images": 16,
        "reward/pickscore": reward / 2,
        "loss": 0.1 * epoch,
        "kl": 0.01,
        "grad_norm": 1.0,
        **extra,
    }


@pytest.fixture
def runs(tmp_path):
    prdp = write_run(
        tmp_path / "prdp_run",
        [
            rec(0, 1.0, clip_frac=0.1),
            rec(1, 5.0, clip_frac=0.2),  # superseded by the resumed epoch 1 below
            rec(1, 2.0, clip_frac=0.3, loss=float("nan"), grad_norm=float("nan")),
            rec(2, float("nan"), clip_frac=0.4),
        ],
        algo="prdp",
    )
    ddpo = write_run(tmp_path / "ddpo_run", [rec(0, 0.5), rec(1, 1.5), rec(2, 2.5)], algo="ddpo")
    return prdp, ddpo


def test_read_metrics_last_record_of_an_epoch_wins(runs):
    records = plot.read_metrics(runs[0])
    assert list(records) == [0, 1, 2]
    assert records[1]["reward_mean"] == 2.0 and records[1]["clip_frac"] == 0.3
    assert math.isnan(records[2]["reward_mean"])


def test_single_run_series_drops_nan_and_uses_within_run_se(runs):
    records = plot.read_metrics(runs[0])
    epochs, mean, se = plot.aggregate([records], "reward_mean")
    assert epochs.tolist() == [0, 1] and mean.tolist() == [1.0, 2.0]
    np.testing.assert_allclose(se, [2.0 / 4, 2.0 / 4])  # reward_std / sqrt(num_images)
    epochs, mean, se = plot.aggregate([records], "reward/pickscore")
    assert epochs.tolist() == [0, 1] and mean.tolist() == [0.5, 1.0]  # epoch 2 is NaN
    assert np.isnan(se).all()  # no reward/pickscore_std logged
    assert plot.aggregate([plot.read_metrics(runs[1])], "clip_frac")[0].size == 0


def test_component_std_gives_band(tmp_path):
    run = write_run(tmp_path / "r", [rec(0, 1.0, **{"reward/pickscore_std": 4.0})])
    _, _, se = plot.aggregate([plot.read_metrics(run)], "reward/pickscore")
    np.testing.assert_allclose(se, [1.0])


def test_seeds_under_one_label_aggregate_across_runs(tmp_path):
    seeds = [
        write_run(tmp_path / f"seed{i}", [rec(0, v0), rec(1, v1)])
        for i, (v0, v1) in enumerate([(1.0, 2.0), (3.0, float("nan")), (5.0, 4.0)])
    ]
    epochs, mean, se = plot.aggregate([plot.read_metrics(s) for s in seeds], "reward_mean")
    assert epochs.tolist() == [0, 1]
    np.testing.assert_allclose(mean, [3.0, 3.0])
    # epoch 0: values 1,3,5 -> std 2 (ddof=1) / sqrt(3); epoch 1: values 2,4 -> std sqrt(2) / sqrt(2)
    np.testing.assert_allclose(se, [2.0 / math.sqrt(3), 1.0])


def test_parse_runs_labels_and_default_label(runs):
    prdp, ddpo = runs
    parsed = plot.parse_runs([str(prdp), f"mine={ddpo}", f"mine={prdp}"])
    assert parsed == {"prdp_run (prdp)": [str(prdp)], "mine": [str(ddpo), str(prdp)]}


def test_plot_runs_library_call(runs, tmp_path):
    out = plot.plot_runs(
        {"a": [runs[0]], "b": [runs[1]]},
        tmp_path / "figs" / "cmp.png",
        metrics=["reward_mean", "clip_frac", "not_logged"],
    )
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(plot.PlotError, match="not_logged"):
        plot.plot_runs({"a": [runs[0]]}, tmp_path / "x.png", metrics=["not_logged"])


def test_cli_main_writes_png(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert plot.main([str(runs[0]), f"ddpo={runs[1]}", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert str(out) in capsys.readouterr().out


def test_cli_subprocess_default_out_in_cwd(runs, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prdp_ds.plot", str(runs[0]), str(runs[1]), "--metrics", "reward_mean,loss"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "comparison.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_metrics_file_names_the_dir(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        plot.main([str(empty), "--out", str(tmp_path / "x.png")])
    assert "empty_run" in str(exc.value.code) and "metrics.jsonl" in str(exc.value.code)
    assert not (tmp_path / "x.png").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    bad = write_run(tmp_path / "bad", [rec(0, 1.0)])
    with (bad / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "reward_mean": \n')
    with pytest.raises(plot.PlotError, match=r"bad/metrics\.jsonl:2"):
        plot.read_metrics(bad)


def test_reward_queries_is_the_running_sum_of_images(runs, tmp_path):
    assert plot.reward_queries([plot.read_metrics(runs[1])]) == {0: 16, 1: 32, 2: 48}
    other = write_run(tmp_path / "bigger", [rec(0, 1.0, num_images=32), rec(1, 1.0, num_images=32)])
    with pytest.raises(plot.PlotError, match="differ in reward queries"):
        plot.reward_queries([plot.read_metrics(runs[1]), plot.read_metrics(other)])
    no_count = write_run(tmp_path / "no_count", [{"epoch": 0, "reward_mean": 1.0}])
    with pytest.raises(plot.PlotError, match="num_images"):
        plot.reward_queries([plot.read_metrics(no_count)])


def test_plot_against_reward_queries(runs, tmp_path):
    out = tmp_path / "queries.png"
    assert plot.main([str(runs[0]), str(runs[1]), "--x", "queries", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(plot.PlotError, match="x: expected"):
        plot.plot_runs({"a": [runs[0]]}, tmp_path / "x.png", x="steps")
