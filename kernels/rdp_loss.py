"""The PRDP loss (reward difference prediction, proximal clipping) in one launch (docs/design.md §5, §10.2).

Math. For prompt group g, image i, step t, with r = log-ratio (theta vs ref), r_old, rewards rw,
clip range eps and KL weight beta:

    c_{i,t} = clamp(r_{i,t}, r_old_{i,t} - eps, r_old_{i,t} + eps)
    R_i = mean_t r_{i,t},   C_i = mean_t c_{i,t}
    for every ordered pair (i, j) with target_ij = (rw_i - rw_j) / beta > 0 (valid pairs):
        e_ij = R_i - R_j - target_ij,  e'_ij = C_i - C_j - target_ij
        l_ij = max(e_ij^2, e'_ij^2)
    L_g = mean of l_ij over the valid pairs of g;   L = mean of L_g over groups with >= 1 valid pair
    (L = 0 when no group has a valid pair).
Which square is larger is decided without cancellation, from the sign of e^2 - e'^2 = (e - e')(e + e')
with e - e' = Dg_i - Dg_j, Dg = mean_t (r - clamp(r)) (exact where the clip is inactive): at the paper's
beta, e and e' round alike in fp32 and comparing them would pick the branch, and so the gradient, by
rounding (docs/design.md §5).

Gradient, with s_g = 1 / (n_pairs_g * n_valid_groups) for a valid group (else 0) and these
subgradients at kinks: an exact max tie splits 0.5 / 0.5 (as torch.maximum does); clamp' is 1
strictly inside the band, 0.5 for each bound r sits exactly on, 0 outside (torch.clamp's value on a
bound depends on the torch version: docs/design.md §5):

    A_ij  = s_g * 2 e_ij  * [e_ij^2 > e'_ij^2 or 0.5 if equal]     (valid pairs only; the
    A'_ij = s_g * 2 e'_ij * [e'_ij^2 > e_ij^2 or 0.5 if equal]      comparison as above)
    dL/dR_k = sum_j A_kj - sum_i A_ik,   dL/dC_k likewise with A'
    dL/dr_{k,t} = dL/dR_k / T + dL/dC_k / T * clamp'(r_{k,t})

Kernel and why it is one launch. The (G, B, T) tensors are tiny (a few hundred KB at most), so a
program processes BLOCK_G whole groups at a time as (BLOCK_G, BLOCK_B, BLOCK_T) tiles with
(BLOCK_G, BLOCK_B, BLOCK_B) pair tiles, looping over T in chunks (pass A: R, C and Dg; pass B: write
dL/dr) and over its chunks of groups. The cross-group mean needs the number of valid groups before
any gradient can be scaled: every program first counts it itself from the (G, B) rewards (a
pairwise sign test, identical to the one the loss uses, O(G B^2) flops, negligible), so dL/dr
leaves the kernel final. For the usual sizes (G * B * T up to ~32K elements on GPU; always under the
interpreter) a single program covers every group and writes the loss directly: one launch, no
atomics, deterministic. Only for larger batches the groups are spread over several programs,
each writing its share of the loss, and a sum over those few partials (a second tiny reduction,
deterministic, instead of a nondeterministic atomic add) finishes the loss. dL/dr is computed in
the forward (when log_ratios requires grad), saved, and scaled by the upstream gradient in backward.

PyTorch reference: prdp_ds.loss.rdp_loss(..., impl="torch") (and prdp_ds.loss.prdp_loss_reference
on log-probs).
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

import kernels.utils as utils
from kernels.utils import INTERPRET, check_device, check_tensor, scalar_arg


@triton.jit
def _rdp_loss_kernel(
    r_ptr,
    ro_ptr,  # (G, B, T) contiguous, any float dtype: log-ratios, old log-ratios
    rw_ptr,  # (G, B) contiguous, any float dtype: rewards
    grad_ptr,  # (G, B, T) fp32 out: dL/dr (only when WRITE_GRAD)
    part_ptr,  # (n_programs,) fp32 out: this program's share of the loss
    G,
    B,
    T,
    groups_per_prog,
    clip,
    beta,  # fp32 scalars: clip range eps, KL weight beta
    WRITE_GRAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    ig = tl.arange(0, BLOCK_G)
    ib = tl.arange(0, BLOCK_B)
    it = tl.arange(0, BLOCK_T)
    b_in = ib < B

    # 1. Number of groups with >= 1 valid pair, over all G groups (every program counts it).
    nv_acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gi = g0 + ig
        m2 = (gi < G)[:, None] & b_in[None, :]  # (BG, BB)
        rw = tl.load(rw_ptr + gi.to(tl.int64)[:, None] * B + ib[None, :], mask=m2, other=0.0)
        rw = rw.to(tl.float32)
        target = (rw[:, :, None] - rw[:, None, :]) / beta  # (BG, BB, BB)
        valid = m2[:, :, None] & m2[:, None, :] & (target > 0)
        cnt = tl.sum(tl.sum(valid.to(tl.float32), axis=2), axis=1)  # (BG,)
        nv_acc += (cnt > 0).to(tl.float32)
    inv_groups = 1.0 / tl.maximum(tl.sum(nv_acc, axis=0), 1.0)

    # 2. This program's groups, BLOCK_G at a time.
    part_acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    g_start = pid * groups_per_prog
    g_end = g_start + groups_per_prog
    for g0 in range(g_start, g_end, BLOCK_G):
        gi = g0 + ig
        m2 = ((gi < G) & (gi < g_end))[:, None] & b_in[None, :]  # (BG, BB)
        base = gi.to(tl.int64)[:, None, None] * B * T + ib[None, :, None] * T  # (BG, BB, 1)

        # pass A: R = mean_t r, C = mean_t clamp(r), Dg = mean_t (r - clamp(r))
        r_sum = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
        c_sum = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
        d_sum = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + it
            m3 = m2[:, :, None] & (tt < T)[None, None, :]  # (BG, BB, BT)
            offs = base + tt[None, None, :]
            r = tl.load(r_ptr + offs, mask=m3, other=0.0).to(tl.float32)  # (BG, BB, BT)
            ro = tl.load(ro_ptr + offs, mask=m3, other=0.0).to(tl.float32)
            c = tl.minimum(tl.maximum(r, ro - clip), ro + clip)  # clipped r
            r_sum += tl.sum(r, axis=2)
            c_sum += tl.sum(c, axis=2)
            d_sum += tl.sum(r - c, axis=2)
        R = r_sum / T  # (BG, BB)
        C = c_sum / T
        Dg = d_sum / T

        # pairs
        rw = tl.load(rw_ptr + gi.to(tl.int64)[:, None] * B + ib[None, :], mask=m2, other=0.0)
        rw = rw.to(tl.float32)
        target = (rw[:, :, None] - rw[:, None, :]) / beta  # (BG, BB, BB)
        valid = m2[:, :, None] & m2[:, None, :] & (target > 0)
        e = R[:, :, None] - R[:, None, :] - target  # (BG, BB, BB)
        ec = C[:, :, None] - C[:, None, :] - target
        m = e * e
        mc = ec * ec
        dec = (Dg[:, :, None] - Dg[:, None, :]) * (e + ec)  # sign of m - mc
        pair = tl.where(valid, tl.where(dec > 0, m, tl.where(dec < 0, mc, 0.5 * (m + mc))), 0.0)
        cnt = tl.sum(tl.sum(valid.to(tl.float32), axis=2), axis=1)  # (BG,)
        gsum = tl.sum(tl.sum(pair, axis=2), axis=1)
        part_acc += gsum / tl.maximum(cnt, 1.0)  # 0 for no pairs

        if WRITE_GRAD:
            s = tl.where(cnt > 0, inv_groups / tl.maximum(cnt, 1.0), 0.0)[:, None, None]  # (BG, 1, 1)
            tie = tl.where(dec == 0, 0.5, 0.0)
            wa = tl.where(valid, tl.where(dec > 0, 1.0, tie), 0.0) * s
            wc = tl.where(valid, tl.where(dec < 0, 1.0, tie), 0.0) * s
            A = 2.0 * e * wa  # (BG, BB, BB)
            Ac = 2.0 * ec * wc
            gR = (tl.sum(A, axis=2) - tl.sum(A, axis=1)) / T  # (BG, BB)
            gC = (tl.sum(Ac, axis=2) - tl.sum(Ac, axis=1)) / T
            # pass B: dL/dr = gR + gC * clamp'(r)
            for t0 in range(0, T, BLOCK_T):
                tt = t0 + it
                m3 = m2[:, :, None] & (tt < T)[None, None, :]
                offs = base + tt[None, None, :]
                r = tl.load(r_ptr + offs, mask=m3, other=0.0).to(tl.float32)
                ro = tl.load(ro_ptr + offs, mask=m3, other=0.0).to(tl.float32)
                lo = ro - clip
                hi = ro + clip
                dclamp = (
                    tl.where((r > lo) & (r < hi), 1.0, 0.0)
                    + tl.where((r == lo) & (r <= hi), 0.5, 0.0)
                    + tl.where((r == hi) & (r >= lo), 0.5, 0.0)
                )
                g = gR[:, :, None] + gC[:, :, None] * dclamp  # (BG, BB, BT)
                tl.store(grad_ptr + offs, g, mask=m3)

    tl.store(part_ptr + pid, tl.sum(part_acc, axis=0) * inv_groups)


def _config(G, B, T):
    """-> (BLOCK_G, BLOCK_B, BLOCK_T, chunks of BLOCK_G groups per program, num_warps)."""
    tile = 16384 if INTERPRET else 4096
    block_b = triton.next_power_of_2(B)
    block_t = min(triton.next_power_of_2(T), max(16, tile // block_b))
    block_g = max(1, min(triton.next_power_of_2(G), tile // (block_b * block_t), tile // (block_b * block_b)))
    n_chunks = triton.cdiv(G, block_g)
    chunks_per_prog = n_chunks if INTERPRET else min(n_chunks, 8)
    return block_g, block_b, block_t, chunks_per_prog, (4 if block_g * block_b * block_t <= 1024 else 8)


def launch_rdp_loss(r, ro, rw, clip, beta, write_grad, block_g=None, chunks_per_prog=None):
    """r, ro: (G, B, T) contiguous; rw: (G, B) contiguous -> (loss 0-dim fp32, dL/dr (G,B,T) fp32
    or None). block_g / chunks_per_prog override the config (tests use them to force several
    programs)."""
    G, B, T = r.shape
    bg, bb, bt, cpp, warps = _config(G, B, T)
    bg = block_g or bg
    cpp = chunks_per_prog or min(cpp, triton.cdiv(G, bg))
    groups_per_prog = bg * cpp
    n_prog = triton.cdiv(G, groups_per_prog)
    part = utils.empty_out((n_prog,), torch.float32, r.device)
    grad = utils.empty_out((G, B, T), torch.float32, r.device) if write_grad else None
    _rdp_loss_kernel[(n_prog,)](
        r,
        ro,
        rw,
        grad if write_grad else part,
        part,
        G,
        B,
        T,
        groups_per_prog,
        clip,
        beta,
        WRITE_GRAD=write_grad,
        BLOCK_G=bg,
        BLOCK_B=bb,
        BLOCK_T=bt,
        num_warps=warps,
    )
    loss = part[0] if n_prog == 1 else part.sum()
    return loss, grad


def check_rdp_args(fn, log_ratios, log_ratios_old, rewards, clip_range, kl_weight, ratios_name="log_ratios"):
    named = {ratios_name: log_ratios, "log_ratios_old": log_ratios_old, "rewards": rewards}
    for name, t in named.items():
        check_tensor(fn, name, t)
    if log_ratios.dim() != 3:
        raise ValueError(f"{fn}: {ratios_name} must have shape (G, B, T), got {tuple(log_ratios.shape)}")
    if log_ratios_old.shape != log_ratios.shape:
        raise ValueError(
            f"{fn}: log_ratios_old must have shape (G, B, T) = {tuple(log_ratios.shape)}, "
            f"got {tuple(log_ratios_old.shape)}"
        )
    if rewards.shape != log_ratios.shape[:2]:
        raise ValueError(
            f"{fn}: rewards must have shape (G, B) = {tuple(log_ratios.shape[:2])}, got {tuple(rewards.shape)}"
        )
    if log_ratios.numel() == 0:
        raise ValueError(f"{fn}: empty input of shape (G, B, T) = {tuple(log_ratios.shape)}")
    for name in ("log_ratios_old", "rewards"):
        if named[name].requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{fn}: {name} requires grad, but the kernel treats it as a constant "
                "(its gradient is not computed); pass it detached"
            )
    clip = scalar_arg(fn, "clip_range", clip_range)
    beta = scalar_arg(fn, "kl_weight", kl_weight)
    if not clip >= 0:
        raise ValueError(f"{fn}: clip_range must be >= 0, got {clip}")
    if not beta > 0:
        raise ValueError(f"{fn}: kl_weight must be > 0, got {beta}")
    return clip, beta


class _RDPLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, ro, rw, clip, beta):
        # r, ro: (G, B, T) contiguous; rw: (G, B) contiguous -> 0-dim fp32
        loss, grad = launch_rdp_loss(r, ro, rw, clip, beta, write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.dtype = r.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None


def rdp_loss_triton(log_ratios, log_ratios_old, rewards, clip_range, kl_weight):
    """The PRDP loss on log-ratios (G, B, T), old log-ratios (G, B, T), rewards (G, B) -> 0-dim fp32.

    Differentiable in log_ratios (fp32 math whatever the input dtype; rewards are used in fp32).
    clip_range >= 0, kl_weight > 0. Non-contiguous inputs are copied to contiguous memory first.
    PyTorch reference: prdp_ds.loss.rdp_loss(..., impl="torch").
    """
    fn = "rdp_loss_triton"
    clip, beta = check_rdp_args(fn, log_ratios, log_ratios_old, rewards, clip_range, kl_weight)
    check_device(fn, dict(log_ratios=log_ratios, log_ratios_old=log_ratios_old, rewards=rewards))
    return _RDPLoss.apply(log_ratios.contiguous(), log_ratios_old.contiguous(), rewards.contiguous(), clip, beta)
