"""The two-pass step through a DeepSpeed ZeRO-2 engine equals full-graph autograd (docs/design.md §7, §8)."""

import copy

import pytest
import torch
from helpers import B, G, RecordingSGD, T, _cfg, _engine, _rel, full_graph_log_ratios

from prdp_ds.engine import build_ds_config, make_engine
from prdp_ds.loss import rdp_loss
from prdp_ds.twopass import policy_log_ratios, prdp_step


def full_graph_grad(unet, models, traj, rewards, cfg):
    """Autograd through all T UNet calls of every image, the loss of docs/design.md §5, one backward."""
    r = full_graph_log_ratios(unet, models, traj).reshape(traj.log_ratio_old.shape)
    rdp_loss(r, traj.log_ratio_old, rewards, cfg.loss.clip_range, cfg.loss.kl_weight).backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters()])


@pytest.mark.parametrize(
    "steps_per_chunk,images_per_chunk,impl,checkpointing",
    [
        (1, 2, "torch", False),
        (3, 6, "torch", False),
        (4, 4, "torch", False),
        (3, 4, "triton", False),
        (2, 3, "torch", True),
    ],
)
def test_two_pass_equals_full_graph_over_two_steps(
    world, rollout, steps_per_chunk, images_per_chunk, impl, checkpointing, monkeypatch
):
    models, traj, rewards = rollout
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint,
        "checkpoint",
        lambda *a, **k: calls.append(k.get("use_reentrant")) or real_checkpoint(*a, **k),
    )
    cfg = _cfg(steps_per_chunk, images_per_chunk, clip_range=2e-3)
    lr = 1e-4
    engine, opt = _engine(models, cfg, lr, checkpointing=checkpointing)
    assert engine.gradient_accumulation_steps() == -(-G * B // images_per_chunk) * -(-T // steps_per_chunk)
    ref = copy.deepcopy(models.unet)
    for k in range(2):  # K = 2: the second step runs pass 1 at theta != theta_old
        stats = prdp_step(
            engine,
            traj,
            rewards,
            models.encode_prompts(traj.flat_prompts),
            models.encode_prompts([""]),
            cfg,
            impl,
            first_step=k == 0,
        )
        assert "skipped" not in stats
        want = full_graph_grad(ref, models, traj, rewards, cfg)
        got = opt.seen[k][: want.numel()]
        assert len(opt.seen) == k + 1, "exactly one optimizer step per prdp_step"
        assert _rel(got, want) < 1e-4, f"step {k}: two-pass gradient differs from full graph"
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=-lr)
    assert stats["clip_frac"] > 0, "the clip should be active on the second step"
    assert (len(calls) > 0) == checkpointing and all(c is False for c in calls), calls[:3]


def test_with_one_step_per_epoch_the_clip_changes_nothing(world, rollout):
    models, traj, rewards = rollout
    grads = []
    for clip in (0.0, 1e9):
        cfg = _cfg(2, 3, clip)
        engine, opt = _engine(models, cfg, 1e-4)
        prdp_step(
            engine,
            traj,
            rewards,
            models.encode_prompts(traj.flat_prompts),
            models.encode_prompts([""]),
            cfg,
            "torch",
            first_step=True,
        )
        grads.append(opt.seen[0])
    assert _rel(grads[0], grads[1]) < 1e-6
    second = []
    for clip in (0.0, 1e9):  # at a second step (theta != theta_old) the clip does change the gradient
        cfg = _cfg(2, 3, clip)
        engine, opt = _engine(
            models, cfg, 0.0, max_change=1e-4
        )  # a small first step: the clip holds the pairs it improved
        for k in range(2):
            prdp_step(
                engine,
                traj,
                rewards,
                models.encode_prompts(traj.flat_prompts),
                models.encode_prompts([""]),
                cfg,
                "torch",
                first_step=k == 0,
            )
        second.append(opt.seen[1])
    assert _rel(second[0], second[1]) > 1e-3


def test_non_finite_reward_or_loss_skips_the_step(world, rollout):
    models, traj, rewards = rollout
    cfg = _cfg(2, 3, 1e-3)
    engine, opt = _engine(models, cfg, 1e-4)
    bad = rewards.clone()
    bad[0, 0] = float("inf")
    stats = prdp_step(
        engine,
        traj,
        bad,
        models.encode_prompts(traj.flat_prompts),
        models.encode_prompts([""]),
        cfg,
        "torch",
        first_step=True,
    )
    assert stats["skipped"] == "reward" and opt.seen == []
    broken = copy.copy(traj)
    broken.log_ratio_old = traj.log_ratio_old.clone()
    broken.log_ratio_old[1, 2, 0] = float("nan")
    stats = prdp_step(
        engine,
        broken,
        rewards,
        models.encode_prompts(traj.flat_prompts),
        models.encode_prompts([""]),
        cfg,
        "torch",
        first_step=True,
    )
    assert stats["skipped"] == "loss" and opt.seen == []


