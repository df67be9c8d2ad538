import pytest
import torch

from prdp_ds.logratio import cfg_step_log_ratio, gaussian_log_prob, guided_eps, step_log_ratio
from prdp_ds.models import make_scheduler
from prdp_ds.sampler import step_schedule


def _sd_step(rows, shape, step, scale, gen, dtype=torch.float32):
    """A realistic step of SD1.4's 50-step schedule: policy eps = ref eps + scale * noise."""
    sched = step_schedule(make_scheduler(), 50)
    a, b, s = (float(v[step]) for v in (sched.a, sched.b, sched.sigma))
    x_t = torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    eps_ref = torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    eps = eps_ref + scale * torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    x_prev = a * x_t + b * eps_ref + s * torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    cast = [t.to(dtype) for t in (eps, eps_ref, x_t, x_prev)]
    return cast, (a, b, s)


def _fp64(eps, eps_ref, x_t, x_prev, a, b, s, reduction="sum"):
    """Independent fp64 reference: log N(x'; mu_1, s^2) - log N(x'; mu_2, s^2), constants cancel."""
    e1, e2, xt, xp = (t.double().flatten(1) for t in (eps, eps_ref, x_t, x_prev))
    mu1, mu2 = a * xt + b * e1, a * xt + b * e2
    r = (((xp - mu2) ** 2 - (xp - mu1) ** 2) / (2 * s**2)).sum(1)
    return r / e1.shape[1] if reduction == "mean" else r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 7, 9), (16,)])
def test_identical_policies_give_exactly_zero(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    (eps, _, x_t, x_prev), (a, b, s) = _sd_step(5, shape, 20, 0.0, gen, dtype)
    r = step_log_ratio(eps, eps.clone(), x_t, x_prev, a, b, s)
    assert r.dtype == torch.float32 and torch.equal(r, torch.zeros(5))


@pytest.mark.parametrize("step", [0, 25, 49])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fp32_matches_fp64_where_subtracting_log_probs_fails(step, reduction):
    gen = torch.Generator().manual_seed(100 + step)
    (eps, eps_ref, x_t, x_prev), (a, b, s) = _sd_step(3, (4, 64, 64), step, 1e-3, gen)  # D = 16384
    ref = _fp64(eps, eps_ref, x_t, x_prev, a, b, s, reduction)
    got = step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, s, reduction).double()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7 if reduction == "sum" else 1e-7 / 16384)
    if reduction == "sum":
        naive = (
            gaussian_log_prob(x_prev, a * x_t + b * eps, s) - gaussian_log_prob(x_prev, a * x_t + b * eps_ref, s)
        ).double()
        assert (naive - ref).abs().max() > 1e-4, "the naive fp32 method should lose > 1e-4 here"


def test_per_row_coefficients_and_mean_reduction():
    gen = torch.Generator().manual_seed(3)
    rows, shape = 6, (3, 5, 5)
    eps, eps_ref, x_t, x_prev = (torch.randn(rows, *shape, generator=gen) for _ in range(4))
    a, b, s = (torch.rand(rows, generator=gen) + 0.5 for _ in range(3))
    got = step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, s)
    want = torch.stack(
        [
            _fp64(
                eps[i : i + 1],
                eps_ref[i : i + 1],
                x_t[i : i + 1],
                x_prev[i : i + 1],
                float(a[i]),
                float(b[i]),
                float(s[i]),
            )[0]
            for i in range(rows)
        ]
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    mean = step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, s, reduction="mean")
    torch.testing.assert_close(mean, got / 75)


def test_gradient_is_b_times_residual_over_sigma_squared():
    gen = torch.Generator().manual_seed(4)
    (eps, eps_ref, x_t, x_prev), (a, b, s) = _sd_step(4, (2, 3, 5), 10, 0.1, gen, torch.float64)
    eps.requires_grad_(True)
    upstream = torch.randn(4, generator=gen, dtype=torch.float64)
    (step_log_ratio(eps, eps_ref, x_t, x_prev, a, b, s).double() * upstream).sum().backward()
    want = upstream[:, None, None, None] * b * (x_prev - (a * x_t + b * eps.detach())) / s**2
    torch.testing.assert_close(eps.grad, want, rtol=1e-5, atol=1e-6)


def test_cfg_wrapper_equals_guided_prediction():
    gen = torch.Generator().manual_seed(5)
    eu, ec, eref, xt, xp = (torch.randn(3, 4, 5, generator=gen) for _ in range(5))
    got = cfg_step_log_ratio(eu, ec, 5.0, eref, xt, xp, 0.9, -0.1, 0.2)
    want = step_log_ratio(guided_eps(eu, ec, 5.0), eref, xt, xp, 0.9, -0.1, 0.2)
    torch.testing.assert_close(got, want)


def test_bad_options_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        step_log_ratio(x, x, x, x, 1.0, 1.0, 1.0, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        cfg_step_log_ratio(x, x, 5.0, x, x, x, 1.0, 1.0, 1.0, impl="cuda")
