"""DPOK baseline: the published loss, per-chunk backward == one full graph, the KL at the reference, the value
function (its gradient stays its own, its training, its checkpoint) and the trainer end to end."""

import copy
import dataclasses
import math

import pytest
import torch
from helpers import (
    SMALL,
    B,
    G,
    Payload,
    T,
    _cfg,
    _engine,
    _rel,
    full_graph_surrogate_grad,
    metrics,
    run,
)

from prdp_ds.checkpoint import AUX_STATE, UnsafeCheckpointError, load_aux_state
from prdp_ds.dpok import ValueFunction, dpok_step, dpok_terms, prompt_features
from prdp_ds.grpo import step_kl
from prdp_ds.twopass import chunk_log_ratios_eps, chunks

DTYPES = (torch.float64, torch.float32)


def _dpok_cfg(steps_per_chunk, images_per_chunk, kl_weight=0.01):
    cfg = _cfg(steps_per_chunk, images_per_chunk, clip_range=1e-3)
    cfg.algo.name = "dpok"
    cfg.dpok.kl_weight, cfg.dpok.value_batch_size, cfg.dpok.value_width = kl_weight, 7, 16
    return cfg


def _value(models, cfg):
    u = models.unet.config
    return ValueFunction(cfg, (u.in_channels, u.sample_size, u.sample_size), u.cross_attention_dim, "cpu")


def test_loss_terms_equal_the_published_formula_in_fp64():
    """A hand-made (G, B, T) = (2, 3, 2) input: -alpha (r - V) clip(rho, 1 - eps, 1 + eps) + beta KL_t, with
    KL_t = ||b (e - e_ref)||^2 / (2 s^2) per element (DPOK's loss on its clamped ratio)."""
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, -1.0]])
    values = torch.tensor([[0.3, 1.1], [2.5, -0.4], [3.0, 3.9], [0.0, 0.6], [0.7, 0.2], [-2.0, -1.0]])
    r = torch.tensor([[1e-3, -2e-3], [0.0, 5e-4], [-1e-4, 3e-3], [2e-3, 2e-3], [-3e-3, 0.0], [1e-5, -1e-5]])
    gen = torch.Generator().manual_seed(0)
    eps, eps_ref = torch.randn(6, 2, 4, 4, generator=gen), torch.randn(6, 2, 4, 4, generator=gen)
    b, sigma = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.1])
    clip, beta, alpha = 1e-3, 0.07, 10.0
    adv = alpha * (rewards.reshape(6, 1) - values)
    kl = step_kl(eps.flatten(0, 1), eps_ref.flatten(0, 1), b.repeat(6), sigma.repeat(6), "mean").reshape(6, 2)
    got = dpok_terms(r, adv, kl, clip, beta).mean().item()
    want = 0.0
    for i in range(6):
        for t in range(2):
            a = alpha * (rewards.reshape(-1)[i].item() - values[i, t].item())
            rho = min(max(math.exp(r[i, t].item()), 1 - clip), 1 + clip)
            d = b[t].item() * (eps[i, t].double() - eps_ref[i, t].double())
            want += -a * rho + beta * (d**2).mean().item() / (2 * sigma[t].item() ** 2)
    assert abs(got - want / 12) <= 1e-6 * abs(want / 12)


@pytest.mark.parametrize("kl_weight", [0.0, 0.05])
@pytest.mark.parametrize("steps_per_chunk,images_per_chunk", [(1, 2), (3, 4)])
def test_per_chunk_backward_equals_full_graph_over_two_steps(rollout, kl_weight, steps_per_chunk, images_per_chunk):
    models, traj, rewards = rollout
    cfg = _dpok_cfg(steps_per_chunk, images_per_chunk, kl_weight)
    cfg.dpok.clip_range = 1e-4  # DPOK's: the second step leaves some of the ratios outside the clip, not all
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    value = _value(models, cfg)
    value.fit(traj, cond, rewards, 0)
    adv = value.advantages(traj, cond, rewards)
    assert adv.shape == (G, B, T) and not adv.requires_grad
    engine, opt = _engine(models, cfg, lr=3e-4)
    d, clipped = cfg.dpok, 0.0
    terms = lambda r, a, kl: dpok_terms(r, a, kl, d.clip_range, d.kl_weight)  # noqa: E731
    for k in range(2):
        policy = copy.deepcopy(engine.module)  # theta before this step
        stats = dpok_step(engine, traj, adv, cond, uncond, cfg, "torch")
        assert "skipped" not in stats and stats["steps_trained"] == T
        subset = torch.arange(T)
        want, ref32 = (full_graph_surrogate_grad(policy, models, traj, adv, terms, subset, dt) for dt in DTYPES)
        got = opt.seen[k][: want.numel()].double()
        assert _rel(got, want) <= 2 * _rel(ref32, want) + 1e-6, f"step {k}: per-chunk gradient differs"
        clipped = max(clipped, stats["clip_frac"])
    assert len(opt.seen) == 2 and 0 < clipped < 1 and stats["kl_penalty"] > 0
    assert stats["adv_mean"] == pytest.approx(adv.double().mean().item(), rel=1e-6)