@pytest.mark.parametrize("stage,bf16", [(1, False), (1, True), (2, False), (3, False)])
def test_non_finite_gradient_skips_the_step(world, rollout, stage, bf16):
    models, traj, rewards = rollout
    cfg = _cfg(2, 3, 1e-3)
    unet = copy.deepcopy(models.unet)
    target = unet.conv_out.weight
    target.register_hook(lambda grad: grad * float("nan"))  # finite loss and log-ratios, NaN gradient
    opt = RecordingSGD(unet.parameters(), 1e-4)
    ds = build_ds_config(
        {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}},
        cfg,
        1,
    )
    engine = make_engine(unet, ds, opt)  # bf16 at ZeRO-1: DeepSpeed's BF16 optimizer
    before = [p.detach().clone() for p in models.unet.parameters()]
    stats = prdp_step(
        engine,
        traj,
        rewards,
        models.encode_prompts(traj.flat_prompts),
        models.encode_prompts([""]),
        cfg,
        "torch",
        first_step=True,
    )
    assert stats["skipped"] == "grad_norm" and opt.seen == []
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        assert all(torch.equal(a.to(p.dtype), p) for a, p in zip(before, engine.module.parameters()))


MOVE = 1e-4  # the largest parameter change of an optimizer step


def _moved(models, scale=0.02, seed=2):
    """`models` with the policy moved away from its reference (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return models


@pytest.mark.parametrize(
    "family,window,impl",
    [
        ("tiny", (1, 3), "torch"),
        ("tiny_sd3", None, "torch"),
        ("tiny_sd3", (0, 3), "triton"),
        ("tiny_flux", None, "torch"),
        ("tiny_flux", (1, 2), "torch"),
        ("tiny_flux", (0, 4), "triton"),
    ],
)
def test_two_pass_equals_full_graph_for_each_policy_family_and_sde_window(family, window, impl):
    """The same exactness for the flow SDE policy (SD3's CFG pair, FLUX's distilled guidance: one call returned as
    both halves, through the torch path and the fused kernel) and for an SDE window: only the window's steps are
    recorded and trained, the loss's step mean is over them."""
    from prdp_ds.models import load_models
    from prdp_ds.sampler import image_seeds, sample

    models = _moved(load_models(family))
    traj = sample(models, ["a cat", "a red fox"], image_seeds(0, 0, [0, 1], B), T, 5.0, window=window)
    rewards = torch.tensor([[0.30, 0.10, 0.20], [0.05, 0.25, 0.15]])
    cfg = _cfg(2, 4, clip_range=0.5)
    if window is not None:
        cfg.sampler.sde_start, cfg.sampler.sde_steps = window[0], window[1] - window[0]
    assert traj.log_ratio_old.shape == (G, B, (window or (0, T))[1] - (window or (0, T))[0])
    assert traj.log_ratio_old.abs().min() > 0
    engine, opt = _engine(models, cfg, lr=None, max_change=MOVE)  # no parameter moves more than MOVE
    ref = copy.deepcopy(models.unet)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    for k in range(2):
        stats = prdp_step(engine, traj, rewards, cond, uncond, cfg, impl, first_step=k == 0)
        assert "skipped" not in stats
        exact = full_graph_grad(copy.deepcopy(ref).double(), models, traj, rewards.double(), cfg).double()
        fp32 = full_graph_grad(ref, models, traj, rewards, cfg).double()
        got = opt.seen[k][: fp32.numel()].double()
        # rule: the two-pass error <= 2x the fp32 full graph's + 1e-6 (relative to the gradient's norm)
        assert (got - exact).norm() <= 2 * (fp32 - exact).norm() + 1e-6 * exact.norm(), f"step {k}"
        with torch.no_grad():  # the engine's step size, on the full graph's gradient
            for p in ref.parameters():
                p.add_(p.grad, alpha=-MOVE / got.abs().max().item())
        moved = (policy_log_ratios(engine, traj, cond, uncond, cfg, "torch") - traj.log_ratio_old).abs()
        d = moved.flatten().sort().values
        m = d.numel() // 2  # the second step clips about half the ratios; no ratio near the clip's kink
        cfg.loss.clip_range = (d[m - 1] + d[m]).item() / 2
    assert 0 < stats["clip_frac"] < 1, "the clip should be active on the second step, on some of the ratios"
