"""The two-pass step through a DeepSpeed ZeRO-2 engine equals full-graph autograd (docs/design.md §7, §8)."""

import copy

import pytest
import torch
from helpers import B, G, RecordingSGD, T, _cfg, _engine, _rel, full_graph_log_ratios

from prdp_ds.engine import build_ds_config, make_engine
from prdp_ds.loss import rdp_loss
from prdp_ds.twopass import prdp_step


def full_graph_grad(unet, models, traj, rewards, cfg):
    """Autograd through all T UNet calls of every image, the loss of docs/design.md §5, one backward."""
    r = full_graph_log_ratios(unet, models, traj).reshape(G, B, T)
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
