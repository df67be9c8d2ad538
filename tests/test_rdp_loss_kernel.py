"""kernels.rdp_loss (docs/design.md §5, §10.2) against an fp64 reference and the PyTorch reference
prdp_ds.loss.rdp_loss(..., impl="torch"), including torch's tie convention for the max (torch.maximum
splits 0.5/0.5 at exact ties); at an exact clip bound the kernel's documented subgradient (0.5 per
bound touched) is checked against a reference that writes it out, since torch.clamp's differs
between torch versions.

Tolerance rule: the kernel's max error vs fp64 must be <= 2x the same-dtype PyTorch reference's
error vs fp64, plus a small atol relative to the quantity's scale."""

import pytest
import torch

from kernels import rdp_loss_triton
from kernels.rdp_loss import launch_rdp_loss
from prdp_ds.loss import prdp_loss_reference, rdp_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: TRITON_INTERPRET=1


def make_inputs(G, B, T, clip="mixed", seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(G, B, T, generator=g)
    ro = r + 0.1 * torch.randn(G, B, T, generator=g)
    rw = torch.randn(G, B, generator=g)
    if ties:
        rw = (2 * rw).round()  # many exactly tied rewards
    clip_range = {"mixed": 0.08, "inactive": 10.0, "active": 1e-6}[clip]
    return r.to(DEVICE), ro.to(DEVICE), rw.to(DEVICE), clip_range, 0.7


def err(x, exact):
    return (x.detach().double() - exact).abs().max().item()


def assert_rule(name, fast, torch_ref, exact, atol):
    e_fast, e_ref = err(fast, exact), err(torch_ref, exact)
    assert e_fast <= 2 * e_ref + atol, f"{name}: kernel err {e_fast:.3e} > 2 x torch err {e_ref:.3e} + {atol:.1e}"


def check_against_refs(r, ro, rw, clip_range, beta, upstream=2.5, dtype=torch.float32):
    r = r.to(dtype)
    r_k, r_t = r.clone().requires_grad_(), r.clone().requires_grad_()
    r_64 = r.double().requires_grad_()
    L_k = rdp_loss_triton(r_k, ro, rw, clip_range, beta)
    L_t = rdp_loss(r_t, ro, rw, clip_range, beta)
    L_64 = rdp_loss(r_64, ro.double(), rw.double(), clip_range, beta)
    assert L_k.shape == () and L_k.dtype == torch.float32 and torch.isfinite(L_k)
    assert_rule("loss", L_k, L_t, L_64, 1e-6 * abs(L_64.item()) + 1e-30)
    (g_k,) = torch.autograd.grad(L_k * upstream, r_k)
    (g_t,) = torch.autograd.grad(L_t * upstream, r_t)
    (g_64,) = torch.autograd.grad(L_64 * upstream, r_64)
    assert g_k.dtype == r.dtype and g_k.shape == r.shape and torch.isfinite(g_k).all()
    assert_rule("grad", g_k, g_t, g_64, 1e-6 * g_64.abs().max().item() + 1e-30)
    return L_k, g_k


SHAPES = [(1, 2, 1), (3, 17, 50), (2, 1, 5), (5, 2, 3), (1, 17, 1), (4, 5, 50)]


@pytest.mark.parametrize("G,B,T", SHAPES)
@pytest.mark.parametrize("clip", ["mixed", "inactive", "active"])
def test_matches_fp64(poison, G, B, T, clip):
    check_against_refs(*make_inputs(G, B, T, clip=clip, seed=G * 100 + B + T))


@pytest.mark.parametrize("G,B,T", [(3, 17, 50), (5, 4, 3)])
def test_tied_rewards(poison, G, B, T):
    L, g = check_against_refs(*make_inputs(G, B, T, seed=1, ties=True))
    assert L > 0


def test_all_tied_and_mixed_groups(poison):
    r, ro, rw, clip, beta = make_inputs(4, 5, 7, seed=2)
    # all groups tied: loss exactly 0, gradient exactly 0, no NaN
    tied = torch.full_like(rw, 0.3)
    r_k = r.clone().requires_grad_()
    L = rdp_loss_triton(r_k, ro, tied, clip, beta)
    L.backward()
    assert L.item() == 0.0 and torch.equal(r_k.grad, torch.zeros_like(r))
    # groups 0 and 2 tied, 1 and 3 not: the mean runs over the 2 valid groups only
    rw[0], rw[2] = 1.0, -2.0
    check_against_refs(r, ro, rw, clip, beta)


@pytest.mark.parametrize("G,B,T,seed", [(3, 6, 20, 1), (2, 17, 7, 2), (4, 5, 50, 3)])
def test_max_branch_at_paper_beta(poison, G, B, T, seed):
    """beta = 3e-5, clip 1e-4: e and e' of a pair round alike in fp32; the kernel decides the max from
    R - C and its gradient matches fp64 (comparing the rounded squares misses by ~20-50%)."""
    gen = torch.Generator().manual_seed(seed)
    ro = torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 1e-3
    r = ro + torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 6e-5
    rw = torch.randn(G, B, generator=gen, dtype=torch.float64) * 0.01
    r64 = r.clone().to(DEVICE).requires_grad_()
    rdp_loss(r64, ro.to(DEVICE), rw.to(DEVICE), 1e-4, 3e-5).backward()
    r32 = r.float().to(DEVICE).requires_grad_()
    rdp_loss_triton(r32, ro.float().to(DEVICE), rw.float().to(DEVICE), 1e-4, 3e-5).backward()
    rel = (r32.grad.double() - r64.grad).abs().max() / r64.grad.abs().max()
    assert rel < 1e-4, f"kernel gradient off by {rel:.2e} of its scale"


def test_max_tie_splits_gradient(poison):
    """e^2 == e'^2 with e = -e': torch.maximum gives 0.5 / 0.5, so dL/dr = [2, -2], not [4, -4]."""
    r = torch.tensor([[[3.0], [0.0]]], device=DEVICE)
    ro = torch.tensor([[[-0.5], [1.5]]], device=DEVICE)  # bands [-1, 0] and [1, 2]: both clipped
    rw = torch.tensor([[1.0, 0.0]], device=DEVICE)
    r_k, r_t = r.clone().requires_grad_(), r.clone().requires_grad_()
    L_k = rdp_loss_triton(r_k, ro, rw, 0.5, 1.0)
    L_t = rdp_loss(r_t, ro, rw, 0.5, 1.0)
    (1.5 * L_k).backward()
    (1.5 * L_t).backward()
    assert L_k.item() == L_t.item() == 4.0
    assert torch.equal(r_t.grad, torch.tensor([[[3.0], [-3.0]]], device=DEVICE))  # what torch does here
    assert torch.equal(r_k.grad, r_t.grad)


def convention_loss(r, ro, rw, clip_range, beta):
    """The loss in fp64 with the kernel's documented subgradients written out, not taken from torch
    (torch.clamp's at a bound differs between torch versions): clamp' = 1 strictly inside the band,
    0.5 per bound r sits exactly on, 0 outside; an exact max tie splits 0.5 / 0.5."""
    r, ro, rw = r.double(), ro.detach().double(), rw.double()
    lo, hi = ro - clip_range, ro + clip_range
    rd = r.detach()
    d = (
        ((rd > lo) & (rd < hi)).double()
        + 0.5 * ((rd == lo) & (rd <= hi)).double()
        + 0.5 * ((rd == hi) & (rd >= lo)).double()
    )
    c = torch.clamp(rd, lo, hi) + d * (r - rd)  # value clamp(r), derivative d
    R, C = r.mean(-1), c.mean(-1)
    target = (rw[:, :, None] - rw[:, None, :]) / beta
    m = (R[:, :, None] - R[:, None, :] - target) ** 2
    mc = (C[:, :, None] - C[:, None, :] - target) ** 2
    wa = torch.where(m > mc, 1.0, torch.where(m == mc, 0.5, 0.0)).detach()
    pair = wa * m + (1 - wa) * mc  # value max(m, mc)
    valid = target > 0
    n = valid.sum((1, 2))
    per_group = torch.where(valid, pair, 0.0).sum((1, 2)) / n.clamp(min=1)
    return per_group[n > 0].mean()


@pytest.mark.parametrize("clip_range", [0.25, 0.0])
def test_clamp_bounds_subgradient(poison, clip_range):
    """r exactly on a clip bound (and lo == hi == r for clip 0): the documented subgradient."""
    vals = torch.tensor([0.25, 0.75, 0.5, 1.0, 0.0], device=DEVICE)
    r = torch.stack([vals.roll(k) for k in range(3)])[None]  # (1, 3, 5), every value per image
    ro = torch.full_like(r, 0.5)
    rw = torch.tensor([[0.0, 1.0, 3.0]], device=DEVICE)
    r_k, r_x = r.clone().requires_grad_(), r.clone().requires_grad_()
    L_k = rdp_loss_triton(r_k, ro, rw, clip_range, 0.5)
    L_x = convention_loss(r_x, ro, rw, clip_range, 0.5)
    (0.7 * L_k).backward()
    (0.7 * L_x).backward()
    torch.testing.assert_close(L_k.double(), L_x.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(r_k.grad, r_x.grad, rtol=1e-6, atol=1e-7)


def test_clip_inactive_ties_everywhere(poison):
    """Clip inactive: R == C exactly, every pair is a max tie (0.5 / 0.5) in kernel and torch."""
    r, ro, rw, _, beta = make_inputs(3, 6, 4, seed=4)
    L_k, g_k = check_against_refs(r, r.clone(), rw, 1e-3, beta)  # r == r_old: on-policy step
    r_k = r.clone().requires_grad_()
    rdp_loss_triton(r_k, r, rw, 0.0, beta).backward()  # lo == hi == r
    torch.testing.assert_close(r_k.grad, g_k / 2.5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_log_ratios(poison, dtype):
    r, ro, rw, clip, beta = make_inputs(3, 17, 50, seed=5)
    check_against_refs(r, ro.to(dtype), rw, clip, beta, dtype=dtype)


@pytest.mark.parametrize("block_g,chunks", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_several_programs(poison, block_g, chunks):
    """Force the multi-program path (partials + sum) and compare with the fp64 reference."""
    r, ro, rw, clip, beta = make_inputs(7, 5, 9, seed=6)
    rw[3] = 0.0  # one group without valid pairs
    L, grad = launch_rdp_loss(r, ro, rw, clip, beta, True, block_g=block_g, chunks_per_prog=chunks)
    r64 = r.double().requires_grad_()
    L64 = rdp_loss(r64, ro.double(), rw.double(), clip, beta)
    (g64,) = torch.autograd.grad(L64, r64)
    assert abs(L.item() - L64.item()) <= 1e-5 * L64.item()
    assert (grad.double() - g64).abs().max() <= 1e-5 * g64.abs().max()


def test_non_contiguous_inputs(poison):
    r, ro, rw, clip, beta = make_inputs(3, 5, 7, seed=7)
    rn = r.permute(2, 0, 1).contiguous().permute(1, 2, 0).requires_grad_()
    ron = torch.stack([ro, ro], dim=-1)[..., 1]
    rwn = rw.t().contiguous().t()
    assert not (rn.is_contiguous() or ron.is_contiguous() or rwn.is_contiguous())
    rc = r.clone().requires_grad_()
    Ln, Lc = rdp_loss_triton(rn, ron, rwn, clip, beta), rdp_loss_triton(rc, ro, rw, clip, beta)
    assert torch.equal(Ln, Lc)
    Ln.backward()
    Lc.backward()
    assert torch.equal(rn.grad, rc.grad)


def test_without_grad_and_dispatch(poison):
    r, ro, rw, clip, beta = make_inputs(2, 5, 3, seed=8)
    L1 = rdp_loss_triton(r, ro, rw, clip, beta)  # no grad needed: no dL/dr written
    assert not L1.requires_grad
    L2 = rdp_loss(r.clone().requires_grad_(), ro, rw, clip, beta, impl="triton")
    assert torch.equal(L1, L2.detach())


def test_consistent_with_paper_reference_on_log_probs():
    g = torch.Generator().manual_seed(9)
    lp_ref = -8000 + torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    lp = lp_ref + torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    lp_old = lp + 0.1 * torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    rw = torch.randn(2, 4, generator=g, dtype=torch.float64)
    lp_ref, lp, lp_old, rw = (t.to(DEVICE) for t in (lp_ref, lp, lp_old, rw))
    L_ref = prdp_loss_reference(lp, lp_old, lp_ref, rw, 0.05, 0.5)
    L_k = rdp_loss_triton((lp - lp_ref).float(), (lp_old - lp_ref).float(), rw.float(), 0.05, 0.5)
    assert abs(L_k.item() - L_ref.item()) <= 1e-5 * L_ref.item()


def test_validation_errors():
    r, ro, rw, clip, beta = make_inputs(2, 3, 4)
    with pytest.raises(ValueError, match=r"log_ratios must have shape \(G, B, T\)"):
        rdp_loss_triton(r[0], ro[0], rw, clip, beta)
    with pytest.raises(ValueError, match="log_ratios_old must have shape"):
        rdp_loss_triton(r, ro[:, :2], rw, clip, beta)
    with pytest.raises(ValueError, match="rewards must have shape"):
        rdp_loss_triton(r, ro, rw[:, :2], clip, beta)
    with pytest.raises(ValueError, match="clip_range must be >= 0"):
        rdp_loss_triton(r, ro, rw, -1.0, beta)
    with pytest.raises(ValueError, match="kl_weight must be > 0"):
        rdp_loss_triton(r, ro, rw, clip, 0.0)
    with pytest.raises(ValueError, match="rewards requires grad"):
        rdp_loss_triton(r, ro, rw.clone().requires_grad_(), clip, beta)
    with pytest.raises(TypeError, match="rewards must be a floating-point"):
        rdp_loss_triton(r, ro, rw.long(), clip, beta)
