"""kernels.step_logratio (docs/design.md §4, §10.1) against an fp64 reference and the PyTorch reference
prdp_ds.logratio.cfg_step_log_ratio(..., impl="torch").

Tolerance rule: the kernel's max error vs fp64 must be <= 2x the same-dtype PyTorch reference's
error vs fp64, plus a small atol relative to the quantity's natural scale."""

import pytest
import torch

import kernels.utils as ku
from kernels import step_log_ratio_triton
from prdp_ds.logratio import cfg_step_log_ratio

W = 4.5  # guidance scale
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: TRITON_INTERPRET=1


def make_inputs(rows, latent, dtype=torch.float32, seed=0, coef="row"):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, *latent)
    eu = torch.randn(shape, generator=g)
    ec = eu + 0.3 * torch.randn(shape, generator=g)
    eh = eu + W * (ec - eu)
    er = eh + 0.05 * torch.randn(shape, generator=g)  # reference close to policy
    xt = torch.randn(shape, generator=g)
    a_t = 0.9 + 0.2 * torch.rand(rows, generator=g)
    b_t = -0.1 - 0.2 * torch.rand(rows, generator=g)
    s_t = 0.05 + 0.5 * torch.rand(rows, generator=g)
    col = lambda c: c.reshape(rows, *[1] * len(latent))  # noqa: E731
    xp = col(a_t) * xt + col(b_t) * eh + col(s_t) * torch.randn(shape, generator=g)
    if coef == "float":
        a, b, s = (float(c[0]) for c in (a_t, b_t, s_t))
    elif coef == "0dim":
        a, b, s = (c[0].clone() for c in (a_t, b_t, s_t))
    else:
        a, b, s = a_t, b_t, s_t
    eu, ec = eu.to(dtype), ec.to(dtype)
    return tuple(x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in (eu, ec, er, xt, xp, a, b, s))


def ref64(eu, ec, er, xt, xp, a, b, s, w, reduction):
    """fp64 r (rows,) and the fp64 leaves for eps_u, eps_c (from the inputs' stored values)."""
    rows = eu.shape[0]
    f = lambda t: t.detach().double().reshape(rows, -1)  # noqa: E731
    col = lambda c: torch.as_tensor(c, dtype=torch.float64, device=eu.device).reshape(-1, 1).expand(rows, 1)  # noqa: E731
    eu64, ec64 = f(eu).requires_grad_(), f(ec).requires_grad_()
    er64, xt64, xp64 = f(er), f(xt), f(xp)
    a, b, s = col(a), col(b), col(s)
    eh = eu64 + w * (ec64 - eu64)
    terms = b * (eh - er64) * (2 * xp64 - 2 * a * xt64 - b * (eh + er64)) / (2 * s**2)
    r = terms.sum(1)
    scale = terms.abs().sum(1).max().item()  # natural error scale of the sum
    if reduction == "mean":
        r, scale = r / terms.shape[1], scale / terms.shape[1]
    return r, eu64, ec64, scale


def err(x, exact):
    return (x.detach().double().reshape(exact.shape) - exact).abs().max().item()


def assert_rule(name, fast, torch_ref, exact, atol):
    e_fast, e_ref = err(fast, exact), err(torch_ref, exact)
    assert e_fast <= 2 * e_ref + atol, f"{name}: kernel err {e_fast:.3e} > 2 x torch err {e_ref:.3e} + {atol:.1e}"


def check_against_refs(inputs, reduction, upstream_seed=1):
    eu, ec, er, xt, xp, a, b, s = inputs
    rows = eu.shape[0]
    eu_k, ec_k = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    eu_t, ec_t = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    r_k = step_log_ratio_triton(eu_k, ec_k, er, xt, xp, a, b, s, W, reduction)
    r_t = cfg_step_log_ratio(eu_t, ec_t, W, er, xt, xp, a, b, s, reduction, impl="torch")
    r_64, eu64, ec64, scale = ref64(eu, ec, er, xt, xp, a, b, s, W, reduction)
    assert r_k.dtype == torch.float32 and r_k.shape == (rows,)
    assert torch.isfinite(r_k).all()
    assert_rule("r", r_k, r_t, r_64, 1e-6 * scale)

    up = (torch.randn(rows, generator=torch.Generator().manual_seed(upstream_seed)) * 3 + 0.5).to(DEVICE)  # != 1
    gu_k, gc_k = torch.autograd.grad(r_k, (eu_k, ec_k), up)
    gu_t, gc_t = torch.autograd.grad(r_t, (eu_t, ec_t), up)
    gu_64, gc_64 = torch.autograd.grad(r_64, (eu64, ec64), up.double())
    for name, gk, gt, g64, like in (("grad eps_u", gu_k, gu_t, gu_64, eu), ("grad eps_c", gc_k, gc_t, gc_64, ec)):
        assert gk.dtype == like.dtype and gk.shape == like.shape, name
        assert torch.isfinite(gk).all(), name
        assert_rule(name, gk, gt, g64, 1e-6 * g64.abs().max().item())
    return r_k


SHAPES = [(1, (4, 7, 9)), (2, (5,)), (17, (4, 7, 9)), (17, (3, 1, 1)), (50, (2, 3))]


