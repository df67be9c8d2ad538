"""kernels.fused (docs/design.md §10.3: §10.1 + §10.2 over whole trajectories) against an fp64 reference and the
PyTorch reference (cfg_step_log_ratio(impl="torch") + rdp_loss(impl="torch")).

Tolerance rule: the kernel's max error vs fp64 must be <= 2x the same-dtype PyTorch reference's
error vs fp64, plus a small atol relative to the quantity's scale."""

import pytest
import torch

import kernels.utils as ku
from kernels import fused_prdp_loss_triton, rdp_loss_triton, step_log_ratio_triton
from prdp_ds.logratio import cfg_step_log_ratio
from prdp_ds.loss import rdp_loss

W = 3.0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: TRITON_INTERPRET=1


def _r64(eu, ec, er, xt, xp, a, b, s, reduction):
    """fp64 log-ratios (G, B, T) from (G, B, T, D...) inputs and (T,) coefficients."""
    G, B, T = eu.shape[:3]
    f = lambda t: t.double().reshape(G, B, T, -1)  # noqa: E731
    col = lambda c: torch.as_tensor(c, dtype=torch.float64, device=eu.device).reshape(-1, 1).expand(T, 1)  # noqa: E731
    a, b, s = col(a), col(b), col(s)
    eh = f(eu) + W * (f(ec) - f(eu))
    terms = b * (eh - f(er)) * (2 * f(xp) - 2 * a * f(xt) - b * (eh + f(er))) / (2 * s**2)
    r = terms.sum(-1)
    return r / terms.shape[-1] if reduction == "mean" else r


def make_inputs(G, B, T, latent, dtype=torch.float32, clip="mixed", reduction="sum", seed=0, coef="tensor"):
    g = torch.Generator().manual_seed(seed)
    shape = (G, B, T, *latent)
    eu = torch.randn(shape, generator=g)
    ec = eu + 0.3 * torch.randn(shape, generator=g)
    eh = eu + W * (ec - eu)
    er = eh + 0.05 * torch.randn(shape, generator=g)
    e_old = eh + 0.02 * torch.randn(shape, generator=g)
    xt = torch.randn(shape, generator=g)
    a = 0.9 + 0.2 * torch.rand(T, generator=g)
    b = -0.1 - 0.2 * torch.rand(T, generator=g)
    s = 0.05 + 0.5 * torch.rand(T, generator=g)
    col = lambda c: c.reshape(1, 1, T, *[1] * len(latent))  # noqa: E731
    xp = col(a) * xt + col(b) * e_old + col(s) * torch.randn(shape, generator=g)
    r_old = _r64(e_old, e_old, er, xt, xp, a, b, s, reduction).float()  # w (e - e) = 0: eps_hat = e_old
    r_now = _r64(eu, ec, er, xt, xp, a, b, s, reduction)
    spread = (r_now - r_old.double()).abs()
    clip_range = {"active": 1e-7, "inactive": 1e6, "mixed": float(spread.median())}[clip]
    R = r_now.mean(-1)
    rw = torch.randn(G, B, generator=g)
    beta = float(rw.std() / R.std()) if G * B > 1 and R.std() > 0 else 1.0
    if coef == "float":
        a, b, s = float(a[0]), float(b[0]), float(s[0])
    eu, ec = eu.to(dtype), ec.to(dtype)
    eu, ec, er, xt, xp, r_old, rw = (t.to(DEVICE) for t in (eu, ec, er, xt, xp, r_old, rw))
    if coef != "float":
        a, b, s = a.to(DEVICE), b.to(DEVICE), s.to(DEVICE)
    return dict(
        eps_uncond=eu,
        eps_cond=ec,
        eps_ref=er,
        x_t=xt,
        x_prev=xp,
        log_ratios_old=r_old,
        rewards=rw,
        a=a,
        b=b,
        sigma=s,
        guidance_scale=W,
        clip_range=clip_range,
        kl_weight=beta,
        reduction=reduction,
    )


def torch_reference(kw, eu, ec, dtype=None):
    """Same-dtype PyTorch reference (dtype=None) or fp64 (dtype=torch.float64) loss."""
    G, B, T = kw["log_ratios_old"].shape
    if dtype == torch.float64:
        r = _r64(eu, ec, kw["eps_ref"], kw["x_t"], kw["x_prev"], kw["a"], kw["b"], kw["sigma"], kw["reduction"])
        return rdp_loss(r, kw["log_ratios_old"].double(), kw["rewards"].double(), kw["clip_range"], kw["kl_weight"])
    rows = G * B * T
    per_row = lambda c: torch.as_tensor(c, device=eu.device).reshape(-1).expand(T).repeat(G * B)  # noqa: E731
    flat = lambda t: t.reshape(rows, -1)  # noqa: E731
    r = cfg_step_log_ratio(
        flat(eu),
        flat(ec),
        W,
        flat(kw["eps_ref"]),
        flat(kw["x_t"]),
        flat(kw["x_prev"]),
        per_row(kw["a"]),
        per_row(kw["b"]),
        per_row(kw["sigma"]),
        kw["reduction"],
    )
    return rdp_loss(r.reshape(G, B, T), kw["log_ratios_old"], kw["rewards"], kw["clip_range"], kw["kl_weight"])


