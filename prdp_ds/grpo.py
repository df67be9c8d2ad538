"""The GRPO baseline for diffusion (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025) on PRDP's sampler,
rewards, engine and logs.

Advantages are standardized within each prompt's group of the current rollout (no history):

    A_i = clip((r_i - mean_g) / (std_g + 1e-4), -adv_clip, adv_clip),   std_g over the group's B, unbiased=False,

Flow-GRPO's convention (flow_grpo/stat_tracking.py: np.std + 1e-4; DanceGRPO's fastvideo/train_grpo_sd.py takes
torch's Bessel-corrected std + 1e-8). With rho_{i,t} = exp(log pi_theta - log pi_old) (cancellation-free, against
the recorded eps_old, in grpo.reduction units) and the steps S of this optimizer step (all T, or a subset of
int(grpo.step_fraction * T) drawn from (train.seed, epoch, k), the same for every image), the loss is

    L = mean_{i, t in S} [ max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps)) + beta KL_{i,t} ],
    KL_{i,t} = ||mu_theta - mu_ref||^2 / (2 sigma_t^2) = ||b_t (eps_hat_theta - eps_hat_ref)||^2 / (2 sigma_t^2),

the closed-form KL of the two Gaussian steps (shared sigma_t), summed (or averaged, grpo.reduction) over latent
elements, from the guided eps_hat difference: no cancellation, exactly 0 when they agree. Both terms are sums of
per-(i, t) terms, so each chunk of (images x steps) is backpropagated on its own, exactly, as in prdp_ds.ddpo.
"""

import math

import numpy as np
import torch

from prdp_ds.config import recorded_steps, trained_steps
from prdp_ds.ddpo import finite_everywhere, ppo_loss, step_record, unit_factor
from prdp_ds.twopass import chunk_log_ratios_eps, chunks

STD_EPS = 1e-4  # Flow-GRPO's guard on a constant-reward group (flow_grpo/stat_tracking.py)


def group_advantages(rewards, adv_clip):
    """(G, B) rewards -> (G, B) fp32 advantages, standardized per group, clipped; all NaN if any reward is not
    finite (grpo_step then skips on every rank). A group is whole on one rank: no communication."""
    r = rewards.double()
    if not torch.isfinite(r).all():
        return torch.full_like(rewards, float("nan"), dtype=torch.float32)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + STD_EPS)
    return adv.clamp(-adv_clip, adv_clip).float()


def step_subset(cfg, epoch, k, device="cpu"):
    """The sorted (n,) int64 step indices that optimizer step k of `epoch` trains: all T when n = T, else a
    uniform n-subset drawn from (train.seed, epoch, k) alone (n = config.trained_steps), so a resume redraws it."""
    T, n = recorded_steps(cfg), trained_steps(cfg)
    if n == T:
        return torch.arange(T, device=device)
    seed = int(np.random.SeedSequence([cfg.train.seed, epoch, k]).generate_state(1, np.uint64)[0] >> 1)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    return perm[:n].sort().values.to(device)


def step_kl(eps, eps_ref, b, sigma, reduction):
    """KL(N(mu, s^2) || N(mu_ref, s^2)) per row = ||b (eps - eps_ref)||^2 / (2 s^2), summed (or averaged) over
    elements. eps, eps_ref: (rows, ...) fp32; b, sigma: (rows,). Returns (rows,) fp32."""
    d = (b.reshape(-1, 1) * (eps - eps_ref).flatten(1)) ** 2
    kl = d.sum(dim=1) / (2 * sigma**2)
    return kl / d.shape[1] if reduction == "mean" else kl


def grpo_terms(log_ratio, adv, kl, clip_range, kl_weight):
    """Per-(image, step) terms of L: log_ratio (n, k) = log pi_theta - log pi_old in grpo.reduction units,
    adv (n, 1), kl (n, k) KL_t -> (n, k) PPO's clipped surrogate + kl_weight KL_t."""
    return ppo_loss(log_ratio, adv, clip_range) + kl_weight * kl


