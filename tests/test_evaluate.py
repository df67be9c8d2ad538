"""`prdp_ds.evaluate`: equal-terms comparison of a base model and finetuned UNets (docs/design.md §13), on tiny
models."""

import json
import math
import os

import pytest
import torch

from prdp_ds import evaluate
from prdp_ds.models import build_tiny

FAST = [
    "--prompts",
    "animals",
    "--max-prompts",
    "6",
    "--samples",
    "4",
    "--num-steps",
    "3",
    "--batch-size",
    "8",
    "--prompts-per-unit",
    "4",
    "--grid-prompts",
    "2",
    "--grid-samples",
    "3",
    "--reward",
    "{brightness: 1.0, jpeg_compressibility: 0.01}",
]


@pytest.fixture(autouse=True)
def restore_environment():
    """evaluate.main initialises a one-process group through environment variables: undo them after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """The tiny base UNet saved as a UNet folder and as a training run's checkpoint, and a perturbed copy."""
    root = tmp_path_factory.mktemp("unets")
    unet = build_tiny(0).unet
    unet.save_pretrained(str(root / "folder"), safe_serialization=True)
    ckpt = root / "run" / "checkpoints" / "epoch_0003"
    unet.save_pretrained(str(ckpt / "unet"), safe_serialization=True)
    (root / "run" / "checkpoints" / "latest").write_text("epoch_0003")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    unet.save_pretrained(str(root / "perturbed"), safe_serialization=True)
    return root


def run_eval(out, *args):
    evaluate.main([*FAST, "--output-dir", str(out), *args])
    return json.loads((out / "eval.json").read_text())


def test_identical_weights_give_identical_numbers_and_a_perturbed_unet_differs(tmp_path, unets):
    res = run_eval(
        tmp_path,
        "--model",
        f"folder={unets / 'folder'}",
        "--model",
        f"run={unets / 'run'}",
        "--model",
        f"perturbed={unets / 'perturbed'}",
    )
    assert res["settings"]["models"]["run"]["path"] == str(unets / "run" / "checkpoints" / "epoch_0003" / "unet")
    r = res["results"]
    assert list(r) == ["base", "folder", "run", "perturbed"]
    for reward in ("total", "brightness", "jpeg_compressibility"):
        assert r["folder"]["animals"][reward] == r["run"]["animals"][reward] == r["base"]["animals"][reward]
        assert r["perturbed"]["animals"][reward]["mean"] != r["base"]["animals"][reward]["mean"]
        assert r["base"]["animals"][reward]["n"] == 6 * 4
        assert res["vs_base"]["run"]["animals"][reward] == {"mean": 0.0, "std": 0.0, "se": 0.0, "n": 24}
    b = r["base"]["animals"]
    assert b["total"]["mean"] == pytest.approx(b["brightness"]["mean"] + 0.01 * b["jpeg_compressibility"]["mean"])
    assert (tmp_path / "grids" / "animals.png").is_file() and res["grids"]["animals"].endswith("animals.png")


def test_rerun_resumes_identically_and_other_settings_are_refused(tmp_path, unets, monkeypatch):
    model = ["--model", f"ft={unets / 'perturbed'}"]
    first = run_eval(tmp_path, *model)
    text = (tmp_path / "eval.json").read_text()
    units = sorted((tmp_path / "partial").rglob("*.safetensors"))
    assert len(units) == 2 * 2  # (base, ft) x prompts [0, 4), [4, 6)
    (tmp_path / "eval.json").unlink()
    units[1].unlink()  # as if killed before that unit finished
    calls = []
    real = evaluate.run_unit
    monkeypatch.setattr(evaluate, "run_unit", lambda *a: calls.append(a[2]) or real(*a))
    assert run_eval(tmp_path, *model) == first and (tmp_path / "eval.json").read_text() == text
    assert len(calls) == 1
    # another model may join the directory; only its units are computed
    calls.clear()
    both = run_eval(tmp_path, *model, "--model", f"same={unets / 'folder'}")
    both_text = (tmp_path / "eval.json").read_text()
    assert len(calls) == 2 and both["results"]["ft"] == first["results"]["ft"]
    for changed, named in (
        ([*model, "--num-steps", "4"], "num_steps: recorded 3, now 4"),
        ([*model, "--reward", "{brightness: 1.0}"], "reward"),
        (["--model", f"ft={unets / 'folder'}"], "models.ft"),
        ([*model, "--max-prompts", "5"], "max_prompts"),
        ([*model, "--precision", "bf16"], "precision: recorded 'float32', now 'bfloat16'"),
    ):
        with pytest.raises(SystemExit, match="other settings") as err:
            evaluate.main([*FAST, "--output-dir", str(tmp_path), *changed])
        assert named in str(err.value)
    assert (tmp_path / "eval.json").read_text() == both_text


