import itertools

import pytest
import torch

from prdp_ds.loss import prdp_loss_reference, rdp_diagnostics, rdp_loss


def brute_force(r, r_old, rewards, eps, beta):
    """Loop over groups and pairs exactly as docs/design.md §2 and §5 state it (fp64, autograd-capable)."""
    group_losses = []
    for g in range(r.shape[0]):
        R, C = [], []
        for i in range(r.shape[1]):
            clipped = [torch.clamp(r[g, i, t], r_old[g, i, t] - eps, r_old[g, i, t] + eps) for t in range(r.shape[2])]
            R.append(r[g, i].mean())
            C.append(torch.stack(clipped).mean())
        pairs = []
        for i, j in itertools.permutations(range(r.shape[1]), 2):
            dr = rewards[g, i] - rewards[g, j]
            if dr > 0:
                pairs.append(torch.maximum((R[i] - R[j] - dr / beta) ** 2, (C[i] - C[j] - dr / beta) ** 2))
        if pairs:
            group_losses.append(torch.stack(pairs).mean())
    return torch.stack(group_losses).mean() if group_losses else r.sum() * 0


def _inputs(G, B, T, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    r_old = torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 1e-3
    r = r_old + torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 1e-3
    rewards = torch.randn(G, B, generator=gen, dtype=torch.float64) * 0.01
    if ties:
        rewards = rewards.round(decimals=2)
        rewards[0] = 0.5
    return r, r_old, rewards


@pytest.mark.parametrize("G,B,T", [(1, 2, 1), (3, 5, 4), (2, 17, 3), (4, 1, 2)])
@pytest.mark.parametrize("eps", [0.0, 5e-4, 1e9])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force_loss_and_gradient(G, B, T, eps, ties):
    r, r_old, rewards = _inputs(G, B, T, seed=G * 100 + B * 10 + T, ties=ties)
    beta = 0.05
    r1 = r.clone().requires_grad_(True)
    r2 = r.clone().requires_grad_(True)
    got = rdp_loss(r1, r_old, rewards, eps, beta)
    want = brute_force(r2, r_old, rewards, eps, beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-9, atol=1e-12)


def paper_scale_inputs(G, B, T, seed):
    """The paper's regime: beta = 3e-5, clip 1e-4, r within ~1e-4 of r_old (a few steps clipped),
    reward gaps ~0.01, so targets up to ~1e3 and e, e' of a pair differ by ~1e-6 to 1e-5: fp32 rounds
    them alike for 76-95% of the pairs."""
    gen = torch.Generator().manual_seed(seed)
    r_old = torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 1e-3
    r = r_old + torch.randn(G, B, T, generator=gen, dtype=torch.float64) * 6e-5
    rewards = torch.randn(G, B, generator=gen, dtype=torch.float64) * 0.01
    return r, r_old, rewards, 1e-4, 3e-5


@pytest.mark.parametrize("G,B,T,seed", [(1, 2, 1, 0), (3, 6, 20, 1), (2, 17, 7, 2), (4, 5, 50, 3)])
def test_max_branch_resolved_in_fp32_at_paper_beta(G, B, T, seed):
    """Which of e^2, e'^2 is larger is decided from R - C, not by comparing the two rounded squares:
    the fp32 gradient matches the fp64 one (a comparison of rounded squares misses by ~10-100%)."""
    r, r_old, rewards, eps, beta = paper_scale_inputs(G, B, T, seed)
    r64 = r.clone().requires_grad_()
    brute_force(r64, r_old, rewards, eps, beta).backward()
    r32 = r.float().requires_grad_()
    rdp_loss(r32, r_old.float(), rewards.float(), eps, beta).backward()
    rel = (r32.grad.double() - r64.grad).abs().max() / r64.grad.abs().max()
    assert rel < 1e-4, f"fp32 gradient off by {rel:.2e} of its scale"


@pytest.mark.parametrize("G,B,T", [(2, 4, 3), (5, 8, 10)])
def test_reference_on_log_probs_equals_production_on_log_ratios(G, B, T):
    r, r_old, rewards = _inputs(G, B, T, seed=7)
    gen = torch.Generator().manual_seed(8)
    lp_ref = -8000 + torch.randn(G, B, T, generator=gen, dtype=torch.float64)
    lp = (r + lp_ref).requires_grad_(True)
    r_ = r.clone().requires_grad_(True)
    want = prdp_loss_reference(lp, r_old + lp_ref, lp_ref, rewards, 1e-3, 0.02)
    got = rdp_loss(r_, r_old, rewards, 1e-3, 0.02)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(r_.grad, lp.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("B", [1, 4])
def test_no_valid_pairs_gives_zero_without_nan(B):
    r = torch.randn(3, B, 5, requires_grad=True)
    loss = rdp_loss(r, r.detach(), torch.full((3, B), 0.3), 1e-4, 1e-3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(r.grad, torch.zeros_like(r))
    diag = rdp_diagnostics(r, r.detach(), torch.full((3, B), 0.3), 1e-4, 1e-3)
    assert diag["valid_pair_frac"] == 0.0 and diag["pred_err"] == 0.0


def test_tied_group_is_excluded_from_the_group_mean():
    r, r_old, rewards = _inputs(2, 4, 3, seed=9)
    tied = rewards.clone()
    tied[1] = 0.2
    only_first = rdp_loss(r[:1], r_old[:1], rewards[:1], 1e-3, 0.1)
    torch.testing.assert_close(rdp_loss(r, r_old, tied, 1e-3, 0.1), only_first)


def test_clip_acts_only_outside_the_band():
    r, r_old, rewards = _inputs(2, 6, 4, seed=10)
    unclipped = rdp_loss(r, r_old, rewards, 1e9, 0.05)
    assert rdp_loss(r, r_old, rewards, 0.0, 0.05) > unclipped  # the max picks the clipped term somewhere
    diag = rdp_diagnostics(r, r_old, rewards, 1e9, 0.05)
    assert diag["clip_frac"] == 0.0
    assert rdp_diagnostics(r, r_old, rewards, 0.0, 0.05)["clip_frac"] == pytest.approx(1.0)


def test_diagnostics_values():
    r = torch.zeros(1, 3, 2, dtype=torch.float64)
    r[0, 0] = 1.0
    rewards = torch.tensor([[0.3, 0.2, 0.2]], dtype=torch.float64)
    diag = rdp_diagnostics(r, r, rewards, 1e-3, 0.1)
    assert diag["valid_pair_frac"] == pytest.approx(2 / 6)
    assert diag["pred_err"] == pytest.approx(0.0)  # R_0 - R_j = 1 = (0.3 - 0.2) / 0.1
    assert diag["kl"] == pytest.approx(1 / 3)


def test_shape_errors_name_the_function():
    with pytest.raises(ValueError, match="rdp_loss: rewards must have shape"):
        rdp_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4), 1e-4, 1e-3)
    with pytest.raises(ValueError, match="prdp_loss_reference: log-ratio shapes differ"):
        prdp_loss_reference(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), torch.zeros(2, 3), 0, 1)


@pytest.mark.parametrize(
    "clip_range,kl_weight,match", [(1e-4, 0.0, "kl_weight"), (1e-4, -1e-3, "kl_weight"), (-1e-4, 1e-3, "clip_range")]
)
def test_nonsense_hyperparameters_are_refused(clip_range, kl_weight, match):
    r, r_old, rewards = _inputs(2, 3, 4, seed=11)
    with pytest.raises(ValueError, match=match):
        rdp_loss(r, r_old, rewards, clip_range, kl_weight)
    with pytest.raises(ValueError, match=match):
        prdp_loss_reference(r, r_old, r * 0, rewards, clip_range, kl_weight)