@pytest.mark.parametrize("rows,latent", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_fp64_fp32(poison, rows, latent, reduction):
    check_against_refs(make_inputs(rows, latent, seed=rows + len(latent)), reduction)


@pytest.mark.parametrize("coef", ["float", "0dim", "row"])
def test_coefficient_kinds(poison, coef):
    check_against_refs(make_inputs(17, (4, 7, 9), coef=coef, seed=3), "sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,latent", [(17, (4, 7, 9)), (2, (5,))])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_low_precision_eps(poison, dtype, rows, latent, reduction):
    check_against_refs(make_inputs(rows, latent, dtype=dtype, seed=7), reduction)


def test_mixed_dtypes_and_fp64_constants(poison):
    eu, ec, er, xt, xp, a, b, s = make_inputs(17, (4, 7, 9), seed=11)
    check_against_refs((eu.bfloat16(), ec, er.double(), xt.half(), xp.double(), a, b, s), "sum")


def test_exact_zero_when_policy_equals_reference(poison):
    eu, _, _, xt, xp, a, b, s = make_inputs(17, (4, 7, 9), seed=5)
    ec = eu.clone().requires_grad_()  # eps_hat == eps_u exactly, whatever w
    eu = eu.clone().requires_grad_()
    r = step_log_ratio_triton(eu, ec, eu.detach(), xt, xp, a, b, s, W)
    assert torch.equal(r, torch.zeros_like(r))
    gu, gc = torch.autograd.grad(r.sum(), (eu, ec))
    assert gc.abs().max() > 0 and torch.isfinite(gu).all()


def test_upstream_from_sum_and_single_grad(poison):
    """r.sum() hands the backward a stride-0 upstream; only eps_cond requires grad here."""
    eu, ec, er, xt, xp, a, b, s = make_inputs(17, (4, 7, 9), seed=9)
    ec_k, ec_t = ec.clone().requires_grad_(), ec.clone().requires_grad_()
    (2.5 * step_log_ratio_triton(eu, ec_k, er, xt, xp, a, b, s, W).sum()).backward()
    (2.5 * cfg_step_log_ratio(eu, ec_t, W, er, xt, xp, a, b, s).sum()).backward()
    torch.testing.assert_close(ec_k.grad, ec_t.grad, rtol=1e-5, atol=1e-5 * ec_t.grad.abs().max().item())


def test_non_contiguous_inputs(poison):
    eu, ec, er, xt, xp, a, b, s = make_inputs(17, (4, 7, 9), seed=13)
    # transposed copies and strided slices holding the same values
    nc = lambda t: t.transpose(1, 3).contiguous().transpose(1, 3)  # noqa: E731
    sl_ = lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # noqa: E731
    eu_n, ec_n = nc(eu).requires_grad_(), sl_(ec).requires_grad_()
    er_n, xt_n, xp_n = nc(er), sl_(xt), nc(xp)
    assert not any(t.is_contiguous() for t in (eu_n, ec_n, er_n, xt_n, xp_n))
    b_n = torch.stack([b, b], 1)[:, 0]
    assert not b_n.is_contiguous()
    r_n = step_log_ratio_triton(eu_n, ec_n, er_n, xt_n, xp_n, a, b_n, s, W)
    eu_c, ec_c = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    r_c = step_log_ratio_triton(eu_c, ec_c, er, xt, xp, a, b, s, W)
    assert torch.equal(r_n, r_c)
    up = torch.linspace(-2, 3, 17, device=DEVICE)
    g_n = torch.autograd.grad(r_n, (eu_n, ec_n), up)
    g_c = torch.autograd.grad(r_c, (eu_c, ec_c), up)
    for x, y in zip(g_n, g_c):
        assert x.shape == y.shape and torch.equal(x, y)


def test_dispatch_through_prdp_ds(poison):
    eu, ec, er, xt, xp, a, b, s = make_inputs(2, (4, 7, 9), seed=17)
    r1 = cfg_step_log_ratio(eu, ec, W, er, xt, xp, a, b, s, "mean", impl="triton")
    r2 = step_log_ratio_triton(eu, ec, er, xt, xp, a, b, s, W, "mean")
    assert torch.equal(r1, r2)


def test_validation_errors():
    eu, ec, er, xt, xp, a, b, s = make_inputs(3, (4, 5), seed=19)
    f = step_log_ratio_triton
    with pytest.raises(ValueError, match="x_prev has shape"):
        f(eu, ec, er, xt, xp[:, :, :4], a, b, s, W)
    with pytest.raises(TypeError, match="eps_ref must be a floating-point"):
        f(eu, ec, er.long(), xt, xp, a, b, s, W)
    with pytest.raises(ValueError, match="sigma must be a scalar or have 3 elements"):
        f(eu, ec, er, xt, xp, a, b, torch.ones(2), W)
    with pytest.raises(ValueError, match="reduction"):
        f(eu, ec, er, xt, xp, a, b, s, W, "max")
    with pytest.raises(ValueError, match="x_t requires grad"):
        f(eu, ec, er, xt.requires_grad_(), xp, a, b, s, W)
    with pytest.raises(ValueError, match="empty"):
        f(eu[:0], ec[:0], er[:0], xt[:0].detach(), xp[:0], a, b, s, W)
    with pytest.raises(ValueError, match="one device"):
        f(eu, ec, er.to("meta"), xt.detach(), xp, a, b, s, W)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(ku, "INTERPRET", False)
    eu, ec, er, xt, xp, a, b, s = (
        x.cpu() if isinstance(x, torch.Tensor) else x for x in make_inputs(2, (3,), seed=23)
    )  # CPU even on a GPU machine
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        step_log_ratio_triton(eu, ec, er, xt, xp, a, b, s, W)