def test_table_has_models_as_rows_and_prompt_sets_as_columns(tmp_path, unets, capsys):
    pets = tmp_path / "pets.txt"
    pets.write_text("cat\ndog\nparrot\n")
    evaluate.main(
        [
            *FAST,
            "--output-dir",
            str(tmp_path / "out"),
            "--prompts",
            f"pets={pets}",
            "--model",
            f"ft={unets / 'perturbed'}",
        ]
    )
    out = capsys.readouterr().out
    block = out[out.index("reward: brightness") :].split("\n\n")[0].splitlines()
    assert block[1].split() == ["model", "animals", "pets"]
    assert [line.split()[0] for line in block[3:]] == ["base", "ft"]
    assert all(len(line.split("±")) == 3 for line in block[3:])  # one 'mean ± se' per prompt set
    assert (tmp_path / "out" / "table.txt").read_text() in out
    res = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert res["results"]["ft"]["pets"]["brightness"]["n"] == 3 * 4
    assert {p.name for p in (tmp_path / "out" / "grids").iterdir()} == {"animals.png", "pets.png"}


def test_bad_model_paths_and_rewards_are_named(tmp_path, unets):
    with pytest.raises(SystemExit, match=r"--model x=.*nope.*expected a diffusers UNet folder"):
        evaluate.main([*FAST, "--output-dir", str(tmp_path), "--model", f"x={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        evaluate.main([*FAST, "--output-dir", str(tmp_path), "--model", str(unets / "folder")])
    with pytest.raises(SystemExit, match="unknown reward 'brightnes'"):
        evaluate.main([*FAST, "--output-dir", str(tmp_path), "--reward", "{brightnes: 1.0}"])
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_a_finetuned_tiny_demo_checkpoint_beats_its_base_on_the_training_reward(tmp_path, tiny_demo_run):
    run_dir = tiny_demo_run  # the tiny_demo preset as trained by `python -m prdp_ds.train`
    # sampler, prompts (templated animals) and reward come from the run's own training config
    evaluate.main(
        [
            "--train-config",
            str(run_dir / "config.yaml"),
            "--model",
            f"prdp={run_dir}",
            "--samples",
            "4",
            "--max-prompts",
            "24",
            "--output-dir",
            str(tmp_path / "eval"),
        ]
    )
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["settings"]["num_steps"] == 10 and res["settings"]["reward"] == {"brightness": 1.0}
    base, tuned = (res["results"][m]["animals"]["brightness"] for m in ("base", "prdp"))
    assert tuned["mean"] - base["mean"] > 2 * math.sqrt(base["se"] ** 2 + tuned["se"] ** 2)
    paired = res["vs_base"]["prdp"]["animals"]["brightness"]  # shared seeds: the paired difference is sharper
    assert paired["mean"] == pytest.approx(tuned["mean"] - base["mean"]) and paired["mean"] > 2 * paired["se"]


def test_a_lora_checkpoint_loads_onto_the_base(tmp_path):
    from prdp_ds.lora import add_lora, save_adapter

    unet = build_tiny(0).unet
    add_lora(unet, 4)  # B starts at zero: the adapted UNet is the base UNet
    save_adapter(unet, tmp_path / "ckpt" / "unet_lora")
    res = run_eval(tmp_path / "out", "--model", f"lora={tmp_path / 'ckpt'}", "--max-prompts", "4")
    assert res["settings"]["models"]["lora"]["kind"] == "lora"
    assert res["results"]["lora"] == res["results"]["base"]


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_a_flow_checkpoint_is_evaluated_on_its_base_with_the_sde_window(tmp_path, family):
    """A finetuned transformer loads as the base's class (FLUX's latent side from the base); equal weights give equal
    numbers, moved ones differ; a UNet folder against a flow base is refused, naming the model."""
    from prdp_ds.models import load_models

    policy = load_models(family).unet
    policy.save_pretrained(str(tmp_path / "same"), safe_serialization=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    policy.save_pretrained(str(tmp_path / "moved"), safe_serialization=True)
    flow = ["--base", family, "--sde-steps", "2", "--sde-start", "1", "--max-prompts", "4"]
    res = run_eval(
        tmp_path / "out", *flow, "--model", f"same={tmp_path / 'same'}", "--model", f"moved={tmp_path / 'moved'}"
    )
    assert res["settings"]["sde_steps"] == 2 and res["settings"]["sde_start"] == 1
    r = res["results"]
    assert r["same"] == r["base"] and r["moved"]["animals"]["total"]["mean"] != r["base"]["animals"]["total"]["mean"]
    build_tiny(0).unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    with pytest.raises(
        SystemExit, match=r"--model unet .*does not fit the base model .*in_channels 4 \(the base's (16|64)\)"
    ):
        run_eval(tmp_path / "bad", *flow, "--model", f"unet={tmp_path / 'unet'}")