def test_kl_penalty_and_its_gradient_are_exactly_zero_at_the_reference(rollout):
    """Policy = reference and zero advantages: eps_ref set to the policy's own guided prediction, recomputed as
    dpok_step chunks it; the KL term, the loss and the gradient are exactly 0."""
    models, traj, _ = rollout
    cfg = _dpok_cfg(2, 4, kl_weight=1.0)
    engine, opt = _engine(models, cfg, lr=1e-3)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    eps_ref = traj.flat("eps_ref").clone()
    with torch.no_grad():
        for images, steps in chunks(cfg, G * B):
            _, eps = chunk_log_ratios_eps(engine, traj, cond, uncond, images, steps, cfg, "torch")
            n = images.stop - images.start
            eps_ref[images, steps] = eps.reshape(n, -1, *eps.shape[1:])
    at_ref = dataclasses.replace(traj, eps_ref=eps_ref.reshape(traj.eps_ref.shape))
    stats = dpok_step(engine, at_ref, torch.zeros(G, B, T), cond, uncond, cfg, "torch")
    assert "skipped" not in stats and stats["kl_penalty"] == 0.0 and stats["loss"] == 0.0
    assert len(opt.seen) == 1 and torch.count_nonzero(opt.seen[0]) == 0


def _setup(rollout):
    """The rollout's pieces, a DPOK engine (lr 1e-4, recording its gradients), the text states and a value function."""
    models, traj, rewards = rollout
    cfg = _dpok_cfg(2, 3)
    engine, opt = _engine(models, cfg, lr=1e-4)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    return traj, rewards, cfg, engine, opt, cond, uncond, _value(models, cfg)


def test_the_value_functions_gradient_does_not_reach_the_policy_nor_the_policys_the_value(rollout):
    traj, rewards, cfg, engine, opt, cond, uncond, value = _setup(rollout)
    before = {k: v.clone() for k, v in value.net.state_dict().items()}
    stats = value.fit(traj, cond, rewards, 0)
    assert math.isfinite(stats["value_loss"]) and stats["value_loss"] > 0
    assert all(p.grad is None for p in engine.module.parameters()), "the value loss reached the policy"
    moved = {k: v.clone() for k, v in value.net.state_dict().items()}
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    adv = value.advantages(traj, cond, rewards)
    dpok_step(engine, traj, adv, cond, uncond, cfg, "torch")
    assert len(opt.seen) == 1
    assert all(p.grad is None for p in value.net.parameters()), "the policy loss reached the value function"
    assert all(torch.equal(moved[k], v) for k, v in value.net.state_dict().items())


def test_the_value_function_learns_the_reward_and_draws_its_minibatches_from_seed_and_epoch(rollout):
    models, traj, rewards = rollout
    cfg = _dpok_cfg(2, 3)
    cfg.dpok.value_lr, cfg.dpok.value_batch_size = 3e-3, 64
    cond = models.encode_prompts(traj.flat_prompts)
    value, twin = _value(models, cfg), _value(models, cfg)
    losses = [value.fit(traj, cond, rewards, epoch)["value_loss"] for epoch in range(60)]
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    for epoch in range(60):
        twin.fit(traj, cond, rewards, epoch)
    assert all(torch.equal(a, b) for a, b in zip(value.net.parameters(), twin.net.parameters()))
    drawn = value._draw(3, 1, 100, 10).tolist()
    assert drawn == twin._draw(3, 1, 100, 10).tolist() and drawn != value._draw(3, 2, 100, 10).tolist()
    cfg.dpok.value_updates = 3  # three AdamW steps in one epoch, each on its own minibatches
    three = _value(models, cfg)
    three.fit(traj, cond, rewards, 0)
    assert three.opt.state_dict()["state"][0]["step"] == 3
    assert prompt_features(cond).shape == (G * B, cond.shape[2])


def test_non_finite_rewards_skip_the_value_step_and_the_policy_step(rollout):
    traj, rewards, cfg, engine, opt, cond, uncond, value = _setup(rollout)
    bad = rewards.clone()
    bad[1, 2] = float("nan")
    before = [p.clone() for p in value.net.parameters()]
    assert math.isnan(value.fit(traj, cond, bad, 0)["value_loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, value.net.parameters()))
    stats = dpok_step(engine, traj, value.advantages(traj, cond, bad), cond, uncond, cfg, "torch")
    assert stats["skipped"] == "reward" and opt.seen == []


def test_the_value_state_loads_as_weights_only_and_a_pickle_is_refused(tmp_path, rollout):
    models, traj, rewards = rollout
    cfg = _dpok_cfg(2, 3)
    value = _value(models, cfg)
    value.fit(traj, models.encode_prompts(traj.flat_prompts), rewards, 0)
    torch.save(value.state_dict(), tmp_path / AUX_STATE)
    twin = _value(models, cfg)
    twin.load_state_dict(load_aux_state(tmp_path, "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(value.net.parameters(), twin.net.parameters()))
    assert twin.opt.state_dict()["state"][0]["step"] == 1
    torch.save({"net": Payload(str(tmp_path / "ran"))}, tmp_path / AUX_STATE)
    with pytest.raises(UnsafeCheckpointError, match=AUX_STATE):
        load_aux_state(tmp_path, "cpu")
    assert not (tmp_path / "ran").exists()


DPOK = ["--set", "algo.name=dpok", "--set", "dpok.value_batch_size=16", "--set", "dpok.value_width=32"]


def test_dpok_trains_end_to_end_with_finite_metrics_and_checkpoints_its_value_function(tmp_path):
    run(["--output-dir", str(tmp_path), "--set", "train.epochs=1", *SMALL, *DPOK])
    (row,) = metrics(tmp_path)
    keys = ("loss", "policy_loss", "clip_frac", "kl", "kl_penalty", "adv_mean", "adv_std", "grad_norm", "value_loss")
    for key in keys:
        assert math.isfinite(row[key]), (key, row)
    assert row["steps_applied"] == 2 and row["steps_trained"] == 3 and "pred_err" not in row
    state = load_aux_state(tmp_path / "checkpoints" / "epoch_0000", "cpu")
    assert set(state) == {"net", "opt"} and state["opt"]["state"][0]["step"] == 1
