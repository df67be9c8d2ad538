"""End-to-end runs of `prdp_ds.train` as a user launches it (CPU, DeepSpeed's CPU accelerator)."""

import json
import math
import os
import signal
import sys

import pytest
import torch
from helpers import REPO, SMALL, TIMING, _port, metrics, run, start_until
from safetensors.torch import load_file

from prdp_ds.checkpoint import AUX_STATE, load_aux_state


def unet_params(ckpt):
    return load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))


BASELINES = {
    "grpo": ["--set", "algo.name=grpo", "--set", "grpo.kl_weight=0.01"],
    "dpok": ["--set", "algo.name=dpok", "--set", "dpok.value_batch_size=16", "--set", "dpok.value_width=32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2", "zero3", "zero2_offload"])
def test_one_and_two_ranks_give_the_same_parameters(tmp_path, ds_config):
    # Adam's m / sqrt(v) turns a gradient at rounding level into a full step of either sign; adam_eps = 1e-3
    # keeps such elements linear in g (typical |g| here is far above it), so parameters must agree everywhere.
    for ranks in (1, 2):  # one thread per process on both sides: the same kernels, only the reduction differs
        run(
            [
                "--output-dir",
                str(tmp_path / f"r{ranks}"),
                "--config",
                str(REPO / "ds_configs" / f"{ds_config}.json"),
                "--set",
                "train.epochs=1",
                *SMALL,
                "--set",
                "train.adam_eps=1e-3",
            ],
            ranks=ranks,
            threads=1,
        )
    p1, p2 = (unet_params(tmp_path / f"r{r}" / "checkpoints" / "epoch_0000") for r in (1, 2))
    base = unet_params_initial()
    moved = max((p1[k] - base[k]).abs().max().item() for k in p1)
    assert moved > 1e-5, "training should move the parameters"
    for k in p1:
        # gloo's 2-rank gradient sum rounds differently: allow 1% of one step (lr 3e-4 in the tiny_demo preset)
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=0.01 * 3e-4)
    (line,) = (tmp_path / "r2" / "prompts.jsonl").read_text().splitlines()
    ranks = json.loads(line)["ranks"]
    assert len(ranks) == 2 and not set(ranks[0]) & set(ranks[1]), ranks  # no prompt sampled on both ranks
    assert json.loads((tmp_path / "r1" / "prompts.jsonl").read_text())["ranks"] == [ranks[0] + ranks[1]]
    m1, m2 = metrics(tmp_path / "r1")[0], metrics(tmp_path / "r2")[0]
    for key in ("reward_mean", "reward_std", "loss", "kl", "clip_frac", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key


def unet_params_initial():
    from prdp_ds.models import build_tiny

    return {k: v.clone() for k, v in build_tiny(0).unet.state_dict().items()}


@pytest.mark.slow
def test_resume_equals_a_straight_run_and_ignores_half_written_checkpoints(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*SMALL, "--set", "output.save_every=2"]
    run(["--output-dir", str(straight), "--set", "train.epochs=4", *common])
    run(["--output-dir", str(split), "--set", "train.epochs=2", *common])
    junk = split / "checkpoints" / "epoch_0003.tmp"  # a save killed half-way
    junk.mkdir()
    (junk / "trainer_state.json").write_text("{}")
    (split / "checkpoints" / "latest").write_text("epoch_0003")
    proc = run(["--output-dir", str(split), "--set", "train.epochs=4", "--resume", "latest", *common])
    assert "resumed from" in proc.stdout + proc.stderr and "epoch_0001" in proc.stdout + proc.stderr
    a, b = metrics(straight), metrics(split)
    assert [r["epoch"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    pa, pb = unet_params(straight / "checkpoints" / "epoch_0003"), unet_params(split / "checkpoints" / "epoch_0003")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (split / "checkpoints" / "latest").read_text() == "epoch_0003"


def test_bad_overrides_and_missing_weights_fail_at_start_with_clear_errors(tmp_path):
    out = tmp_path / "out"  # beside the bad files: a run directory holding them would be refused first
    proc = run(["--output-dir", str(out), "--set", "train.lrr=1"], check=False)
    assert proc.returncode != 0 and "unknown config key 'train.lrr'" in proc.stderr and "train.lr" in proc.stderr
    proc = run(["--output-dir", str(out), "--config", str(tmp_path / "nope.json")], check=False)
    assert proc.returncode != 0 and "nope.json" in proc.stderr
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"gradient_clipping": 0.5}))
    proc = run(["--output-dir", str(out), "--config", str(bad_ds)], check=False)
    assert proc.returncode != 0 and "'gradient_clipping' is owned by the training config" in proc.stderr
    proc = run(["--output-dir", str(out), "--preset", "small"], check=False)
    assert proc.returncode != 0 and "hpsv2" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def reward_gain_in_se(rows):
    """(mean of the last 3 epochs - epoch 0) in standard errors of that difference."""
    first, last = rows[0], rows[-3:]
    se = lambda r: r["reward_std"] / math.sqrt(r["num_images"])  # noqa: E731
    last_mean = sum(r["reward_mean"] for r in last) / len(last)
    last_se = math.sqrt(sum(se(r) ** 2 for r in last)) / len(last)
    return (last_mean - first["reward_mean"]) / math.sqrt(se(first) ** 2 + last_se**2)


