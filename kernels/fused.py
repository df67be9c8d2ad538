"""The fully fused PRDP loss over whole trajectories: step log-ratios + RDP loss (docs/design.md §10.3).

Math. Inputs for G prompt groups x B images x T steps, each latent of D = C*H*W elements:

    eps_hat_{g,i,t} = eps_u + w (eps_c - eps_u)
    r_{g,i,t} = sum_d b_t (eps_hat - eps_ref)(2 x_prev - 2 a_t x_t - b_t (eps_hat + eps_ref)) / (2 sigma_t^2)
                (divided by D for reduction="mean"; docs/design.md §4, kernels.step_logratio)
    L = PRDP loss of (r, r_old, rewards, eps, beta)          (docs/design.md §5, kernels.rdp_loss)

    u_{g,i,t,d} = x_prev - mu_theta = x_prev - a_t x_t - b_t eps_hat          (the residual)
    dL/deps_u = (1 - w) * dL/dr_{g,i,t} * b_t u / sigma_t^2,
    dL/deps_c = w * (the same),   times the upstream gradient of L.

dL/dr couples every row of a group (it needs all of r first), so the gradient takes a second pass over
the latents; the two designs differ in what that pass reads. Bytes per latent element, s = bytes of
eps_u / eps_c, c = bytes of each of eps_ref, x_t, x_prev (the floor reads every input once and writes
the two gradients once: 4s + 3c):

    backward="residual"  (default) forward reads the 5 inputs, writes u in fp32; backward reads u, writes
                         the 2 gradients:                   4s + 3c + 8   (fp32: 36 B, bf16 eps: 28 B)
    backward="recompute" forward reads the 5 inputs; backward re-reads eps_u, eps_c, x_t, x_prev and
                         recomputes u, writes the 2 gradients: 6s + 5c    (fp32: 44 B, bf16 eps: 32 B)

(floor: fp32 28 B, bf16 eps with fp32 constants 20 B; at copy speed residual reaches 78% / 71% of it,
recompute 64% / 62%). The residual is fp32 whatever the eps dtype: u is computed exactly as the
recompute backward computes it, so both designs give the same gradients (bit-identical under the
interpreter); a bf16 residual would round twice (u, then the gradient): up to twice the error of the
PyTorch reference's one rounding (1.2-2.0x in an emulation), at the limit of the tolerance rule.

Memory trade-off. "residual" holds one (G, B, T, D) fp32 tensor (4 G B T D bytes) from forward to
backward, and the backward's peak is that residual plus the two gradients; it keeps no reference to the
inputs, so a caller may free them after the forward. "recompute" allocates nothing (G, B, T, D)-sized
besides the two gradients (O(G B T) floats), but keeps eps_u, eps_c, x_t, x_prev referenced until the
backward. Without a gradient to compute (no input requires grad, or grad mode off) both run the same
forward and save nothing.

Kernels. Forward = two launches: the step kernel reads the five (G*B*T, D) tensors once (coefficients
indexed by row % T, nothing expanded) and writes r (G*B*T,) fp32 (and u with "residual", this module's
_fused_fwd_kernel; otherwise kernels.step_logratio's forward kernel), then the one-launch RDP kernel
turns r into the loss and dL/dr (G, B, T) fp32, which is saved. Backward = one launch, elementwise over
(BLOCK_R, BLOCK_D) tiles, multiplying dL/dr by the upstream gradient read from device memory (no host
sync) and writing dL/deps_u, dL/deps_c in the inputs' dtypes (bf16 rounded to nearest even:
kernels.step_logratio._cast_out): _residual_bwd_kernel reads u; "recompute" runs kernels.step_logratio's
backward kernel. Non-contiguous inputs are copied to contiguous memory first (pass contiguous tensors to
avoid that). The trainer does not call it (pass 2 holds one chunk of UNet outputs at a time and uses the
two kernels separately); benchmarks/loss_kernel.py measures it.

PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch") reshaped to (G, B, T),
then prdp_ds.loss.rdp_loss(..., impl="torch"). Tolerance rule (tests/test_fused.py): the error against
fp64 of the loss and of each gradient is <= 2x the same-dtype PyTorch reference's + a small atol.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels.utils as utils
from kernels.rdp_loss import check_rdp_args, launch_rdp_loss
from kernels.step_logratio import _cast_out, launch_step_bwd, launch_step_fwd
from kernels.utils import (
    INTERPRET,
    check_device,
    check_latents,
    check_reduction,
    check_tensor,
    coef_arg,
    flat_rows,
    scalar_arg,
)

# What the backward reads (module docstring): the fp32 residual u saved by the forward, or the inputs.
BACKWARDS = ("residual", "recompute")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fused_fwd_kernel(
    eu_ptr,
    ec_ptr,
    er_ptr,
    xt_ptr,
    xp_ptr,  # (rows, D) contiguous, any float dtype
    a_ptr,
    b_ptr,
    s_ptr,  # (a_period,), (b_period,), (s_period,) fp32
    out_ptr,  # (rows,) fp32: r
    res_ptr,  # (rows, D) fp32: u = x_prev - mu_theta
    rows,
    D,
    a_period,
    b_period,
    s_period,
    w,  # guidance scale (fp32 scalar)
    MEAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r_offs = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    r_mask = r_offs < rows
    a = tl.load(a_ptr + r_offs % a_period, mask=r_mask, other=0.0)
    b = tl.load(b_ptr + r_offs % b_period, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + r_offs % s_period, mask=r_mask, other=1.0)
    a2 = a[:, None]  # (BLOCK_R, 1)
    b2 = b[:, None]
    base = r_offs.to(tl.int64)[:, None] * D  # (BLOCK_R, 1) int64
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask = r_mask[:, None] & (d_offs < D)[None, :]
        offs = base + d_offs[None, :]
        # eu, ec, er, xt, xp and everything below: (BLOCK_R, BLOCK_D) fp32
        eu = tl.load(eu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ec = tl.load(ec_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        er = tl.load(er_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(xp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eh = eu + w * (ec - eu)  # guided eps_hat
        delta = b2 * (eh - er)  # mu_theta - mu_ref
        resid = 2.0 * xp - 2.0 * a2 * xt - b2 * (eh + er)  # 2 x_prev - mu_theta - mu_ref
        acc += delta * resid  # masked lanes add exactly 0
        mu = a2 * xt + b2 * eh  # mu_theta, as the recompute backward forms it
        tl.store(res_ptr + offs, xp - mu, mask=mask)
    r = tl.sum(acc, axis=1) / (2.0 * s * s)  # (BLOCK_R,), as kernels.step_logratio's forward
    if MEAN:
        r = r / D
    tl.store(out_ptr + r_offs, r, mask=r_mask)


@triton.jit
def _residual_bwd_kernel(
    res_ptr,  # (rows, D) fp32: u
    b_ptr,
    s_ptr,  # (b_period,), (s_period,) fp32
    g_ptr,  # (rows,) fp32 dL/dr
    scale_ptr,  # (1,) fp32 upstream gradient of L
    geu_ptr,
    gec_ptr,  # (rows, D) outputs, dtypes of eps_u / eps_c
    rows,
    D,
    b_period,
    s_period,
    n_d_tiles,
    w,
    MEAN: tl.constexpr,
    WRITE_U: tl.constexpr,
    WRITE_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // n_d_tiles
    pid_d = pid % n_d_tiles
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    r_mask = r_offs < rows
    b = tl.load(b_ptr + r_offs % b_period, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + r_offs % s_period, mask=r_mask, other=1.0)
    g = tl.load(g_ptr + r_offs, mask=r_mask, other=0.0) * tl.load(scale_ptr)  # (BLOCK_R,) dL/dr * upstream
    coef = g * b / (s * s)  # (BLOCK_R,), as kernels.step_logratio's backward
    if MEAN:
        coef = coef / D
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d_offs < D)[None, :]
    offs = r_offs.to(tl.int64)[:, None] * D + d_offs[None, :]
    u = tl.load(res_ptr + offs, mask=mask, other=0.0)  # (BLOCK_R, BLOCK_D) fp32
    g_eh = coef[:, None] * u  # dL/deps_hat
    if WRITE_U:
        tl.store(geu_ptr + offs, _cast_out((1.0 - w) * g_eh, geu_ptr), mask=mask)
    if WRITE_C:
        tl.store(gec_ptr + offs, _cast_out(w * g_eh, gec_ptr), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _tile(rows, D, budget):
    """-> (BLOCK_R, BLOCK_D): BLOCK_D up to the budget of elements per tile, whole rows packed below it."""
    block_d = min(triton.next_power_of_2(D), budget)
    return max(1, min(triton.next_power_of_2(rows), budget // block_d)), block_d


def launch_fused_fwd(eu, ec, er, xt, xp, coefs, w, mean):
    """eu..xp: (rows, D) contiguous; coefs: ((a, pa), (b, pb), (s, ps)) -> (r (rows,) fp32, u (rows, D) fp32)."""
    rows, D = eu.shape
    out = utils.empty_out((rows,), torch.float32, eu.device)
    res = utils.empty_out((rows, D), torch.float32, eu.device)
    (a, pa), (b, pb), (s, ps) = coefs
    block_r, block_d = _tile(rows, D, 16384 if INTERPRET else 2048)  # the step forward's tiles
    _fused_fwd_kernel[(triton.cdiv(rows, block_r),)](
        eu,
        ec,
        er,
        xt,
        xp,
        a,
        b,
        s,
        out,
        res,
        rows,
        D,
        pa,
        pb,
        ps,
        w,
        MEAN=mean,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=8 if block_r * block_d >= 2048 else 4,
    )
    return out, res


def launch_residual_bwd(res, coefs, w, mean, g, scale, dtypes, write_u, write_c):
    """res: (rows, D) fp32 u; g: (rows,) fp32 dL/dr; scale: (1,) fp32 upstream; dtypes: of (eps_u, eps_c)
    -> (grad_u, grad_c) (rows, D) in those dtypes (None where not requested)."""
    rows, D = res.shape
    _, (b, pb), (s, ps) = coefs
    geu = utils.empty_out(res.shape, dtypes[0], res.device) if write_u else None
    gec = utils.empty_out(res.shape, dtypes[1], res.device) if write_c else None
    if not (write_u or write_c):
        return geu, gec
    block_r, block_d = _tile(rows, D, 16384 if INTERPRET else 2048)  # one fp32 load, two stores per element
    n_d_tiles = triton.cdiv(D, block_d)
    _residual_bwd_kernel[(triton.cdiv(rows, block_r) * n_d_tiles,)](
        res,
        b,
        s,
        g,
        scale,
        geu if write_u else gec,
        gec if write_c else geu,
        rows,
        D,
        pb,
        ps,
        n_d_tiles,
        w,
        MEAN=mean,
        WRITE_U=write_u,
        WRITE_C=write_c,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return geu, gec


# ----------------------------------------------------------------------------------------------
# autograd.Function and public entry point
# ----------------------------------------------------------------------------------------------
class _FusedPRDPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eu, ec, er, xt, xp, ro, rw, coefs, w, mean, clip, beta, residual, grad_enabled):
        # eu, ec, er, xt, xp: (G*B*T, D) contiguous; ro: (G, B, T); rw: (G, B) -> 0-dim fp32.
        # grad_enabled: grad mode at the call (forward runs without it; under no_grad nothing is saved)
        G, B, T = ro.shape
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        if need_grad and residual:
            r, res = launch_fused_fwd(eu, ec, er, xt, xp, coefs, w, mean)  # (G*B*T,), (G*B*T, D) fp32
        else:
            r = launch_step_fwd(eu, ec, er, xt, xp, coefs, w, mean)  # (G*B*T,) fp32
        loss, grad_r = launch_rdp_loss(r.view(G, B, T), ro, rw, clip, beta, write_grad=need_grad)
        if need_grad:
            ctx.save_for_backward(grad_r, *((res,) if residual else (eu, ec, xt, xp)))
            ctx.coefs, ctx.w, ctx.mean, ctx.residual = coefs, w, mean, residual
            ctx.dtypes = (eu.dtype, ec.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_r, *saved = ctx.saved_tensors
        scale = grad_loss.to(torch.float32).reshape(1).contiguous()
        write_u, write_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.residual:
            geu, gec = launch_residual_bwd(
                saved[0], ctx.coefs, ctx.w, ctx.mean, grad_r.view(-1), scale, ctx.dtypes, write_u, write_c
            )
        else:
            geu, gec = launch_step_bwd(
                *saved,
                ctx.coefs,
                ctx.w,
                ctx.mean,
                grad_r.view(-1),
                scale=scale,
                write_u=write_u,
                write_c=write_c,
            )
        return geu, gec, None, None, None, None, None, None, None, None, None, None, None, None


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
    backward="residual",
):
    """PRDP loss straight from whole trajectories -> 0-dim fp32, differentiable in eps_uncond, eps_cond.

    eps_uncond, eps_cond: (G, B, T, D...) raw UNet outputs (fp32 / bf16 / fp16);
    eps_ref, x_t, x_prev: (G, B, T, D...) constants, any float dtype (latent dims are flattened);
    log_ratios_old: (G, B, T); rewards: (G, B); a, b, sigma: (T,) tensors or scalars;
    guidance_scale w; clip_range eps >= 0; kl_weight beta > 0; reduction "sum" or "mean" over D.
    backward: "residual" (default: the forward saves u = x_prev - mu_theta in fp32, one (G, B, T, D) tensor
    held until the backward, which reads only u: 4s + 3c + 8 bytes per element in all) or "recompute" (nothing
    (G, B, T, D)-sized saved; the backward re-reads eps_u, eps_c, x_t, x_prev: 6s + 5c bytes); same gradients.
    PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch") reshaped to (G, B, T)
    followed by prdp_ds.loss.rdp_loss(..., impl="torch").
    """
    fn = "fused_prdp_loss_triton"
    check_reduction(fn, reduction)
    if backward not in BACKWARDS:
        raise ValueError(f"{fn}: backward must be one of {BACKWARDS}, got {backward!r}")
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
        *flat,
        log_ratios_old.contiguous(),
        rewards.contiguous(),
        coefs,
        w,
        reduction == "mean",
        clip,
        beta,
        backward == "residual",
        torch.is_grad_enabled(),
    )
