"""The DDPO baseline (Black et al. 2023) on PRDP's sampler, rewards, engine and logs (docs/design.md §9).

Advantages A_i = (r_i - mu) / (sd + 1e-6), clipped to [-adv_clip, adv_clip]; mu, sd from the prompt's
last `buffer_size` rewards (the world's epoch batch until it holds `min_count`), or from the batch when
ddpo.per_prompt_norm is off. Every rank computes the same advantages from the world's rewards, so the
tracker state is identical everywhere. With rho_{i,t} = exp(log pi_theta - log pi_old) (cancellation-free,
against the recorded eps_old, in ddpo.reduction units) the loss is PPO's clipped surrogate

    L = mean_{i,t} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps)),

a sum of per-(i, t) terms: each chunk of (images x steps) is backpropagated on its own, exactly, with
DeepSpeed accumulation as in PRDP's pass 2 (no pass 1). K optimizer steps per epoch, as PRDP.
"""

import math
from collections import deque

import torch
import torch.distributed as dist

from prdp_ds.twopass import all_reduce, chunk_log_ratios, chunks

STD_EPS = 1e-6  # DDPO's guard on a constant-reward prompt


class PerPromptStatTracker:
    """The last `buffer_size` rewards of every prompt seen (DDPO's PerPromptStatTracker)."""

    def __init__(self, buffer_size, min_count):
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"ddpo.buffer_size must be >= 1 and 1 <= ddpo.min_count <= ddpo.buffer_size; "
                f"got buffer_size={buffer_size}, min_count={min_count}"
            )
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history = {}

    def update(self, prompts, rewards):
        """prompts: n strings, rewards: (n,) float64 -> (n,) standardized rewards; records them."""
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False) + STD_EPS
        out = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # first-seen order: deterministic
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                h = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = h.mean(), h.std(unbiased=False) + STD_EPS
            out[idx] = (rewards[idx] - mean) / std
        return out

    def state_dict(self):
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "history": {p: list(buf) for p, buf in self.history.items()},
        }

    def load_state_dict(self, state):
        self.history = {p: deque(values, maxlen=self.buffer_size) for p, values in state["history"].items()}


def batch_advantages(rewards):
    """The no-per-prompt-normalization ablation: (n,) -> standardized by the batch's statistics."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + STD_EPS)


def _gather_world(prompts, rewards):
    """This rank's flat prompts and (n,) rewards -> the world's, in rank order (= global group order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(prompts), rewards
    world = dist.get_world_size()
    all_prompts = [None] * world
    dist.all_gather_object(all_prompts, list(prompts))
    parts = [torch.empty_like(rewards) for _ in range(world)]
    dist.all_gather(parts, rewards.contiguous())
    return [p for rank_prompts in all_prompts for p in rank_prompts], torch.cat(parts)


def advantages(tracker, traj, rewards, dcfg):
    """This rank's (G, B) advantages, clipped. The world's rewards update `tracker` (when
    ddpo.per_prompt_norm) only if all are finite; otherwise every rank gets NaN advantages."""
    G, B = rewards.shape
    prompts, world_rewards = _gather_world(traj.flat_prompts, rewards.reshape(-1).double())
    if not torch.isfinite(world_rewards).all():
        return torch.full_like(rewards, float("nan"))
    adv = tracker.update(prompts, world_rewards.cpu()) if dcfg.per_prompt_norm else batch_advantages(world_rewards)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = adv.reshape(-1)[rank * G * B : (rank + 1) * G * B].reshape(G, B)
    return mine.clamp(-dcfg.adv_clip, dcfg.adv_clip).to(device=rewards.device, dtype=torch.float32)


def ppo_loss(log_ratio, adv, clip_range):
    """Per-element PPO surrogate: log_ratio (n, k) = log pi_theta - log pi_old, adv (n, 1) -> (n, k)."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))


def finite_everywhere(adv):
    """Whether every rank's advantages are finite (collective): a step skipped anywhere is skipped everywhere."""
    return all_reduce(torch.isfinite(adv).all().float().reshape(1), dist.ReduceOp.MIN).item() == 1.0


def unit_factor(traj, reduction, cfg):
    """The factor taking a log-ratio in cfg.loss.reduction units to `reduction` units ('sum' or 'mean' over the
    latent elements of one step)."""
    elements = math.prod(traj.latents.shape[3:])
    return 1.0 if reduction == cfg.loss.reduction else (1 / elements if reduction == "mean" else elements)


def ddpo_step(engine, traj, adv, cond, uncond, cfg, impl):
    """One DDPO optimizer step over this rank's whole rollout: per chunk, recompute log pi_theta -
    log pi_old with grad and backprop its share of the loss; then DeepSpeed steps.

    adv: (G, B) fp32 advantages. Returns a dict of floats like prdp_step's ('skipped' names what was
    non-finite: reward, or grad_norm)."""
    G, B, T = traj.log_ratio_old.shape
    d = cfg.ddpo
    if not finite_everywhere(adv):
        return {"loss": float("nan"), "skipped": "reward"}
    to_ddpo = unit_factor(traj, d.reduction, cfg)
    flat_adv, r_old = adv.reshape(G * B, 1), traj.log_ratio_old.reshape(G * B, T)
    n = G * B * T
    sums = torch.zeros(4, dtype=torch.float64, device=adv.device)  # loss, clipped, log-ratio to ref, bad
    for images, steps in chunks(cfg, G * B):
        r = chunk_log_ratios(engine, traj, cond, uncond, images, steps, cfg, impl, against="eps_old")
        loss = ppo_loss(r * to_ddpo, flat_adv[images], d.clip_range).sum() / n
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # as in prdp_step: one optimizer step, and at ZeRO-1 one reduction, at the last chunk
        r = r.detach()
        sums += torch.stack(
            [
                loss.detach().double(),
                ((torch.exp(r * to_ddpo) - 1).abs() > d.clip_range).sum().double(),
                (r + r_old[images, steps]).sum().double(),
                (~torch.isfinite(r)).any().double(),
            ]
        )
    return step_record(engine, sums, n)[0]


def step_record(engine, sums, n):
    """A ratio objective's step record from this rank's float64 sums [loss, clipped terms, log-ratio to ref, bad
    chunks, ...] over its n (image, step) terms -> (record, the world's sums, world size). Collective: all-reduces
    the sums; 'skipped' is set when any rank saw a non-finite log-ratio or the gradient norm is not finite."""
    sums = all_reduce(sums)
    world = dist.get_world_size() if dist.is_initialized() else 1
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    out = {
        "loss": sums[0].item() / world,
        "clip_frac": sums[1].item() / (n * world),
        "kl": sums[2].item() / (n * world),
        "grad_norm": grad_norm,
        "lr": engine.get_lr()[0],
    }
    if sums[3].item() > 0 or not math.isfinite(grad_norm):
        out["skipped"] = "grad_norm"
    return out, sums, world