@pytest.mark.slow
def test_tiny_demo_raises_the_reward_and_writes_its_outputs(tiny_demo_run):
    tmp_path = tiny_demo_run
    rows = metrics(tmp_path)
    assert reward_gain_in_se(rows) > 2
    for name in ("config.yaml", "training_curves.png", "prompts.jsonl", "samples/epoch_0000.png", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    assert {
        "epoch",
        "reward_mean",
        "reward_std",
        "loss",
        "clip_frac",
        "kl",
        "grad_norm",
        "lr",
        "sample_s",
        "train_s",
        "images_per_s",
        "peak_mem_mb",
    } <= set(rows[0])
    graded = [r for r in rows if "eval/reward_mean" in r]  # the fixed sample grid is scored when drawn
    assert [r["epoch"] for r in graded] == [0, 3, 6, 9, 11]
    assert all(r["eval/brightness"] == r["eval/reward_mean"] for r in graded)
    assert graded[-1]["eval/reward_mean"] > graded[0]["eval/reward_mean"]  # same noise: a paired comparison


@pytest.mark.slow
def test_the_demo_preset_trains_the_world_model(tmp_path):
    """The `demo` preset (the default of `python -m prdp_ds.train`) is the world demo; shrunk to one small epoch, it
    runs and logs the world's scores. Machinery only: README, "What the demo shows", has the full run's gain."""
    run(
        [
            "--preset",
            "demo",
            "--output-dir",
            str(tmp_path),
            "--set",
            "train.epochs=1",
            "--set",
            "train.images_per_prompt=3",
            "--set",
            "sampler.num_steps=3",
            "--set",
            "output.eval_images=1",
            "--set",
            "output.save_every=1",
        ],
        threads=2,
    )
    (row,) = metrics(tmp_path)
    assert row["num_images"] == 12 and row["steps_applied"] == 2 and math.isfinite(row["loss"])
    assert 0 <= row["reward/world_judge"] <= 1 and 0 < row["reward/world_alignment"] <= 1
    assert (tmp_path / "samples" / "epoch_0000.png").is_file() and (tmp_path / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def test_a_nan_reward_on_one_rank_skips_the_step_on_all_and_stops_after_max_bad_steps(tmp_path, monkeypatch):
    (tmp_path / "rank_nan.py").write_text(
        "import torch, torch.distributed as dist\n"
        "def score(images, prompts):\n"
        "    s = images.mean(dim=(1, 2, 3))\n"
        "    return s * float('nan') if dist.get_rank() == 1 else s\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = run(
        [
            "--output-dir",
            str(tmp_path / "out"),
            "--set",
            "train.epochs=2",
            "--set",
            "train.max_bad_steps=2",
            "--set",
            "reward={'rank_nan:score': 1.0}",
            *SMALL,
        ],
        ranks=2,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-2000:]
    assert "[rank 1] epoch 0: reward 'rank_nan:score' returned non-finite scores" in log
    assert "skipped, non-finite reward" in log and "train.max_bad_steps" in log
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["prdp", "dpok"])  # DPOK: its value function is fitted once per epoch, before step 1
def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_equals_a_straight_one(tmp_path, algo):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = ["--set", "train.epochs=2", *SMALL, *BASELINES.get(algo, [])]
    run(["--output-dir", str(straight), *common])
    cmd = [sys.executable, "-m", "prdp_ds.train", "--preset", "tiny_demo", "--output-dir", str(cut), *common]
    proc, lines = start_until(cmd, "batch arithmetic", {"MASTER_PORT": str(_port())})
    proc.send_signal(signal.SIGTERM)  # the handler is installed before that line is printed
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    assert (cut / "checkpoints" / "latest").read_text() == "epoch_0000_step1", "".join(lines)[-2000:]
    assert (cut / "checkpoints" / "epoch_0000_step1" / "rollout_rank0.safetensors").is_file()
    run(["--output-dir", str(cut), "--resume", "latest", *common])
    pa, pb = unet_params(straight / "checkpoints" / "epoch_0001"), unet_params(cut / "checkpoints" / "epoch_0001")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    if algo == "dpok":
        va, vb = (load_aux_state(d / "checkpoints" / "epoch_0001", "cpu")["net"] for d in (straight, cut))
        assert all(torch.equal(va[k], vb[k]) for k in va)
    # every row complete, the interrupted epoch's too: its step 1 statistics travelled in the mid-epoch checkpoint
    a, b = metrics(straight), metrics(cut)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in b
    ]


