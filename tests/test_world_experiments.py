"""The paper-in-miniature experiments (prdp_ds/world/experiments.py): every experiment's machinery,
shortened (--quick), and the aggregation over seeds. The science is in results/world/, not here."""

import dataclasses
import json
import math
import shutil

import pytest

from prdp_ds import config as config_lib
from prdp_ds.world import experiments as ex


@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_every_arm_resolves(name):
    for arm in ex.EXPERIMENTS[name].arms:
        for quick in (False, True):
            preset, overrides = ex.arm_overrides(ex.EXPERIMENTS[name], arm, 3, quick)
            cfg = config_lib.resolve(preset, None, overrides)
            assert cfg.train.seed == 3 and (cfg.train.epochs == 1) == quick


def test_e2_per_prompt_arm_uses_each_prompts_own_statistics():
    """E2 compares DDPO with and without per-prompt normalization; with the tracker's min_count above the images a
    prompt gets, the per-prompt arm would fall back to batch statistics: the ablation itself (seen in a first run,
    where the two arms matched to the last digit)."""
    for arm, per_prompt in (("ddpo", True), ("ddpo_no_norm", False)):
        preset, overrides = ex.arm_overrides(ex.EXPERIMENTS["E2"], arm, 0, False)
        cfg = config_lib.resolve(preset, None, overrides)
        assert cfg.algo.name == "ddpo" and cfg.ddpo.per_prompt_norm == per_prompt
        if per_prompt:
            assert cfg.ddpo.min_count <= cfg.train.images_per_prompt


@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_quick_experiment_writes_finite_results(name, tmp_path, world):
    out = tmp_path / name
    results = ex.run(name, [0], out, quick=True)
    exp = ex.EXPERIMENTS[name]
    assert list(results) == ["base", *exp.arms]
    for model, row in results.items():
        assert list(row) == list(exp.prompt_sets)
        for cell in row.values():
            for score in ex.SCORES:
                assert math.isfinite(cell[score]["mean"]) and len(cell[score]["per_seed"]) == 1
                assert (model == "base") != ("vs_base" in cell[score])
    for f in ("results.json", "results.md", "curves.png", *(f"grid_{s}.png" for s in exp.prompt_sets)):
        assert (out / f).is_file(), f
    assert (out / "sample_efficiency.png").is_file() == exp.sample_efficiency
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["quick"] and saved["results"] == json.loads(json.dumps(results))
    for arm in exp.arms:
        assert (out / "runs" / arm / "seed_0" / "checkpoints" / "latest").is_file()
    if name == "E1":  # a rerun reuses an evaluated seed without its checkpoints, and trains only a new seed
        shutil.rmtree(out / "runs" / "prdp" / "seed_0" / "checkpoints")
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_0/metrics.jsonl")}
        again = ex.run(name, [0, 1], out, quick=True)
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        assert (out / "runs" / "prdp" / "seed_1" / "checkpoints" / "latest").is_file()
        assert (
            again["prdp"]["world_demo"]["world_alignment"]["per_seed"][0]
            == results["prdp"]["world_demo"]["world_alignment"]["per_seed"][0]
        )
        walls = json.loads((out / "results.json").read_text())["meta"]["seed_wall_s"]
        assert set(walls) == {"0", "1"} and all(w["wall_s"] > 0 and w["machine"] for ws in walls.values() for w in ws)


def test_adding_an_arm_trains_and_evaluates_only_that_arm(tmp_path, world, monkeypatch):
    """An arm added to a finished experiment: its run and an evaluation of it (with the base, same noise) join the
    seed's eval.json; the old arm is neither retrained nor re-evaluated, the base row is kept."""
    e1 = ex.EXPERIMENTS["E1"]
    out = tmp_path / "E1"
    monkeypatch.setitem(ex.EXPERIMENTS, "E1", dataclasses.replace(e1, arms={"prdp": e1.arms["prdp"]}))
    first = ex.run("E1", [0], out, quick=True)
    stamp = (out / "runs" / "prdp" / "seed_0" / "metrics.jsonl").stat().st_mtime_ns
    stored = json.loads((out / "eval" / "seed_0" / "eval.json").read_text())
    monkeypatch.setitem(ex.EXPERIMENTS, "E1", dataclasses.replace(e1, arms={a: e1.arms[a] for a in ("prdp", "ddpo")}))
    both = ex.run("E1", [0], out, quick=True)
    assert list(both) == ["base", "prdp", "ddpo"]
    assert (out / "runs" / "prdp" / "seed_0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert json.dumps([both["prdp"], both["base"]]) == json.dumps([first["prdp"], first["base"]])  # NaN SE: one seed
    added = json.loads((out / "eval" / "seed_0" / "added_ddpo" / "eval.json").read_text())
    merged = json.loads((out / "eval" / "seed_0" / "eval.json").read_text())
    assert (
        merged["vs_base"]["ddpo"] == added["vs_base"]["ddpo"] and merged["results"]["prdp"] == stored["results"]["prdp"]
    )
    assert set(merged["settings"]["models"]) == {"prdp", "ddpo"}
    assert added["results"]["base"] == stored["results"]["base"]  # same noise, same base: the pairing holds
    walls = json.loads((out / "eval" / "seed_0" / "wall.json").read_text())
    assert [w["arms"] for w in walls] == [["prdp"], ["ddpo"]] and [w["trained"] for w in walls] == [["prdp"], ["ddpo"]]
    assert "ddpo" in (out / "results.md").read_text() and (out / "grid_world_demo_added_ddpo.png").is_file()


def test_an_arm_is_not_added_to_an_evaluation_with_other_settings():
    stored = {"settings": {"samples": 64, "seed": 0, "models": {"prdp": {}}}, "results": {}, "vs_base": {}}
    added = {"settings": {"samples": 8, "seed": 0, "models": {"ddpo": {}}}, "results": {}, "vs_base": {}}
    with pytest.raises(ValueError, match="cannot add arms \\['ddpo'\\].*other settings: samples"):
        ex.merge_evals(stored, added, ["ddpo"])


def _eval(base, prdp):
    cell = lambda m: {s: {"mean": m} for s in ex.SCORES}  # noqa: E731
    return {
        "results": {"base": {"world_small": cell(base)}, "prdp": {"world_small": cell(prdp)}},
        "vs_base": {"prdp": {"world_small": cell(prdp - base)}},
    }


def test_aggregate_is_the_mean_and_standard_error_across_seeds():
    out = ex.aggregate([_eval(0.5, 0.7), _eval(0.4, 0.7), _eval(0.6, 1.0)])
    cell = out["prdp"]["world_small"]["world_judge"]
    assert cell["mean"] == pytest.approx(0.8) and cell["per_seed"] == [0.7, 0.7, 1.0]
    assert cell["se"] == pytest.approx(math.sqrt(((0.1**2 + 0.1**2 + 0.2**2) / 2) / 3))
    assert cell["vs_base"]["mean"] == pytest.approx(0.3)
    diffs = [0.2, 0.3, 0.4]
    assert cell["vs_base"]["se"] == pytest.approx(math.sqrt(sum((d - 0.3) ** 2 for d in diffs) / 2 / 3))
