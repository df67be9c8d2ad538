"""benchmarks/epoch.py end to end on the CPU (tiny UNet) and benchmarks/train_step.py's rehearsals of the
flow-matching families (tiny SD3 and FLUX): their JSON records are well-formed and count the FLOPs each family
runs; the full-size SD3.5-medium and FLUX.1-dev configs are built and run on the meta device (no memory, no
weights). No timing target is asserted here: performance targets live in the benchmarks (benchmarks/README.md),
not in timed tests."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prdp_ds.flow_models import build_tiny_flux, build_tiny_sd3
from prdp_ds.lora import AdaptersDisabled

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("sample", "reference", "pass1", "pass2", "optimizer", "epoch")
STEP_PHASES = ("pass1", "step first", "step later", "optimizer", "epoch K=1")


def run_benchmark(script, *args):
    """python benchmarks/<script> args, on one thread, outside this session's process group."""
    group = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this session's process group's
    env = {k: v for k, v in os.environ.items() if k not in group} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env, check=True, timeout=600)


def test_epoch_benchmark_cpu_record(tmp_path):
    out = tmp_path / "epoch.json"
    run_benchmark("epoch.py", "--stages", "base,ratio", "--repeats", "1", "--json", str(out))
    rec = json.loads(out.read_text())
    for key in ("device", "date", "command", "torch", "deepspeed", "settings", "rows", "summary"):
        assert key in rec, key
    assert rec["command"].startswith("python benchmarks/epoch.py")
    assert rec["settings"]["cfg_forward_flops_per_image"] > 0
    rows = {r["stage"]: r for r in rec["rows"]}
    assert set(rows) == {"base", "ratio"}

    base = rows["base"]
    assert base["status"] == "ok", base["status"]
    assert base["images_per_rank"] == 8 and base["T"] == 4 and base["K"] == 1
    for name in PHASES:
        p = base["phases"][name]
        assert p["s"] > 0 and p["mb"] > 0, (name, p)
    for name in ("sample", "reference", "pass1", "pass2", "epoch"):
        p = base["phases"][name]
        assert p["images_per_s"] > 0 and p["tflop"] > 0, (name, p)
    # every phase's UNet images were counted: T steps x 8 images each (pass 2 once, K = 1)
    assert base["cfg_images"] == dict(sample=32, reference=32, pass1=32, pass2=32, pass1_in_steps=0)
    assert base["chunk"]["backward_calls"] == 8  # 4 images x 1 step per chunk, 8 images, T = 4
    noise = base["noise_floor"]
    assert len(noise["rms_per_step"]) == len(noise["max_per_step"]) == 4
    assert all(math.isfinite(v) and v >= 0 for v in noise["rms_per_step"] + noise["max_per_step"])
    assert noise["max"] >= noise["rms"] >= 0

    ratio = rows["ratio"]
    assert ratio["status"] == "ok", ratio["status"]
    o = ratio["overhead"]
    assert o["twopass_step_s"] > 0 and o["plain_fwd_bwd_s"] > 0 and o["optimizer_s"] >= 0
    assert math.isclose(o["overhead_ratio"], (o["twopass_step_s"] - o["optimizer_s"]) / o["plain_fwd_bwd_s"])
    assert o["overhead_ratio"] > 0 and o["backward_calls"] == ratio["chunk"]["backward_calls"]
    own = [
        (s - p) / q for s, p, q in zip(*(o["repeats"][k] for k in ("twopass_step_s", "optimizer_s", "plain_fwd_bwd_s")))
    ]
    assert o["overhead_ratio_median_of_pairs"] in own