@pytest.mark.slow
def test_bf16_policy_and_reference_agree_at_init(tmp_path):
    """Frozen parts take the policy's compute dtype, so r(theta = ref) = 0 exactly in bf16 too."""
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    run(
        [
            "--output-dir",
            str(tmp_path / "out"),
            "--config",
            str(ds),
            *SMALL,
            "--set",
            "train.epochs=1",
            "--set",
            "train.steps_per_epoch=1",
        ]
    )  # later --set wins: K = 1, so kl is that of theta = ref
    row = metrics(tmp_path / "out")[0]
    assert row["kl"] == 0.0 and row["clip_frac"] == 0.0 and math.isfinite(row["loss"])


@pytest.mark.slow
def test_ddpo_trains_and_plots_beside_the_tiny_demo_on_one_figure(tmp_path, tiny_demo_run):
    run(["--output-dir", str(tmp_path / "ddpo"), "--set", "algo.name=ddpo", "--set", "train.epochs=3", *SMALL])
    rows = metrics(tmp_path / "ddpo")
    assert all(r["steps_applied"] == 2 and math.isfinite(r["loss"]) and 0 <= r["clip_frac"] <= 1 for r in rows)
    assert len(rows) == 3 and "pred_err" not in rows[0]
    state = json.loads((tmp_path / "ddpo" / "checkpoints" / "epoch_0002" / "trainer_state.json").read_text())
    assert state["algo"] == "ddpo" and len(state["ddpo_tracker"]["history"]) > 0
    from prdp_ds.plot import main as plot_main

    out = tmp_path / "compare.png"
    plot_main([f"prdp={tiny_demo_run}", f"ddpo={tmp_path / 'ddpo'}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.slow
def test_ddpo_resume_restores_the_per_prompt_statistics(tmp_path):
    """Four prompts recur every epoch, so after epoch 1 advantages come from the tracker's history."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("cat\ndog\nfox\nowl\n")
    common = [
        *SMALL,
        "--set",
        "algo.name=ddpo",
        "--set",
        f"prompts.source={prompts}",
        "--set",
        "ddpo.buffer_size=8",
        "--set",
        "ddpo.min_count=8",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(["--output-dir", str(straight), "--set", "train.epochs=3", *common])
    run(["--output-dir", str(split), "--set", "train.epochs=2", *common])
    run(["--output-dir", str(split), "--set", "train.epochs=3", "--resume", "latest", *common])
    pa, pb = unet_params(straight / "checkpoints" / "epoch_0002"), unet_params(split / "checkpoints" / "epoch_0002")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    proc = run(["--output-dir", str(split), "--set", "train.epochs=4", "--resume", "latest", *SMALL], check=False)
    assert proc.returncode != 0 and "algo.name: checkpoint 'ddpo', this run 'prdp'" in proc.stderr


@pytest.mark.slow
def test_lora_run_starts_at_the_reference_and_saves_only_adapters(tmp_path):
    out = tmp_path / "lora"
    run(
        [
            "--output-dir",
            str(out),
            *SMALL,
            "--set",
            "train.epochs=2",
            "--set",
            "model.lora_rank=2",
            "--set",
            "train.lr=0.01",
            "--set",
            "train.steps_per_epoch=1",
        ]
    )  # later --set wins: K = 1
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_frac"] == 0.0  # step 1 of epoch 0: theta = ref exactly
    assert rows[1]["kl"] != 0.0  # the adapters moved
    ckpt = out / "checkpoints" / "epoch_0001"
    assert (ckpt / "unet_lora" / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "unet").exists()


AUTO = ["--set", "train.images_per_chunk=auto", "--set", "train.steps_per_chunk=auto"]


@pytest.mark.slow
def test_auto_chunks_are_printed_recorded_and_train_like_the_sizes_they_resolve_to(tmp_path):
    """On a CPU 'auto' is all of the rank's 16 images x 1 step; the run equals one given 16 x 1 explicitly
    (chunking exactness itself: tests/test_twopass.py). The noise metric is exactly 0 here: pass 1 and the
    sampler compute the same 16-image batches (sampler.batch_size 32 >= 16 images)."""
    common = [*SMALL, "--set", "train.epochs=3", "--set", "output.noise_every=2", "--set", "output.save_every=3"]
    proc = run(["--output-dir", str(tmp_path / "auto"), *common, *AUTO])  # later --set wins over SMALL's 8 x 2
    lines = proc.stdout.splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.startswith("batch arithmetic: ")]
    assert json.loads(lines[i].partition(": ")[2])["backward_calls_per_step"] == 3  # T = 3 steps x 1 image chunk
    assert lines[i + 1] == (
        "chunk sizes: train.images_per_chunk=auto -> 16, train.steps_per_chunk=auto -> 1 "
        "(no device memory to fill: all of the rank's images x 1 step)"
    )
    assert sum(line.startswith("chunk sizes:") for line in lines) == 1 and "log-ratio noise" not in proc.stdout
    import yaml

    for path in (tmp_path / "auto" / "config.yaml", tmp_path / "auto" / "checkpoints" / "epoch_0002" / "config.yaml"):
        train = yaml.safe_load(path.read_text())["train"]
        assert (train["images_per_chunk"], train["steps_per_chunk"]) == (16, 1), path
    explicit = ["--set", "train.images_per_chunk=16", "--set", "train.steps_per_chunk=1"]
    run(["--output-dir", str(tmp_path / "explicit"), *common, *explicit])
    pa, pb = (unet_params(tmp_path / d / "checkpoints" / "epoch_0002") for d in ("auto", "explicit"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    rows = metrics(tmp_path / "auto")
    for ra, rb in zip(rows, metrics(tmp_path / "explicit")):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    assert [r["epoch"] for r in rows if "logratio_noise_rms" in r] == [0, 2]  # output.noise_every=2
    for r in (rows[0], rows[2]):
        assert r["logratio_noise_rms"] == r["logratio_noise_max"] == 0.0
        assert r["logratio_noise_rms_per_step"] == [0.0, 0.0, 0.0]  # T = 3


@pytest.mark.slow
def test_logratio_noise_is_measured_at_theta_old_and_warns_above_the_clip_range(tmp_path, monkeypatch, capsys):
    """In process, with pass 1's r shifted by a known per-step noise (0.01, 0.02, 0) nats: the metric reports it
    and rank 0 warns (it exceeds loss.clip_range = 1e-3). Unshifted, SMALL's 8 x 2 chunks are batches other than the
    sampler's 16 images x 1 step, so the CPU kernels may round otherwise: measured 0 here, and up to 9.8e-4 nats with
    3 x 2 chunks (|r| up to 3.3e3 nats: a few fp32 ulps), below the clip range either way."""
    from prdp_ds import train

    real, true_noise = train.policy_log_ratios, []
    shift = torch.tensor([0.01, 0.02, 0.0])

    def noisy(engine, traj, *args):
        r = real(engine, traj, *args)
        true_noise.append((r - traj.log_ratio_old).abs().max().item())
        return r + shift.to(r.device)

    monkeypatch.setattr(train, "policy_log_ratios", noisy)
    out = tmp_path / "out"
    train.main(["--preset", "tiny_demo", "--output-dir", str(out), *SMALL, "--set", "train.epochs=1"])
    assert len(true_noise) == 1 and true_noise[0] < 1e-3  # the noise pass runs once (epoch 0); prdp_step's own not
    (row,) = metrics(out)
    for got, want in zip(row["logratio_noise_rms_per_step"], shift.tolist()):
        assert got == pytest.approx(want, abs=1e-4)
    assert row["logratio_noise_rms"] == pytest.approx(math.sqrt((0.01**2 + 0.02**2) / 3), abs=1e-4)
    assert row["logratio_noise_max"] == pytest.approx(0.02, abs=1e-4)
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "log-ratio noise" in line]
    assert warning.startswith("warning: epoch 0: ") and "> loss.clip_range 0.001" in warning


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(BASELINES))
def test_baselines_train_the_same_on_one_and_two_ranks(tmp_path, algo):
    """GRPO's group advantages are local to a rank; DPOK's value minibatches are drawn from the world's transitions
    and each rank scores those it holds: 2 ranks take the same steps as 1 (ZeRO-2; the tolerance of the PRDP test)."""
    for ranks in (1, 2):
        args = ["--output-dir", str(tmp_path / f"r{ranks}"), "--config", str(REPO / "ds_configs" / "zero2.json")]
        args += ["--set", "train.epochs=1", *SMALL, *BASELINES[algo], "--set", "train.adam_eps=1e-3"]
        run(args, ranks, threads=1)
    ckpt = [tmp_path / f"r{r}" / "checkpoints" / "epoch_0000" for r in (1, 2)]
    p1, p2 = (unet_params(c) for c in ckpt)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=0.01 * 3e-4)
    if algo == "dpok":
        v1, v2 = (load_aux_state(c, "cpu")["net"] for c in ckpt)
        for k in v1:
            torch.testing.assert_close(v2[k], v1[k], rtol=1e-5, atol=1e-7)
    m1, m2 = metrics(tmp_path / "r1")[0], metrics(tmp_path / "r2")[0]
    keys = ("reward_mean", "loss", "kl", "kl_penalty", "adv_mean", "adv_std", "clip_frac")
    for key in keys + (("value_loss",) if algo == "dpok" else ()):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero3", "zero2_offload"])
@pytest.mark.parametrize("algo", list(BASELINES))
def test_baselines_with_lora_start_at_the_reference_and_save_only_adapters(tmp_path, algo, ds_config):
    out = tmp_path / algo
    lora = ["--set", "model.lora_rank=2", "--set", "train.lr=0.01", "--set", "train.steps_per_epoch=1"]
    run(["--output-dir", str(out), "--config", str(REPO / "ds_configs" / f"{ds_config}.json"), *SMALL,
         *BASELINES[algo], "--set", "train.epochs=2", *lora])  # fmt: skip
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_penalty"] == 0.0  # step 1 of epoch 0: theta = ref exactly
    assert rows[1]["kl"] != 0.0 and rows[1]["kl_penalty"] > 0  # the adapters moved
    ckpt = out / "checkpoints" / "epoch_0001"
    assert (ckpt / "unet_lora" / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "unet").exists()
    assert (ckpt / AUX_STATE).is_file() == (algo == "dpok")


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(BASELINES))
def test_baselines_resume_equals_a_straight_run(tmp_path, algo):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(["--output-dir", str(straight), "--set", "train.epochs=3", *SMALL, *BASELINES[algo]])
    run(["--output-dir", str(split), "--set", "train.epochs=2", *SMALL, *BASELINES[algo]])
    run(["--output-dir", str(split), "--set", "train.epochs=3", "--resume", "latest", *SMALL, *BASELINES[algo]])
    a, b = metrics(straight), metrics(split)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in b
    ]
    ckpt = [d / "checkpoints" / "epoch_0002" for d in (straight, split)]
    pa, pb = (unet_params(c) for c in ckpt)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    if algo == "dpok":  # and the value function, with its optimizer's state
        va, vb = (load_aux_state(c, "cpu")["net"] for c in ckpt)
        assert all(torch.equal(va[k], vb[k]) for k in va)


FLOW = {  # the flow SDE policy families, FLUX with an SDE window (its last step the ODE's)
    "tiny_sd3": ["--set", "model.pretrained=tiny_sd3"],
    "tiny_flux": ["--set", "model.pretrained=tiny_flux", "--set", "sampler.sde_steps=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family,ds_config", [("tiny_sd3", "zero2"), ("tiny_flux", "zero3")])
def test_flow_models_train_the_same_on_one_and_two_ranks(tmp_path, family, ds_config):
    """SD3's and FLUX's transformers through the trainer: 1 and 2 ranks take the same steps (the UNet test's rule)."""
    for ranks in (1, 2):
        args = ["--output-dir", str(tmp_path / f"r{ranks}"), "--config", str(REPO / "ds_configs" / f"{ds_config}.json")]
        args += ["--set", "train.epochs=1", *SMALL, *FLOW[family], "--set", "train.adam_eps=1e-3"]
        run(args, ranks, threads=1)
    p1, p2 = (unet_params(tmp_path / f"r{r}" / "checkpoints" / "epoch_0000") for r in (1, 2))
    from prdp_ds.models import load_models

    base = load_models(family).unet.state_dict()
    assert max((p1[k] - base[k]).abs().max().item() for k in p1) > 1e-5, "training should move the parameters"
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=0.01 * 3e-4)
    m1, m2 = metrics(tmp_path / "r1")[0], metrics(tmp_path / "r2")[0]
    assert m1["logratio_noise_max"] == 0 and len(m1["logratio_noise_rms_per_step"]) == (2 if "flux" in family else 3)
    for key in ("reward_mean", "loss", "kl", "clip_frac", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("family,algo", [("tiny_sd3", "prdp"), ("tiny_flux", "dpok")])
def test_flow_models_resume_equals_a_straight_run(tmp_path, family, algo):
    """PRDP and DPOK (its value net on a flow latent, with an SDE window). DDPO's and GRPO's steps are the same code
    for every family (their tests run on the UNet; the flow chunk path: test_twopass)."""
    common = [*SMALL, *FLOW[family], "--set", f"algo.name={algo}", *BASELINES.get(algo, [])]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(["--output-dir", str(straight), "--set", "train.epochs=2", *common])
    run(["--output-dir", str(split), "--set", "train.epochs=1", *common])
    run(["--output-dir", str(split), "--set", "train.epochs=2", "--resume", "latest", *common])
    a, b = metrics(straight), metrics(split)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in b
    ]
    pa, pb = (unet_params(d / "checkpoints" / "epoch_0001") for d in (straight, split))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(math.isfinite(r["loss"]) for r in a) and a[1]["kl"] != 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny_flux"])
def test_flow_lora_on_zero3_starts_at_the_reference_and_saves_only_adapters(tmp_path, family):
    out = tmp_path / family
    lora = ["--set", "model.lora_rank=2", "--set", "train.lr=0.01", "--set", "train.steps_per_epoch=1"]
    run(["--output-dir", str(out), "--config", str(REPO / "ds_configs" / "zero3.json"), *SMALL, *FLOW[family],
         "--set", "train.epochs=2", *lora])  # fmt: skip
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_frac"] == 0.0  # step 1 of epoch 0: theta = ref exactly
    assert rows[1]["kl"] != 0.0  # the adapters moved
    ckpt = out / "checkpoints" / "epoch_0001"
    assert (ckpt / "unet_lora" / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "unet").exists()
