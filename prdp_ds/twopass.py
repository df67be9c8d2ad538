"""One PRDP optimizer step with exact, memory-bounded backprop over whole trajectories (docs/design.md §7, §8).

The loss couples all T steps of an image (R_i is a mean over t), so per-step backward is wrong
and one graph through T UNet calls does not fit. Checkpointing at the level of the per-step
scalars r_{i,t} is exact:
  pass 1  r_{i,t}(theta) for all i, t without grad -- skipped on the first step after sampling,
          where theta = theta_old and r(old) recorded by the sampler is used as is;
  loss    the (G, B, T) loss with autograd on a leaf copy of r -> g_{i,t} = dL/dr_{i,t};
  pass 2  per chunk of (images x steps): recompute the CFG UNet batch with grad and backprop
          sum g_{i,t} r_{i,t}(theta); d/dtheta of that summed over chunks is dL/dtheta.
Across ranks the loss is the mean over all valid groups of the world: each rank scales its local
mean by (local valid groups x world size / global valid groups) so DeepSpeed's gradient average
gives exactly the global mean.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from prdp_ds.config import recorded_steps
from prdp_ds.logratio import cfg_step_log_ratio, guided_eps
from prdp_ds.loss import rdp_diagnostics, rdp_loss
from prdp_ds.sampler import cfg_predict

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from prdp_ds.config import Config
    from prdp_ds.sampler import Trajectories


def chunks(cfg, n_images, subset=None):
    """(image slice, step slice) pairs in pass order; their count is the DeepSpeed accumulation. subset: an (n,)
    int64 tensor of the steps to cover (prdp_ds.grpo's step subsets) -> (image slice, step index tensor) pairs."""
    t = cfg.train
    n_steps = recorded_steps(cfg) if subset is None else subset.numel()
    step = (
        (lambda k: slice(k, min(k + t.steps_per_chunk, n_steps)))
        if subset is None
        else (lambda k: subset[k : k + t.steps_per_chunk])
    )
    return [
        (slice(i, min(i + t.images_per_chunk, n_images)), step(k))
        for i in range(0, n_images, t.images_per_chunk)
        for k in range(0, n_steps, t.steps_per_chunk)
    ]


def chunk_log_ratios(unet, traj, cond, uncond, images, steps, cfg, impl, against="eps_ref"):
    """log pi_theta - log pi_ref (or pi_old with against="eps_old") for images x steps of the
    flattened trajectories -> (n_images, n_steps) fp32, in cfg.loss.reduction units.

    traj tensors are flattened to (n, T(+1), ...); cond: (n, L, dim), uncond: (1, L, dim); steps: a slice or an
    (n_steps,) int64 index tensor (prdp_ds.grpo's step subsets)."""
    return _chunk(unet, traj, cond, uncond, images, steps, cfg, impl, against)[0]


def chunk_log_ratios_eps(unet, traj, cond, uncond, images, steps, cfg, impl, against="eps_ref"):
    """chunk_log_ratios and the policy's guided eps_hat = eps_u + w (eps_c - eps_u), with grad
    -> r (n_images, n_steps) fp32, eps_hat (n_images * n_steps, C, h, w) fp32 in image-major row order."""
    r, eps_u, eps_c = _chunk(unet, traj, cond, uncond, images, steps, cfg, impl, against)
    return r, guided_eps(eps_u.float(), eps_c.float(), cfg.sampler.guidance_scale)


def _chunk(unet, traj, cond, uncond, images, steps, cfg, impl, against):
    """The chunk's r (n_images, n_steps) and raw CFG outputs (n_images * n_steps, C, h, w)."""
    sched = traj.schedule
    ni = images.stop - images.start
    if isinstance(steps, slice):
        nk, nxt = steps.stop - steps.start, slice(steps.start + 1, steps.stop + 1)
    else:
        nk, nxt = steps.numel(), steps + 1
    rows = lambda t: t.flatten(0, 1)  # noqa: E731  (ni, nk, ...) -> (ni * nk, ...)
    x_t = rows(traj.flat("latents")[images, steps])
    x_prev = rows(traj.flat("latents")[images, nxt])
    eps_ref = rows(traj.flat(against)[images, steps])
    t = sched.timesteps[steps].repeat(ni)
    a, b, sigma = (c[steps].repeat(ni) for c in (sched.a, sched.b, sched.sigma))
    c = cond[images].repeat_interleave(nk, dim=0)
    eps_u, eps_c = cfg_predict(unet, x_t, t, c, uncond.expand(c.shape[0], -1, -1), cfg.sampler.guidance_scale)
    r = cfg_step_log_ratio(
        eps_u, eps_c, cfg.sampler.guidance_scale, eps_ref, x_t, x_prev, a, b, sigma, cfg.loss.reduction, impl
    )
    return r.reshape(ni, nk), eps_u, eps_c


@torch.no_grad()
def policy_log_ratios(unet, traj, cond, uncond, cfg, impl):
    """Pass 1: r(theta) for every image and step, no grad -> (G, B, T) fp32."""
    G, B, T = traj.log_ratio_old.shape
    r = torch.empty(G * B, T, device=traj.log_ratio_old.device)
    for images, steps in chunks(cfg, G * B):
        r[images, steps] = chunk_log_ratios(unet, traj, cond, uncond, images, steps, cfg, impl)
    return r.reshape(G, B, T)


def all_reduce(value, op=dist.ReduceOp.SUM):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def valid_group_scale(rewards):
    """Factor turning this rank's mean over its valid groups into its share of the world's mean.
    rewards: (G, B). Returns (scale, global number of valid groups)."""
    G, B = rewards.shape
    local = ((rewards[:, :, None] - rewards[:, None, :]) > 0).flatten(1).any(dim=1).sum().float()
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = all_reduce(local.clone())
    return (local * world / total.clamp(min=1)).item(), int(total.item())


def prdp_step(
    engine: DeepSpeedEngine,
    traj: Trajectories,
    rewards: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cfg: Config,
    impl: str,
    first_step: bool,
) -> dict[str, float | str]:
    """Pass 1 (unless first_step), loss, pass 2 and one DeepSpeed optimizer step.

    traj: this rank's (G, B, T) rollout; cond: (G * B, L, dim) prompt embeddings in image order;
    uncond: (1, L, dim) the empty prompt's; rewards: (G, B) fp32 on the device. Returns a dict of
    floats; 'skipped' names the non-finite quantity (reward, loss or grad_norm) when the step was
    not applied, on every rank alike."""
    G, B, T = traj.log_ratio_old.shape
    scale, n_valid = valid_group_scale(rewards)
    r_theta = traj.log_ratio_old if first_step else policy_log_ratios(engine, traj, cond, uncond, cfg, impl)
    stats = rdp_diagnostics(r_theta, traj.log_ratio_old, rewards, cfg.loss.clip_range, cfg.loss.kl_weight)
    leaf = r_theta.detach().clone().requires_grad_(True)
    loss = rdp_loss(leaf, traj.log_ratio_old, rewards, cfg.loss.clip_range, cfg.loss.kl_weight, impl) * scale
    finite = torch.stack([torch.isfinite(rewards).all(), torch.isfinite(loss.detach())]).float()
    finite = all_reduce(finite, dist.ReduceOp.MIN).tolist()  # every rank takes the same decision
    if finite != [1.0, 1.0]:
        return {**stats, "loss": float("nan"), "skipped": "reward" if finite[0] == 0 else "loss"}
    if n_valid == 0:
        return {**stats, "loss": 0.0, "skipped": "no_valid_pairs"}
    loss.backward()
    g = leaf.grad.reshape(G * B, T)
    bad_ratio = torch.zeros((), device=g.device)
    for images, steps in chunks(cfg, G * B):
        r = chunk_log_ratios(engine, traj, cond, uncond, images, steps, cfg, impl)
        bad_ratio = torch.maximum(bad_ratio, (~torch.isfinite(r.detach())).any().float())
        engine.backward((g[images, steps] * r).sum(), scale_wrt_gas=False)
        engine.step()  # the optimizer steps at the last chunk (the boundary); ZeRO-1 reduces only there (§8)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    global_loss = all_reduce(loss.detach().clone()).item() / (dist.get_world_size() if dist.is_initialized() else 1)
    out = {**stats, "loss": global_loss, "grad_norm": grad_norm, "lr": engine.get_lr()[0]}
    if all_reduce(bad_ratio).item() > 0 or not math.isfinite(grad_norm):
        out["skipped"] = "grad_norm"
    return out