def forward_flops(policy, x, t, emb, **kwargs):
    """FlopCounterMode's count of one policy call, no grad."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy(x, t, emb, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "unet, build", [("tiny_sd3", build_tiny_sd3), ("tiny_flux", build_tiny_flux)], ids=["sd3", "flux"]
)
def test_train_step_flow_rehearsal_cpu_record(tmp_path, unet, build):
    out = tmp_path / "train_step.json"
    run_benchmark(
        "train_step.py", "--unet", unet, "--T", "2", "--methods", "torch,naive", "--repeats", "1", "--json", str(out)
    )
    rec = json.loads(out.read_text())
    assert rec["command"].startswith("python benchmarks/train_step.py")
    s = rec["settings"]
    T, n, F, b = 2, s["groups"] * s["images"], s["cfg_forward_flops_per_image"], s["backward_forwards"]
    assert s["unet"] == unet and s["latent_shape"] == [16, 8, 8] and F > 0
    assert {(r["method"], r["phase"]) for r in rec["rows"]} == {("shared", "sample"), ("shared", "reference")} | {
        ("twopass-torch", p) for p in STEP_PHASES
    } | {("naive", "naive step")}
    for r in rec["rows"]:
        assert r["status"] == "ok" and r["T"] == T, r
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        if r["phase"] != "optimizer":  # the optimizer row has neither memory nor FLOPs of its own
            assert r["mem_mb"] > 0 and r["tflop"] > 0 and r["images_per_s"] > 0, r
    # F is one image's evaluation per step: the CFG pair (a batch of 2) for SD3, one transformer call for FLUX
    models = build(0)
    if unet == "tiny_flux":
        assert s["lora_rank"] == 4 and s["model_calls_per_image_step"] == 1
        models.add_lora(4)
        assert 0.5 < b < 2  # the frozen base gets no weight gradients: counted, not the full finetune's 2
    else:
        assert s["lora_rank"] == 0 and s["model_calls_per_image_step"] == 2 and b == 2
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([500])
    cond, uncond = models.encode_prompts(["a cat"]), models.encode_prompts([""])
    if unet == "tiny_flux":
        assert forward_flops(models.unet, x, t, cond, guidance=torch.tensor([5.0])) == F
    else:
        one = forward_flops(models.unet, x, t, cond)
        assert F == forward_flops(models.unet, x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([uncond, cond])) == 2 * one
    tflop = {r["phase"]: r["tflop"] for r in rec["rows"]}
    for phase, mult in (("sample", 1), ("reference", 1), ("pass1", 1), ("step first", 1 + b), ("step later", 2 + b)):
        assert math.isclose(tflop[phase], mult * T * F * n / 1e12), phase
    assert math.isclose(tflop["epoch K=1"], (3 + b) * T * F * n / 1e12)


def load_train_step():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_full_size_flow_families_on_meta():
    """sd35m and flux as the GPU run builds them, on the meta device: 512 px gives 16x64x64 latents (SD3's
    sample_size stays 128, its position table cropped), the packed text of the real widths, SD3.5's shift 3 and FLUX's
    e^mu at 1024 tokens, FLUX with LoRA (the reference its adapters-off view) and one call per step."""
    ts = load_train_step()
    x, t = torch.zeros(2, 16, 64, 64, device="meta"), torch.full((2,), 500.0, device="meta")

    sd3 = ts.build_models("sd35m", "meta", frozen=torch.bfloat16, resolution=512)
    assert sd3.latent_shape == (16, 64, 64) and sd3.unet.config.sample_size == 128
    assert sd3.scheduler.config.shift == 3.0
    emb = sd3.encode_prompts(["a", "b"])
    assert emb.shape == (2, 1 + 77 + 256, 4096)
    assert sd3.unet(x, t, emb).sample.shape == (2, 16, 64, 64)
    assert ts.backward_forwards(sd3.unet, sd3) == 2  # a full finetune
    F_sd3 = ts.cfg_flops(sd3.unet, sd3, "meta")
    assert F_sd3 == forward_flops(sd3.unet, x, t, emb) > 0  # the CFG pair: a batch of 2
    del sd3

    flux = ts.build_models("flux", "meta", frozen=torch.bfloat16, lora_rank=64, resolution=512)
    assert flux.latent_shape == (16, 64, 64) and isinstance(flux.ref_unet, AdaptersDisabled)
    base = [p for p in flux.unet.parameters() if not p.requires_grad]
    assert {p.dtype for p in base} == {torch.bfloat16} and sum(p.numel() for p in base) > 11e9
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)  # FLUX.1-dev's calculate_shift at (64 / 2)^2 tokens
    assert math.isclose(flux.scheduler.config.shift, math.exp(mu))
    emb = flux.encode_prompts(["a"])
    assert emb.shape == (1, 1 + 512, 4096)
    F_flux = ts.cfg_flops(flux.unet, flux, "meta", guidance=3.5)
    g = torch.full((1,), 3.5, device="meta")
    assert F_flux == forward_flops(flux.unet, x[:1].bfloat16(), t[:1], emb.bfloat16(), guidance=g)  # one call
    assert 1 < ts.backward_forwards(flux.unet, flux, 3.5) < 2  # input gradients through the frozen base