def grpo_step(engine, traj, adv, cond, uncond, cfg, impl, steps_subset):
    """One GRPO optimizer step over this rank's rollout (surrogate_step with grpo_terms).

    adv: (G, B) fp32 (group_advantages); steps_subset: (n,) int64 (step_subset). Returns a dict of floats like
    ddpo_step's ('skipped' names what was non-finite: reward, or grad_norm)."""
    g = cfg.grpo

    def terms(log_ratio, a, kl):
        return grpo_terms(log_ratio, a, kl, g.clip_range, g.kl_weight)

    out = surrogate_step(engine, traj, adv, cond, uncond, cfg, impl, steps_subset, terms, g.clip_range, g.reduction)
    return with_policy_loss(out, g.kl_weight)


def with_policy_loss(stats, kl_weight):
    """stats plus 'policy_loss': the loss without its KL term (loss - kl_weight * kl_penalty), when it was taken."""
    if "kl_penalty" in stats:
        stats["policy_loss"] = stats["loss"] - kl_weight * stats["kl_penalty"]
    return stats


def surrogate_step(engine, traj, adv, cond, uncond, cfg, impl, steps_subset, terms, clip_range, reduction):
    """One optimizer step of a per-step ratio objective (GRPO's, DPOK's) over this rank's rollout: per chunk of
    (images x selected steps), recompute log pi_theta - log pi_old and eps_hat_theta with grad, and backprop
    sum terms(log_ratio, adv, KL_t) / (G B |S|); then DeepSpeed steps.

    adv: (G, B) per image or (G, B, T) per (image, step) fp32; terms: (log_ratio (n, k) in `reduction` units,
    adv (n, 1) or (n, k), KL_t (n, k)) -> (n, k). clip_range: the ratio's clip, for the logged clipped share."""
    G, B, T = traj.log_ratio_old.shape
    if not finite_everywhere(adv):
        return {"loss": float("nan"), "skipped": "reward"}
    to_units = unit_factor(traj, reduction, cfg)
    per_step = adv.dim() == 3
    flat_adv, r_old = adv.reshape(G * B, T if per_step else 1), traj.log_ratio_old.reshape(G * B, T)
    eps_ref, sched = traj.flat("eps_ref"), traj.schedule
    n = G * B * steps_subset.numel()
    # loss, clipped, log-ratio to ref, bad, KL_t, adv sum, adv sum of squares
    sums = torch.zeros(7, dtype=torch.float64, device=adv.device)
    for images, steps in chunks(cfg, G * B, steps_subset):  # count: config.trained_steps
        r, eps = chunk_log_ratios_eps(engine, traj, cond, uncond, images, steps, cfg, impl, against="eps_old")
        ni = r.shape[0]
        b, sigma = sched.b[steps].repeat(ni), sched.sigma[steps].repeat(ni)
        kl = step_kl(eps, eps_ref[images][:, steps].flatten(0, 1), b, sigma, reduction).reshape(r.shape)
        a = flat_adv[images][:, steps] if per_step else flat_adv[images]
        loss = terms(r * to_units, a, kl).sum() / n
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # as in ddpo_step: one optimizer step, at the last chunk
        r = r.detach()
        sums[:5] += torch.stack(
            [
                loss.detach().double(),
                ((torch.exp(r * to_units) - 1).abs() > clip_range).sum().double(),
                (r + r_old[images][:, steps]).sum().double(),
                (~torch.isfinite(r)).any().double(),
                kl.detach().sum().double(),
            ]
        )
    sums[5:] = torch.stack([adv.double().sum(), (adv.double() ** 2).sum()])
    out, sums, world = step_record(engine, sums, n)
    adv_mean = sums[5].item() / (adv.numel() * world)
    out.update(
        kl_penalty=sums[4].item() / (n * world),
        adv_mean=adv_mean,
        adv_std=math.sqrt(max(sums[6].item() / (adv.numel() * world) - adv_mean**2, 0.0)),
        steps_trained=float(steps_subset.numel()),
    )
    return out