def err(x, exact):
    return (x.detach().double() - exact).abs().max().item()


def assert_rule(name, fast, torch_ref, exact, atol):
    e_fast, e_ref = err(fast, exact), err(torch_ref, exact)
    assert e_fast <= 2 * e_ref + atol, f"{name}: kernel err {e_fast:.3e} > 2 x torch err {e_ref:.3e} + {atol:.1e}"


def check_against_refs(kw, upstream=1.7):
    eu, ec = kw["eps_uncond"], kw["eps_cond"]
    leaves = {k: (eu.clone().requires_grad_(), ec.clone().requires_grad_()) for k in ("k", "t")}
    leaves["64"] = (eu.double().requires_grad_(), ec.double().requires_grad_())
    L_k = fused_prdp_loss_triton(**dict(kw, eps_uncond=leaves["k"][0], eps_cond=leaves["k"][1]))
    L_t = torch_reference(kw, *leaves["t"])
    L_64 = torch_reference(kw, *leaves["64"], dtype=torch.float64)
    assert L_k.shape == () and L_k.dtype == torch.float32 and torch.isfinite(L_k)
    assert_rule("loss", L_k, L_t, L_64, 1e-6 * abs(L_64.item()) + 1e-30)
    grads = {k: torch.autograd.grad(L * upstream, leaves[k]) for k, L in (("k", L_k), ("t", L_t), ("64", L_64))}
    for i, name in enumerate(("grad eps_u", "grad eps_c")):
        gk, gt, g64 = grads["k"][i], grads["t"][i], grads["64"][i]
        assert gk.dtype == eu.dtype and gk.shape == eu.shape and torch.isfinite(gk).all(), name
        assert_rule(name, gk, gt, g64, 1e-6 * g64.abs().max().item() + 1e-30)
    return L_k, grads["k"]


CASES = [  # G, B, T, latent
    (1, 1, 1, (4, 7, 9)),  # no pair at all: loss 0
    (2, 2, 3, (4, 7, 9)),
    (1, 17, 50, (3,)),
    (2, 17, 1, (5,)),
    (3, 2, 50, (2, 3)),
]


