"""GRPO baseline: group advantages, the published loss, and per-chunk backward == one full graph."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import SMALL, B, G, _cfg, _engine, _rel, full_graph_surrogate_grad, metrics, run

from prdp_ds.grpo import group_advantages, grpo_step, grpo_terms, step_kl, step_subset
from prdp_ds.twopass import chunk_log_ratios_eps, chunks

DTYPES = (torch.float64, torch.float32)


def _grpo_cfg(steps_per_chunk, images_per_chunk, kl_weight=0.0, step_fraction=1.0):
    cfg = _cfg(steps_per_chunk, images_per_chunk, clip_range=1e-3)
    cfg.algo.name = "grpo"
    cfg.grpo.kl_weight, cfg.grpo.step_fraction = kl_weight, step_fraction
    return cfg


@pytest.mark.parametrize("shape", [(3, 5), (1, 7), (4, 2)])
def test_group_advantages_match_an_fp64_evaluation(shape):
    gen = np.random.default_rng(sum(shape))
    rewards = gen.normal(size=shape)
    rewards[0] = rewards[0, 0]  # a constant group: advantages 0
    want = np.clip((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4), -1.5, 1.5)
    got = group_advantages(torch.tensor(rewards, dtype=torch.float32), 1.5)
    assert got.dtype == torch.float32 and np.abs(got.numpy() - want).max() < 1e-6
    assert (got[0] == 0).all()
    bad = torch.tensor(rewards, dtype=torch.float32)
    bad[-1, -1] = float("inf")
    assert torch.isnan(group_advantages(bad, 1.5)).all()


def test_loss_terms_equal_the_published_formula_in_fp64():
    """A hand-made (G, B, T) = (2, 3, 2) input: PPO's clipped surrogate + beta ||b (e - e_ref)||^2 / (2 s^2)."""
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, -1.0]])
    r = torch.tensor([[1e-3, -2e-3], [0.0, 5e-4], [-1e-4, 3e-3], [2e-3, 2e-3], [-3e-3, 0.0], [1e-5, -1e-5]])
    gen = torch.Generator().manual_seed(0)
    eps, eps_ref = torch.randn(6, 2, 4, 4, generator=gen), torch.randn(6, 2, 4, 4, generator=gen)
    b, sigma = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.1])
    clip, beta = 1e-3, 0.07
    adv = group_advantages(rewards, 5.0).reshape(-1, 1)
    kl = step_kl(eps.flatten(0, 1), eps_ref.flatten(0, 1), b.repeat(6), sigma.repeat(6), "mean").reshape(6, 2)
    got = grpo_terms(r, adv, kl, clip, beta).mean().item()
    want = 0.0
    rw = rewards.double().numpy()
    for i in range(6):
        grp = rw[i // 3]
        a = (grp[i % 3] - grp.mean()) / (grp.std() + 1e-4)
        for t in range(2):
            rho = math.exp(r[i, t].item())
            surrogate = min(a * rho, a * min(max(rho, 1 - clip), 1 + clip))
            d = b[t].item() * (eps[i, t].double() - eps_ref[i, t].double())
            want += -surrogate + beta * (d**2).mean().item() / (2 * sigma[t].item() ** 2)
    assert abs(got - want / 12) <= 1e-6 * abs(want / 12)


def test_step_subsets_depend_only_on_seed_epoch_and_step():
    cfg = _grpo_cfg(1, 2, step_fraction=0.6)
    cfg.sampler.num_steps = 10
    s = step_subset(cfg, 3, 1)
    assert s.tolist() == sorted(s.tolist()) and s.numel() == 6 and len(set(s.tolist())) == 6
    assert torch.equal(s, step_subset(cfg, 3, 1)) and not torch.equal(s, step_subset(cfg, 3, 0))
    cfg.grpo.step_fraction = 1.0
    assert step_subset(cfg, 3, 1).tolist() == list(range(10))


@pytest.mark.parametrize("kl_weight", [0.0, 0.05])
@pytest.mark.parametrize("step_fraction", [1.0, 0.5])
@pytest.mark.parametrize("steps_per_chunk,images_per_chunk", [(1, 2), (3, 4)])
def test_per_chunk_backward_equals_full_graph_over_two_steps(
    rollout, kl_weight, step_fraction, steps_per_chunk, images_per_chunk
):
    models, traj, rewards = rollout
    cfg = _grpo_cfg(steps_per_chunk, images_per_chunk, kl_weight, step_fraction)
    cfg.grpo.clip_range = 2e-5  # the second step leaves some steps' ratios outside the clip
    adv = group_advantages(rewards, cfg.grpo.adv_clip)
    engine, opt = _engine(models, cfg, lr=3e-4)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    terms = lambda r, a, kl: grpo_terms(r, a, kl, cfg.grpo.clip_range, cfg.grpo.kl_weight)  # noqa: E731
    clipped = 0.0
    for k in range(2):
        policy = copy.deepcopy(engine.module)  # theta before this step
        subset = step_subset(cfg, 0, k)
        stats = grpo_step(engine, traj, adv, cond, uncond, cfg, "torch", subset)
        assert "skipped" not in stats and stats["steps_trained"] == subset.numel() == max(1, int(4 * step_fraction))
        want, ref32 = (full_graph_surrogate_grad(policy, models, traj, adv, terms, subset, d) for d in DTYPES)
        got = opt.seen[k][: want.numel()].double()
        assert _rel(got, want) <= 2 * _rel(ref32, want) + 1e-6, f"step {k}: per-chunk gradient differs"
        clipped = max(clipped, stats["clip_frac"])
    assert len(opt.seen) == 2 and 0 < clipped < 1
    assert stats["kl_penalty"] > 0  # computed (and logged) whatever its weight: the policy moved off the reference
    assert abs(stats["adv_mean"]) < 1e-6 and stats["adv_std"] > 0.9


def test_kl_penalty_and_its_gradient_are_exactly_zero_at_the_reference(rollout):
    """Policy = reference: eps_ref set to the policy's own guided prediction, recomputed as grpo_step chunks it."""
    models, traj, _ = rollout
    cfg = _grpo_cfg(2, 4, kl_weight=1.0, step_fraction=0.5)
    engine, opt = _engine(models, cfg, lr=1e-3)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    subset = step_subset(cfg, 0, 0)
    eps_ref = traj.flat("eps_ref").clone()
    with torch.no_grad():
        for images, steps in chunks(cfg, G * B, subset):
            _, eps = chunk_log_ratios_eps(engine, traj, cond, uncond, images, steps, cfg, "torch")
            eps_ref[images, steps] = eps.reshape(images.stop - images.start, steps.numel(), *eps.shape[1:])
    at_ref = dataclasses.replace(traj, eps_ref=eps_ref.reshape(traj.eps_ref.shape))
    stats = grpo_step(engine, at_ref, torch.zeros(G, B), cond, uncond, cfg, "torch", subset)
    assert "skipped" not in stats and stats["kl_penalty"] == 0.0 and stats["loss"] == 0.0
    assert len(opt.seen) == 1 and torch.count_nonzero(opt.seen[0]) == 0


def test_grpo_skips_on_nan_advantages(rollout):
    models, traj, _ = rollout
    cfg = _grpo_cfg(2, 3)
    engine, opt = _engine(models, cfg, 1e-4)
    adv = torch.zeros(G, B)
    adv[0, 1] = float("nan")
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    stats = grpo_step(engine, traj, adv, cond, uncond, cfg, "torch", step_subset(cfg, 0, 0))
    assert stats["skipped"] == "reward" and opt.seen == []


GRPO = ["--set", "algo.name=grpo", "--set", "grpo.kl_weight=0.01", "--set", "grpo.step_fraction=0.67"]


def test_grpo_trains_end_to_end_with_finite_metrics(tmp_path):
    run(["--output-dir", str(tmp_path), "--set", "train.epochs=1", *SMALL, *GRPO])
    (row,) = metrics(tmp_path)
    for key in ("loss", "policy_loss", "clip_frac", "kl", "kl_penalty", "adv_mean", "adv_std", "grad_norm"):
        assert math.isfinite(row[key]), (key, row)
    assert row["steps_applied"] == 2 and row["steps_trained"] == 2 and "pred_err" not in row
