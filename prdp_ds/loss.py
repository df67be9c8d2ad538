"""The PRDP objective: reward difference prediction with proximal clipping (docs/design.md §2, §5).

Per prompt group g, image i and step t, with r_{i,t} the log-ratio log pi_theta - log pi_ref:
    c_{i,t}  = clip(r_{i,t}, r_old_{i,t} - eps, r_old_{i,t} + eps)
    R_i      = mean_t r_{i,t},   C_i = mean_t c_{i,t}
For every ordered pair (i, j) with dr = reward_i - reward_j > 0:
    l_ij = max((R_i - R_j - dr/beta)^2, (C_i - C_j - dr/beta)^2)
Group loss = mean of l_ij over its valid pairs; batch loss = mean over groups with >= 1 valid pair
(a batch without any valid pair gives 0, still connected to the graph).

`prdp_loss_reference` is the paper's function (supplement G), log-ratios formed by subtracting
log-probs; `rdp_loss` is the production form on log-ratios (torch here, or the Triton kernel).
"""

import torch

IMPLS = ("torch", "triton")


def _group_mean(pair_loss, valid):
    """pair_loss, valid: (G, B, B) -> mean over valid pairs per group, then over valid groups."""
    valid = valid.to(pair_loss.dtype)
    count = valid.sum(dim=(1, 2))  # (G,)
    group_sum = torch.where(valid > 0, pair_loss, torch.zeros_like(pair_loss)).sum(dim=(1, 2))
    has_pairs = count > 0
    group_loss = group_sum / count.clamp(min=1)
    n_groups = has_pairs.sum()
    return torch.where(has_pairs, group_loss, torch.zeros_like(group_loss)).sum() / n_groups.clamp(min=1)


def _check_args(name, ratios, rewards, clip_range, kl_weight, *others):
    if ratios.dim() != 3:
        raise ValueError(f"{name}: expected log-ratios of shape (G, B, T), got {tuple(ratios.shape)}")
    for other in others:
        if other.shape != ratios.shape:
            raise ValueError(f"{name}: log-ratio shapes differ: {tuple(ratios.shape)} vs {tuple(other.shape)}")
    if rewards.shape != ratios.shape[:2]:
        raise ValueError(
            f"{name}: rewards must have shape (G, B) = {tuple(ratios.shape[:2])}, got {tuple(rewards.shape)}"
        )
    if not kl_weight > 0:
        raise ValueError(f"{name}: kl_weight (beta) must be > 0, got {kl_weight}")
    if not clip_range >= 0:
        raise ValueError(f"{name}: clip_range (epsilon) must be >= 0, got {clip_range}")


def _rdp_terms(log_ratios, log_ratios_old, rewards, clip_range, kl_weight):
    """Shared core -> (per-pair loss (G,B,B), valid pairs (G,B,B), clipped ratios (G,B,T),
    unclipped prediction error R_i - R_j - dr/beta (G,B,B))."""
    clipped = torch.clamp(log_ratios, log_ratios_old - clip_range, log_ratios_old + clip_range)
    total, total_clip = log_ratios.mean(dim=-1), clipped.mean(dim=-1)  # (G, B)
    gap = (log_ratios - clipped).mean(dim=-1)  # (G, B): R - C
    target = (rewards[:, :, None] - rewards[:, None, :]) / kl_weight  # (G, B, B)
    err = total[:, :, None] - total[:, None, :] - target
    err_clip = total_clip[:, :, None] - total_clip[:, None, :] - target
    # max(err^2, err_clip^2), the larger chosen by the sign of err^2 - err_clip^2 =
    # (gap_i - gap_j)(err + err_clip): with the paper's beta err and err_clip reach ~1e3 and differ by
    # ~1e-6 to 1e-5, so in fp32 they mostly round alike and comparing them picks a branch by rounding.
    dec = ((gap[:, :, None] - gap[:, None, :]) * (err + err_clip)).detach()
    pair = torch.where(dec > 0, err**2, torch.where(dec < 0, err_clip**2, 0.5 * (err**2 + err_clip**2)))
    return pair, target > 0, clipped, err


def prdp_loss_reference(log_probs, log_probs_old, log_probs_ref, rewards, clip_range, kl_weight):
    """The paper's loss on log-probs (G,B,T) x3 and rewards (G,B) -> scalar (supplement G)."""
    _check_args("prdp_loss_reference", log_probs, rewards, clip_range, kl_weight, log_probs_old, log_probs_ref)
    pair_loss, valid, _, _ = _rdp_terms(
        log_probs - log_probs_ref, log_probs_old - log_probs_ref, rewards, clip_range, kl_weight
    )
    return _group_mean(pair_loss, valid)


def rdp_loss(log_ratios, log_ratios_old, rewards, clip_range, kl_weight, impl="torch"):
    """The PRDP loss on log-ratios (G,B,T), old log-ratios (G,B,T) and rewards (G,B) -> scalar.

    Differentiable in log_ratios. impl="triton" runs the fused kernel (kernels.rdp_loss_triton).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_args("rdp_loss", log_ratios, rewards, clip_range, kl_weight, log_ratios_old)
    if impl == "triton":
        from kernels import rdp_loss_triton

        return rdp_loss_triton(log_ratios, log_ratios_old, rewards, clip_range, kl_weight)
    pair_loss, valid, _, _ = _rdp_terms(log_ratios, log_ratios_old, rewards, clip_range, kl_weight)
    return _group_mean(pair_loss, valid)


@torch.no_grad()
def rdp_diagnostics(log_ratios, log_ratios_old, rewards, clip_range, kl_weight):
    """Floats for the metrics log: clip_frac (share of (i,t) outside the clip band), pred_err
    (mean |R_i - R_j - dr/beta| over valid pairs), valid_pair_frac (valid pairs / all i != j pairs;
    a pair counts once, so its maximum is 0.5) and kl (mean over images of mean_t log-ratio)."""
    _check_args("rdp_diagnostics", log_ratios, rewards, clip_range, kl_weight, log_ratios_old)
    G, B, _ = log_ratios.shape
    _, valid, clipped, err = _rdp_terms(log_ratios, log_ratios_old, rewards, clip_range, kl_weight)
    n_valid = int(valid.sum())
    return {
        "clip_frac": float((clipped != log_ratios).float().mean()),
        "pred_err": float(err[valid].abs().mean()) if n_valid else 0.0,
        "valid_pair_frac": n_valid / max(G * B * (B - 1), 1),
        "kl": float(log_ratios.mean()),
    }