@pytest.mark.parametrize("G,B,T,latent", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_fp64(poison, G, B, T, latent, reduction):
    check_against_refs(make_inputs(G, B, T, latent, reduction=reduction, seed=G + B + T))


@pytest.mark.parametrize("clip", ["active", "inactive", "mixed"])
def test_clip_regimes(poison, clip):
    L, _ = check_against_refs(make_inputs(2, 5, 4, (4, 7, 9), clip=clip, seed=31))
    assert L > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,B,T,latent", [(2, 2, 3, (4, 7, 9)), (1, 17, 50, (3,))])
def test_low_precision_eps(poison, dtype, G, B, T, latent):
    check_against_refs(make_inputs(G, B, T, latent, dtype=dtype, seed=41))


def test_scalar_coefficients_and_tied_rewards(poison):
    kw = make_inputs(3, 6, 4, (5,), coef="float", seed=51)
    kw["rewards"] = (kw["rewards"] * 2).round()  # ties
    kw["rewards"][1] = 0.5  # one group all tied
    check_against_refs(kw)


def test_all_tied_rewards_gives_zero(poison):
    kw = make_inputs(2, 4, 3, (5,), seed=52)
    kw["rewards"] = torch.zeros_like(kw["rewards"])
    eu = kw["eps_uncond"].clone().requires_grad_()
    L = fused_prdp_loss_triton(**dict(kw, eps_uncond=eu))
    L.backward()
    assert L.item() == 0.0 and torch.equal(eu.grad, torch.zeros_like(eu))


def test_equals_composition_of_the_two_kernels(poison):
    kw = make_inputs(2, 3, 5, (4, 7, 9), seed=61)
    G, B, T = kw["log_ratios_old"].shape
    eu1, ec1 = kw["eps_uncond"].clone().requires_grad_(), kw["eps_cond"].clone().requires_grad_()
    eu2, ec2 = kw["eps_uncond"].clone().requires_grad_(), kw["eps_cond"].clone().requires_grad_()
    L1 = fused_prdp_loss_triton(**dict(kw, eps_uncond=eu1, eps_cond=ec1))
    flat = lambda t: t.reshape(G * B * T, -1)  # noqa: E731
    rep = lambda c: c.repeat(G * B)  # noqa: E731
    r = step_log_ratio_triton(
        flat(eu2),
        flat(ec2),
        flat(kw["eps_ref"]),
        flat(kw["x_t"]),
        flat(kw["x_prev"]),
        rep(kw["a"]),
        rep(kw["b"]),
        rep(kw["sigma"]),
        W,
    )
    L2 = rdp_loss_triton(r.reshape(G, B, T), kw["log_ratios_old"], kw["rewards"], kw["clip_range"], kw["kl_weight"])
    torch.testing.assert_close(L1, L2, rtol=1e-6, atol=0)
    (0.3 * L1).backward()
    (0.3 * L2).backward()
    torch.testing.assert_close(eu1.grad, eu2.grad, rtol=1e-5, atol=1e-6 * eu2.grad.abs().max().item())
    torch.testing.assert_close(ec1.grad, ec2.grad, rtol=1e-5, atol=1e-6 * ec2.grad.abs().max().item())


def test_memory_bounded(monkeypatch):
    """No (G, B, T, D)-sized buffer besides the two gradients is allocated or saved."""
    kw = make_inputs(2, 3, 4, (4, 7, 9), seed=71)
    G, B, T = kw["log_ratios_old"].shape
    rows, full = G * B * T, kw["eps_uncond"].numel()
    sizes = []
    real = ku.empty_out

    def recording(shape, dtype, device):
        out = real(shape, dtype, device)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(ku, "empty_out", recording)
    eu, ec = kw["eps_uncond"].clone().requires_grad_(), kw["eps_cond"].clone().requires_grad_()
    inputs = [eu, ec, kw["eps_ref"], kw["x_t"], kw["x_prev"]]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        L = fused_prdp_loss_triton(**dict(kw, eps_uncond=eu, eps_cond=ec))
    assert max(sizes) <= rows
    for t in saved:
        assert t.numel() <= rows or any(t.data_ptr() == x.data_ptr() for x in inputs)
    sizes.clear()
    L.backward()
    assert sorted(sizes) == [full, full]


def test_non_contiguous_inputs(poison):
    kw = make_inputs(2, 3, 4, (4, 7, 9), seed=81)
    nc = lambda t: t.transpose(3, 5).contiguous().transpose(3, 5)  # noqa: E731
    kw_n = {k: nc(v) if isinstance(v, torch.Tensor) and v.dim() == 6 else v for k, v in kw.items()}
    kw_n["log_ratios_old"] = kw["log_ratios_old"].transpose(0, 2).contiguous().transpose(0, 2)
    kw_n["a"] = torch.stack([kw["a"], kw["a"]], 1)[:, 0]
    assert not kw_n["eps_uncond"].is_contiguous() and not kw_n["a"].is_contiguous()
    eu_n, ec_n = kw_n["eps_uncond"].requires_grad_(), kw_n["eps_cond"].requires_grad_()
    eu_c, ec_c = kw["eps_uncond"].clone().requires_grad_(), kw["eps_cond"].clone().requires_grad_()
    L_n = fused_prdp_loss_triton(**dict(kw_n, eps_uncond=eu_n, eps_cond=ec_n))
    L_c = fused_prdp_loss_triton(**dict(kw, eps_uncond=eu_c, eps_cond=ec_c))
    assert torch.equal(L_n, L_c)
    L_n.backward()
    L_c.backward()
    assert torch.equal(eu_n.grad, eu_c.grad) and torch.equal(ec_n.grad, ec_c.grad)


def test_validation_errors():
    kw = make_inputs(2, 3, 4, (5,), seed=91)
    f = lambda **over: fused_prdp_loss_triton(**dict(kw, **over))  # noqa: E731
    with pytest.raises(ValueError, match=r"\(G, B, T, D...\)"):
        f(eps_uncond=kw["eps_uncond"][..., 0])
    with pytest.raises(ValueError, match="x_t has shape"):
        f(x_t=kw["x_t"][:1])
    with pytest.raises(ValueError, match="log_ratios_old must have shape"):
        f(log_ratios_old=kw["log_ratios_old"][:, :, :2])
    with pytest.raises(ValueError, match="rewards must have shape"):
        f(rewards=kw["rewards"][:1])
    with pytest.raises(ValueError, match="a must be a scalar or have 4 elements"):
        f(a=torch.ones(3))
    with pytest.raises(ValueError, match="kl_weight must be > 0"):
        f(kl_weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        f(reduction="none")
