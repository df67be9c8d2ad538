"""The fully fused PRDP loss over whole trajectories: step log-ratios + RDP loss (docs/design.md §10.3).

Math. Inputs for G prompt groups x B images x T steps, each latent of D = C*H*W elements:

    eps_hat_{g,i,t} = eps_u + w (eps_c - eps_u)
    r_{g,i,t} = sum_d b_t (eps_hat - eps_ref)(2 x_prev - 2 a_t x_t - b_t (eps_hat + eps_ref)) / (2 sigma_t^2)
                (divided by D for reduction="mean"; docs/design.md §4, kernels.step_logratio)
    L = PRDP loss of (r, r_old, rewards, eps, beta)          (docs/design.md §5, kernels.rdp_loss)

    dL/deps_u = (1 - w) * dL/dr_{g,i,t} * b_t (x_prev - a_t x_t - b_t eps_hat) / sigma_t^2,
    dL/deps_c = w * (the same),   times the upstream gradient of L.

Kernels. Forward = two launches: the step kernel reads the five (G*B*T, D) tensors once and writes
r (G*B*T,) fp32 (coefficients indexed by row % T, nothing expanded), then the one-launch RDP
kernel turns r into the loss and dL/dr (G, B, T) fp32, which is saved. Backward = one launch: the
step backward kernel recomputes eps_hat and mu from the inputs and writes dL/deps_u, dL/deps_c
directly in the inputs' dtypes, multiplying dL/dr by the upstream gradient read from device memory
(no host sync). Memory beyond inputs and the two gradients: O(G*B*T) floats; no (G, B, T, D)
temporary exists in forward or backward (non-contiguous inputs are copied to contiguous memory
first — pass contiguous tensors to avoid that). The trainer does not call it (pass 2 holds one chunk
of UNet outputs at a time and uses the two kernels separately); benchmarks/loss_kernel.py measures it.

PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch") reshaped to (G, B, T),
then prdp_ds.loss.rdp_loss(..., impl="torch").
"""

import torch
from torch.autograd.function import once_differentiable

from kernels.rdp_loss import check_rdp_args, launch_rdp_loss
from kernels.step_logratio import launch_step_bwd, launch_step_fwd
from kernels.utils import check_device, check_latents, check_reduction, check_tensor, coef_arg, flat_rows, scalar_arg


class _FusedPRDPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eu, ec, er, xt, xp, ro, rw, coefs, w, mean, clip, beta):
        # eu, ec, er, xt, xp: (G*B*T, D) contiguous; ro: (G, B, T); rw: (G, B) -> 0-dim fp32
        G, B, T = ro.shape
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        r = launch_step_fwd(eu, ec, er, xt, xp, coefs, w, mean)  # (G*B*T,) fp32
        loss, grad_r = launch_rdp_loss(r.view(G, B, T), ro, rw, clip, beta, write_grad=need_grad)
        if need_grad:
            ctx.save_for_backward(eu, ec, xt, xp, grad_r)
            ctx.coefs, ctx.w, ctx.mean = coefs, w, mean
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        eu, ec, xt, xp, grad_r = ctx.saved_tensors
        scale = grad_loss.to(torch.float32).reshape(1).contiguous()
        geu, gec = launch_step_bwd(
            eu,
            ec,
            xt,
            xp,
            ctx.coefs,
            ctx.w,
            ctx.mean,
            grad_r.view(-1),
            scale=scale,
            write_u=ctx.needs_input_grad[0],
            write_c=ctx.needs_input_grad[1],
        )
        return geu, gec, None, None, None, None, None, None, None, None, None, None


def fused_prdp_loss_triton(
    eps_uncond,
    eps_cond,
    eps_ref,
    x_t,
    x_prev,
    log_ratios_old,
    rewards,
    a,
    b,
    sigma,
    guidance_scale,
    clip_range,
    kl_weight,
    reduction="sum",
):
    """PRDP loss straight from whole trajectories -> 0-dim fp32, differentiable in eps_uncond, eps_cond.

    eps_uncond, eps_cond: (G, B, T, D...) raw UNet outputs (fp32 / bf16 / fp16);
    eps_ref, x_t, x_prev: (G, B, T, D...) constants, any float dtype (latent dims are flattened);
    log_ratios_old: (G, B, T); rewards: (G, B); a, b, sigma: (T,) tensors or scalars;
    guidance_scale w; clip_range eps >= 0; kl_weight beta > 0; reduction "sum" or "mean" over D.
    PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch") reshaped to (G, B, T)
    followed by prdp_ds.loss.rdp_loss(..., impl="torch").
    """
    fn = "fused_prdp_loss_triton"
    check_reduction(fn, reduction)
    named = dict(eps_uncond=eps_uncond, eps_cond=eps_cond, eps_ref=eps_ref, x_t=x_t, x_prev=x_prev)
    shape = check_latents(fn, named, min_dim=4, layout="(G, B, T, D...)")
    check_tensor(fn, "log_ratios_old", log_ratios_old)
    if log_ratios_old.shape != shape[:3]:
        raise ValueError(
            f"{fn}: log_ratios_old must have shape (G, B, T) = {tuple(shape[:3])}, got {tuple(log_ratios_old.shape)}"
        )
    # shape checks of rewards, clip_range, kl_weight (log_ratios_old stands in for the (G,B,T) ratios)
    clip, beta = check_rdp_args(
        fn, log_ratios_old.detach(), log_ratios_old, rewards, clip_range, kl_weight, ratios_name="log_ratios_old"
    )
    if eps_uncond.numel() == 0:
        raise ValueError(f"{fn}: empty input of shape {tuple(shape)}")
    device = check_device(fn, dict(named, log_ratios_old=log_ratios_old, rewards=rewards))
    G, B, T = shape[:3]
    rows = G * B * T
    coefs = tuple(coef_arg(fn, n, v, T, device, "one per step T") for n, v in (("a", a), ("b", b), ("sigma", sigma)))
    w = scalar_arg(fn, "guidance_scale", guidance_scale)
    flat = [flat_rows(t, rows) for t in named.values()]
    return _FusedPRDPLoss.apply(
        *flat, log_ratios_old.contiguous(), rewards.contiguous(), coefs, w, reduction == "mean", clip, beta
    )
