"""Fused per-step log-ratio of the DDIM (eta > 0) policy with classifier-free guidance (docs/design.md §4, §10.1).

Math. Per row (one image at one denoising step) with D latent elements, the policy is
N(mu, sigma^2 I) with mu affine in the guided noise prediction, mu = a x_t + b eps_hat. Given the
raw UNet outputs eps_u, eps_c, the guidance scale w and the frozen reference's guided prediction
eps_ref,

    eps_hat = eps_u + w (eps_c - eps_u)
    r       = sum_d b (eps_hat - eps_ref) (2 x_prev - 2 a x_t - b (eps_hat + eps_ref)) / (2 sigma^2)

which is log N(x_prev; mu_theta, sigma^2) - log N(x_prev; mu_ref, sigma^2) written without
subtracting two log-probs of size ~D (the cancellation-free form of docs/design.md §4). reduction="mean"
divides by D. Gradient (only eps_u and eps_c are differentiable):

    dr/deps_hat = b (x_prev - mu_theta) / sigma^2,   mu_theta = a x_t + b eps_hat
    dr/deps_u   = (1 - w) dr/deps_hat,   dr/deps_c = w dr/deps_hat      (times upstream g_row, /D for mean)

Kernels. The forward reads each of the five (rows, D) tensors once, in tiles of (BLOCK_R rows,
BLOCK_D elements), converts to fp32 whatever the storage dtype and accumulates in fp32 (a
(BLOCK_R, BLOCK_D) register accumulator, tree-reduced at the end). The backward recomputes
eps_hat and mu from the inputs (nothing (rows, D)-sized is saved besides the inputs themselves)
and writes the two gradients in the inputs' dtypes (bf16 rounded to nearest even by hand, so the
interpreter and compiled Triton agree: `_cast_out`); it is purely elementwise over a 1-D grid of
tiles. The coefficients a, b, sigma are fp32 arrays indexed by row % period (period 1: a scalar,
period rows: one per row, period T: one per step of a flattened (G, B, T) trajectory batch).

PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch").
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels.utils as utils
from kernels.utils import INTERPRET, check_device, check_latents, check_reduction, coef_arg, flat_rows, scalar_arg


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _step_log_ratio_fwd_kernel(
    eu_ptr,
    ec_ptr,
    er_ptr,
    xt_ptr,
    xp_ptr,  # (rows, D) contiguous, any float dtype
    a_ptr,
    b_ptr,
    s_ptr,  # (a_period,), (b_period,), (s_period,) fp32
    out_ptr,  # (rows,) fp32
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
    # per-row coefficients a, b, s: (BLOCK_R,) fp32; a2, b2: (BLOCK_R, 1)
    a = tl.load(a_ptr + r_offs % a_period, mask=r_mask, other=0.0)
    b = tl.load(b_ptr + r_offs % b_period, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + r_offs % s_period, mask=r_mask, other=1.0)
    a2 = a[:, None]
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
    r = tl.sum(acc, axis=1) / (2.0 * s * s)  # (BLOCK_R,)
    if MEAN:
        r = r / D
    tl.store(out_ptr + r_offs, r, mask=r_mask)


@triton.jit
def _cast_out(x, ptr):
    """fp32 -> the element type of ptr, round-to-nearest-even. For bf16 the rounding is done by
    hand on the bits: the Triton interpreter's fp32 -> bf16 cast truncates, while compiled Triton
    rounds to nearest even; rounding first makes both exact (the final cast is then lossless)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _step_log_ratio_bwd_kernel(
    eu_ptr,
    ec_ptr,
    xt_ptr,
    xp_ptr,  # (rows, D) contiguous, any float dtype
    a_ptr,
    b_ptr,
    s_ptr,  # coefficient arrays as in the forward
    g_ptr,  # (rows,) fp32 upstream dL/dr
    scale_ptr,  # (1,) fp32 extra upstream factor (HAS_SCALE)
    geu_ptr,
    gec_ptr,  # (rows, D) outputs, dtypes of eps_u / eps_c
    rows,
    D,
    a_period,
    b_period,
    s_period,
    n_d_tiles,
    w,
    MEAN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
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
    a = tl.load(a_ptr + r_offs % a_period, mask=r_mask, other=0.0)
    b = tl.load(b_ptr + r_offs % b_period, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + r_offs % s_period, mask=r_mask, other=1.0)
    g = tl.load(g_ptr + r_offs, mask=r_mask, other=0.0)  # (BLOCK_R,) upstream dL/dr
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    coef = g * b / (s * s)  # (BLOCK_R,)
    if MEAN:
        coef = coef / D
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = r_mask[:, None] & (d_offs < D)[None, :]
    offs = r_offs.to(tl.int64)[:, None] * D + d_offs[None, :]
    # eu, ec, xt, xp, eh, mu, g_eh: (BLOCK_R, BLOCK_D) fp32; this program's one tile
    eu = tl.load(eu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ec = tl.load(ec_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(xp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eh = eu + w * (ec - eu)
    mu = a[:, None] * xt + b[:, None] * eh  # mu_theta
    g_eh = coef[:, None] * (xp - mu)  # dL/deps_hat
    if WRITE_U:
        tl.store(geu_ptr + offs, _cast_out((1.0 - w) * g_eh, geu_ptr), mask=mask)
    if WRITE_C:
        tl.store(gec_ptr + offs, _cast_out(w * g_eh, gec_ptr), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (shared with kernels.fused)
# ----------------------------------------------------------------------------------------------
def _next_pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _tile_budget():
    # Interpreter: each tl op is one numpy call per program, so fewer, larger tiles are faster.
    return 16384 if INTERPRET else 2048


def _fwd_config(rows, D):
    block_d = min(_next_pow2(D), _tile_budget())
    block_r = max(1, min(_next_pow2(rows), _tile_budget() // block_d))
    return block_r, block_d, (8 if block_r * block_d >= 2048 else 4)


def _bwd_config(rows, D):
    budget = _tile_budget() // 2 if not INTERPRET else _tile_budget()
    block_d = min(_next_pow2(D), budget)
    block_r = max(1, min(_next_pow2(rows), budget // block_d))
    return block_r, block_d, 4


def launch_step_fwd(eu, ec, er, xt, xp, coefs, w, mean):
    """eu..xp: (rows, D) contiguous; coefs: ((a, pa), (b, pb), (s, ps)) -> r (rows,) fp32."""
    rows, D = eu.shape
    out = utils.empty_out((rows,), torch.float32, eu.device)
    (a, pa), (b, pb), (s, ps) = coefs
    block_r, block_d, warps = _fwd_config(rows, D)
    grid = (triton.cdiv(rows, block_r),)
    _step_log_ratio_fwd_kernel[grid](
        eu,
        ec,
        er,
        xt,
        xp,
        a,
        b,
        s,
        out,
        rows,
        D,
        pa,
        pb,
        ps,
        w,
        MEAN=mean,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return out


def launch_step_bwd(eu, ec, xt, xp, coefs, w, mean, g, scale=None, write_u=True, write_c=True):
    """g: (rows,) fp32 contiguous upstream, times scale[0] when given -> (grad_u, grad_c) (rows, D)
    in the dtypes of eu / ec (None where not requested)."""
    rows, D = eu.shape
    (a, pa), (b, pb), (s, ps) = coefs
    geu = utils.empty_out(eu.shape, eu.dtype, eu.device) if write_u else None
    gec = utils.empty_out(ec.shape, ec.dtype, ec.device) if write_c else None
    if not (write_u or write_c):
        return geu, gec
    block_r, block_d, warps = _bwd_config(rows, D)
    n_d_tiles = triton.cdiv(D, block_d)
    grid = (triton.cdiv(rows, block_r) * n_d_tiles,)
    _step_log_ratio_bwd_kernel[grid](
        eu,
        ec,
        xt,
        xp,
        a,
        b,
        s,
        g,
        scale if scale is not None else g,
        geu if write_u else gec,
        gec if write_c else geu,
        rows,
        D,
        pa,
        pb,
        ps,
        n_d_tiles,
        w,
        MEAN=mean,
        HAS_SCALE=scale is not None,
        WRITE_U=write_u,
        WRITE_C=write_c,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return geu, gec


# ----------------------------------------------------------------------------------------------
# autograd.Function and public entry point
# ----------------------------------------------------------------------------------------------
class _StepLogRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eu, ec, er, xt, xp, coefs, w, mean):
        # eu, ec, er, xt, xp: (rows, D) contiguous; returns (rows,) fp32
        r = launch_step_fwd(eu, ec, er, xt, xp, coefs, w, mean)
        ctx.save_for_backward(eu, ec, xt, xp)
        ctx.coefs, ctx.w, ctx.mean = coefs, w, mean
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_r):
        eu, ec, xt, xp = ctx.saved_tensors
        g = grad_r.to(torch.float32).contiguous()  # upstream of .sum() is stride-0: materialize
        geu, gec = launch_step_bwd(
            eu,
            ec,
            xt,
            xp,
            ctx.coefs,
            ctx.w,
            ctx.mean,
            g,
            write_u=ctx.needs_input_grad[0],
            write_c=ctx.needs_input_grad[1],
        )
        return geu, gec, None, None, None, None, None, None


def step_log_ratio_triton(eps_uncond, eps_cond, eps_ref, x_t, x_prev, a, b, sigma, guidance_scale, reduction="sum"):
    """log pi(x_prev | x_t; eps_hat) - log pi(x_prev | x_t; eps_ref) per row, fp32, one Triton pass.

    eps_uncond, eps_cond: (rows, ...) raw UNet outputs (fp32 / bf16 / fp16), differentiable;
    eps_ref, x_t, x_prev: (rows, ...) same shape, any float dtype, treated as constants;
    a, b, sigma: float, 0-dim or (rows,) tensors; guidance_scale: float. Returns (rows,) fp32.
    Non-contiguous inputs are copied to contiguous memory first.
    PyTorch reference: prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch").
    """
    fn = "step_log_ratio_triton"
    check_reduction(fn, reduction)
    named = dict(eps_uncond=eps_uncond, eps_cond=eps_cond, eps_ref=eps_ref, x_t=x_t, x_prev=x_prev)
    shape = check_latents(fn, named, min_dim=1, layout="(rows, ...)")
    rows = shape[0]
    if rows == 0 or eps_uncond.numel() == 0:
        raise ValueError(f"{fn}: empty input of shape {tuple(shape)}")
    device = check_device(fn, named)
    coefs = tuple(coef_arg(fn, n, v, rows, device, "one per row") for n, v in (("a", a), ("b", b), ("sigma", sigma)))
    w = scalar_arg(fn, "guidance_scale", guidance_scale)
    flat = [flat_rows(t, rows) for t in named.values()]
    return _StepLogRatio.apply(*flat, coefs, w, reduction == "mean")
