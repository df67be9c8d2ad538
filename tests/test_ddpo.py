"""DDPO baseline: DDPO's per-prompt statistics, and per-chunk backward == one full graph."""

import copy

import numpy as np
import pytest
import torch
from helpers import B, G, _cfg, _engine, _rel, full_graph_log_ratios

from prdp_ds.ddpo import PerPromptStatTracker, advantages, batch_advantages, ddpo_step, ppo_loss


class DDPOTracker:
    """DDPO's reference PerPromptStatTracker (ddpo-pytorch, numpy), transcribed as is."""

    def __init__(self, buffer_size, min_count):
        from collections import deque

        self.buffer_size, self.min_count, self.stats, self._deque = buffer_size, min_count, {}, deque

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.array(rewards)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = self._deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(self.stats[prompt]), np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


@pytest.mark.parametrize("buffer_size,min_count,per_prompt", [(16, 16, 3), (5, 2, 4), (7, 7, 1)])
def test_tracker_matches_ddpo_reference_over_epochs(buffer_size, min_count, per_prompt):
    gen = np.random.default_rng(0)
    ours, ref = PerPromptStatTracker(buffer_size, min_count), DDPOTracker(buffer_size, min_count)
    names = ["a cat", "a dog", "a fox"]
    for epoch in range(6):
        prompts = [names[i] for i in gen.integers(0, 3, size=2) for _ in range(per_prompt)]
        rewards = gen.normal(loc=epoch, size=len(prompts))
        got = ours.update(prompts, torch.tensor(rewards, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, ref.update(prompts, rewards), rtol=1e-12, atol=1e-12)
    restored = PerPromptStatTracker(buffer_size, min_count)
    restored.load_state_dict(ours.state_dict())
    prompts, rewards = ["a cat"] * 3, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    assert torch.equal(restored.update(prompts, rewards), ours.update(prompts, rewards))


def test_tracker_refuses_bad_sizes():
    with pytest.raises(ValueError, match="ddpo.min_count"):
        PerPromptStatTracker(4, 8)


def test_batch_advantages_without_per_prompt_norm():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    a = batch_advantages(r)
    assert abs(a.mean().item()) < 1e-12 and abs(a.std(unbiased=False).item() - 1) < 1e-5


def test_advantages_are_clipped_and_nan_rewards_leave_the_tracker_untouched(rollout):
    _, traj, rewards = rollout
    cfg = _cfg(2, 3, 1e-3)
    cfg.ddpo.adv_clip, cfg.ddpo.min_count, cfg.ddpo.buffer_size = 0.5, 1, 4
    tracker = PerPromptStatTracker(cfg.ddpo.buffer_size, cfg.ddpo.min_count)
    adv = advantages(tracker, traj, rewards, cfg.ddpo)
    assert adv.shape == (G, B) and adv.abs().max().item() == 0.5
    before = tracker.state_dict()
    bad = rewards.clone()
    bad[1, 1] = float("nan")
    assert torch.isnan(advantages(tracker, traj, bad, cfg.ddpo)).all()
    assert tracker.state_dict() == before


def full_graph_ddpo_grad(unet, models, traj, adv, cfg):
    """DDPO's loss through every UNet call of every image in one graph, one backward."""
    r = full_graph_log_ratios(unet, models, traj, against="eps_old") / traj.latents[0, 0, 0].numel()
    ppo_loss(r, adv.reshape(-1, 1), cfg.ddpo.clip_range).mean().backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters()])


@pytest.mark.parametrize("steps_per_chunk,images_per_chunk", [(1, 2), (3, 4), (4, 6)])
def test_per_chunk_backward_equals_full_graph_over_two_steps(world, rollout, steps_per_chunk, images_per_chunk):
    models, traj, _ = rollout
    cfg = _cfg(steps_per_chunk, images_per_chunk, clip_range=1e-3)
    cfg.ddpo.clip_range = 2e-5  # the second step leaves some steps' ratios outside the clip
    adv = torch.tensor([[1.5, -0.5, 0.2], [-1.0, 0.8, -0.3]])
    lr = 3e-4
    engine, opt = _engine(models, cfg, lr)
    ref = copy.deepcopy(models.unet)
    for k in range(2):
        stats = ddpo_step(
            engine, traj, adv, models.encode_prompts(traj.flat_prompts), models.encode_prompts([""]), cfg, "torch"
        )
        assert "skipped" not in stats
        want = full_graph_ddpo_grad(ref, models, traj, adv, cfg)
        assert len(opt.seen) == k + 1
        assert _rel(opt.seen[k][: want.numel()], want) < 1e-4, f"step {k}: per-chunk gradient differs from full graph"
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=-lr)
    assert 0 < stats["clip_frac"] < 1, stats
    assert abs(stats["kl"]) > 0


def test_ddpo_skips_on_nan_advantages(world, rollout):
    models, traj, _ = rollout
    cfg = _cfg(2, 3, 1e-3)
    engine, opt = _engine(models, cfg, 1e-4)
    adv = torch.zeros(G, B)
    adv[0, 1] = float("nan")
    stats = ddpo_step(
        engine, traj, adv, models.encode_prompts(traj.flat_prompts), models.encode_prompts([""]), cfg, "torch"
    )
    assert stats["skipped"] == "reward" and opt.seen == []
