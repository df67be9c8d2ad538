"""Per-step log-ratios of the DDIM (eta > 0) policy, computed without cancellation (docs/design.md §4).

Each denoising step t is a Gaussian policy N(mu, sigma_t^2 I) whose mean is affine in the guided
noise prediction: mu = a_t x_t + b_t eps_hat. The log-ratio of two such policies that share x_t and
sigma_t, evaluated at the sampled x_{t-1}, is

    r_t = log N(x_{t-1}; mu_1, s^2) - log N(x_{t-1}; mu_2, s^2)
        = sum_d (mu_1 - mu_2)(2 x_{t-1} - mu_1 - mu_2) / (2 s^2)
        = sum_d b (e_1 - e_2) (2 x_{t-1} - 2 a x_t - b (e_1 + e_2)) / (2 s^2).

Each term is small, so summing them in fp32 keeps ~1e-7 relative accuracy, while subtracting two
log-probs of size ~D loses ~1e-3 absolute. When e_1 == e_2 the result is exactly 0.
`gaussian_log_prob` is the naive per-step log-prob, kept only as the paper's baseline.
"""

import math

import torch

from kernels.utils import REDUCTIONS


def guided_eps(eps_uncond, eps_cond, guidance_scale):
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _per_row(coef, rows, device):
    """Broadcast a scalar or (rows,) coefficient to a (rows, 1) fp32 column."""
    coef = torch.as_tensor(coef, dtype=torch.float32, device=device)
    return coef.reshape(-1, 1).expand(rows, 1) if coef.numel() == 1 else coef.reshape(rows, 1)


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, sigma, reduction="sum"):
    """log pi(x_prev | x_t; eps) - log pi(x_prev | x_t; eps_ref), per row, in fp32.

    eps, eps_ref, x_t, x_prev: (rows, ...) any float dtype; a, b, sigma: scalars or (rows,).
    Returns (rows,) fp32. This is the PyTorch reference of kernels.step_logratio.
    """
    check_reduction(reduction)
    rows = eps.shape[0]
    f32 = lambda t: t.reshape(rows, -1).to(torch.float32)  # noqa: E731
    e1, e2, xt, xp = f32(eps), f32(eps_ref), f32(x_t), f32(x_prev)
    a, b, sigma = (_per_row(c, rows, e1.device) for c in (a, b, sigma))
    delta = b * (e1 - e2)  # mu_1 - mu_2
    resid = 2 * xp - 2 * a * xt - b * (e1 + e2)  # 2 x_prev - mu_1 - mu_2
    r = (delta * resid).sum(dim=1) / (2 * sigma.squeeze(1) ** 2)
    return r / e1.shape[1] if reduction == "mean" else r


def gaussian_log_prob(x_prev, mean, sigma, reduction="sum"):
    """Naive log N(x_prev; mean, sigma^2 I) per row, in the inputs' dtype (the paper's baseline)."""
    check_reduction(reduction)
    rows = x_prev.shape[0]
    x, mu = x_prev.reshape(rows, -1), mean.reshape(rows, -1)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
    lp = -((x - mu) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=1) if reduction == "mean" else lp.sum(dim=1)


IMPLS = ("torch", "triton")


def cfg_step_log_ratio(
    eps_uncond, eps_cond, guidance_scale, eps_ref, x_t, x_prev, a, b, sigma, reduction="sum", impl="torch"
):
    """Step log-ratio from raw CFG outputs: r(eps_u + w (eps_c - eps_u), eps_ref), per row, fp32.

    eps_uncond, eps_cond: (rows, ...) in the UNet's dtype; the rest as in `step_log_ratio`.
    impl="triton" runs the fused kernel (kernels.step_log_ratio_triton), differentiable in
    eps_uncond and eps_cond.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        from kernels import step_log_ratio_triton

        return step_log_ratio_triton(eps_uncond, eps_cond, eps_ref, x_t, x_prev, a, b, sigma, guidance_scale, reduction)
    eps = guided_eps(eps_uncond.float(), eps_cond.float(), guidance_scale)
    return step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, sigma, reduction)
