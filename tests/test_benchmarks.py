"""benchmarks/epoch.py end to end on the CPU (tiny UNet): its JSON record is well-formed. No timing target is
asserted here: performance targets live in the benchmarks (benchmarks/README.md), not in timed tests."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("sample", "reference", "pass1", "pass2", "optimizer", "epoch")


def test_epoch_benchmark_cpu_record(tmp_path):
    out = tmp_path / "epoch.json"
    group = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this session's process group's
    env = {k: v for k, v in os.environ.items() if k not in group} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "benchmarks/epoch.py", "--stages", "base,ratio", "--repeats", "1", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
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
