import pytest
import torch

from prdp_ds.logratio import gaussian_log_prob
from prdp_ds.models import build_tiny, make_scheduler
from prdp_ds.sampler import cfg_predict, ddim_timesteps, image_noise, image_seeds, sample, step_schedule

W = 5.0
# fp32 trajectories computed in a different order (or batch) differ by rounding, which guidance
# (x (1 + 2w)) and the steps amplify to ~1e-5; a wrong coefficient or noise shows as >= 1e-2.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def models():
    m = build_tiny(0)
    gen = torch.Generator().manual_seed(1)  # seeded: the same reference in every run
    with torch.no_grad():  # make the reference differ from the policy so log-ratios are non-zero
        for p in m.ref_unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return m


@pytest.mark.parametrize("T", [1, 4, 7])
def test_matches_diffusers_ddim_step_with_eta_1(models, T):
    prompts, seeds = ["a red fox", "a cat"], image_seeds(0, 0, [3, 4], 2)
    traj = sample(models, prompts, seeds, T, W, batch_size=3)
    sched = models.scheduler
    sched.set_timesteps(T)
    cond = models.encode_prompts(prompts).repeat_interleave(2, dim=0)
    uncond = models.encode_prompts([""]).expand(4, -1, -1)
    noise = torch.stack([image_noise(s, T, (4, 8, 8)) for s in seeds.reshape(-1).tolist()])
    x = noise[:, 0]
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            eu, ec = cfg_predict(models.unet, x, t, cond, uncond)
            x = sched.step(eu + W * (ec - eu), t, x, eta=1.0, variance_noise=noise[:, k + 1]).prev_sample
            torch.testing.assert_close(traj.latents.reshape(4, T + 1, 4, 8, 8)[:, k + 1], x, **TOL)


def test_same_seed_and_prompt_give_the_same_trajectory_at_any_batch_size(models):
    seeds = image_seeds(1, 2, [0, 1, 2], 3)
    prompts = ["a dog", "a painting of a cow", "a bird"]
    full = sample(models, prompts, seeds, 3, W, batch_size=9)
    small = sample(models, prompts, seeds, 3, W, batch_size=2)
    alone = sample(models, prompts[2:], seeds[2:], 3, W, batch_size=1)
    for other, sl in ((small, slice(None)), (alone, slice(2, 3))):
        torch.testing.assert_close(other.latents, full.latents[sl], **TOL)
        torch.testing.assert_close(other.log_ratio_old, full.log_ratio_old[sl], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(other.images, full.images[sl], **TOL)


def test_recorded_log_ratio_equals_fp64_log_prob_difference(models):
    seeds = image_seeds(0, 1, [0, 1], 3)
    traj = sample(models, ["a cat", "a dog"], seeds, 5, W)
    sch = traj.schedule
    assert traj.log_ratio_old.abs().max() > 0
    for k in range(5):
        x_t, x_prev = (traj.latents[:, :, j].reshape(6, -1).double() for j in (k, k + 1))
        a, b, s = (float(v[k]) for v in (sch.a, sch.b, sch.sigma))
        mu_old = a * x_t + b * traj.eps_old[:, :, k].reshape(6, -1).double()
        mu_ref = a * x_t + b * traj.eps_ref[:, :, k].reshape(6, -1).double()
        want = gaussian_log_prob(x_prev, mu_old, s) - gaussian_log_prob(x_prev, mu_ref, s)
        torch.testing.assert_close(traj.log_ratio_old[:, :, k].reshape(6).double(), want, rtol=1e-4, atol=1e-6)


def test_policy_equal_to_reference_gives_zero_log_ratios_and_valid_images():
    m = build_tiny(1)
    traj = sample(m, ["a cat"], image_seeds(0, 0, [0], 4), 3, W)
    assert torch.equal(traj.log_ratio_old, torch.zeros(1, 4, 3))
    torch.testing.assert_close(traj.eps_old, traj.eps_ref, rtol=0, atol=0)
    assert traj.images.shape == (1, 4, 3, 32, 32) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert traj.flat_prompts == ["a cat"] * 4


def test_without_reference_fills_only_latents_and_images(models):
    traj = sample(models, ["a cat"], image_seeds(0, 0, [0], 2), 2, W, with_reference=False)
    assert traj.eps_ref is None and traj.log_ratio_old is None and traj.images.shape == (1, 2, 3, 32, 32)


def test_schedule_matches_sd14_and_refuses_eta_zero(models):
    sch = step_schedule(models.scheduler, 50)
    assert sch.timesteps[0] == 981 and sch.timesteps[-1] == 1
    assert (sch.sigma > 0).all()
    with pytest.raises(ValueError, match="sampler.eta"):
        step_schedule(models.scheduler, 50, eta=0.0)


@pytest.mark.parametrize("T", [1, 2, 7, 10, 33, 500])
def test_quadratic_spacing_is_descending_from_the_top_to_t_1_and_denser_near_0(models, T):
    ts = ddim_timesteps(models.scheduler, T, "quadratic").tolist()
    assert len(ts) == T == len(set(ts)) and ts == sorted(ts, reverse=True)
    assert ts[0] == 999 and (T == 1 or ts[-1] == 1)
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert all(g >= h - 1 for g, h in zip(gaps, gaps[1:]))  # shrinking towards t = 0, up to rounding
    with pytest.raises(ValueError, match="sampler.spacing"):
        ddim_timesteps(models.scheduler, T, "cosine")


def test_quadratic_spacing_refuses_more_steps_than_it_can_place(models):
    with pytest.raises(ValueError, match=r"sampler.num_steps must be in \[1, 500\] for quadratic spacing"):
        ddim_timesteps(models.scheduler, 501, "quadratic")


@pytest.mark.parametrize("T", [1, 2, 7, 10, 33, 500])
def test_logsnr_spacing_is_descending_from_the_top_and_uniform_in_log_snr(models, T):
    ts = ddim_timesteps(models.scheduler, T, "logsnr")
    assert len(ts) == T == len(set(ts.tolist())) and ts.tolist() == sorted(ts.tolist(), reverse=True)
    assert ts[0] == 999 and (T == 1 or ts[-1] == 1)
    if 2 < T <= 33:  # where rounding to whole timesteps leaves the log-SNR gaps alike
        abar = models.scheduler.alphas_cumprod.double()
        gaps = (abar[ts] / (1 - abar[ts])).log().diff()
        assert (gaps > 0).all() and gaps.max() < 1.6 * gaps.min(), gaps


def test_logsnr_spacing_evens_out_the_step_sensitivity_on_the_world_schedule():
    """|b| / sigma weighs a step's log-ratio on the model's output: on the world's linear schedule at T = 10
    uniform steps put 23.3 at the step into t = 1 (about 2 elsewhere); log-SNR steps give 2.5-2.8 at all but the
    last (1.1)."""
    from prdp_ds.world.model import SCHEDULER

    sch = make_scheduler(SCHEDULER)
    ratio = lambda spacing: (lambda s: s.b.abs() / s.sigma)(step_schedule(sch, 10, 1.0, spacing))  # noqa: E731
    assert ratio("uniform").max() > 20
    even = ratio("logsnr")
    assert even.max() < 3 and even[:-1].min() > 2.4


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr"])
def test_trajectory_matches_an_fp64_ddim_loop_over_its_own_timesteps(models, spacing):
    """x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with ab_prev that of
    the next timestep of the sequence (the last step: final_alpha_cumprod), computed here in fp64."""
    T, prompts, seeds = 6, ["a red fox"], image_seeds(1, 0, [0], 3)
    traj = sample(models, prompts, seeds, T, W, spacing=spacing, with_reference=False)
    ts = ddim_timesteps(models.scheduler, T, spacing)
    abar = models.scheduler.alphas_cumprod.double()
    ab = [abar[t] for t in ts] + [torch.tensor(float(models.scheduler.final_alpha_cumprod)).double()]
    cond = models.encode_prompts(prompts).expand(3, -1, -1)
    uncond = models.encode_prompts([""]).expand(3, -1, -1)
    noise = torch.stack([image_noise(s, T, (4, 8, 8)) for s in seeds.reshape(-1).tolist()]).double()
    x = noise[:, 0]
    with torch.no_grad():
        for k, t in enumerate(ts):
            eu, ec = cfg_predict(models.unet, x.float(), t, cond, uncond)
            eps = (eu + W * (ec - eu)).double()
            sigma2 = (1 - ab[k + 1]) / (1 - ab[k]) * (1 - ab[k] / ab[k + 1])
            x0 = (x - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()
            x = ab[k + 1].sqrt() * x0 + (1 - ab[k + 1] - sigma2).sqrt() * eps + sigma2.sqrt() * noise[:, k + 1]
            torch.testing.assert_close(traj.latents[0, :, k + 1], x.float(), **TOL)


def test_seeds_are_a_function_of_global_ids():
    a = image_seeds(7, 3, [5, 6], 4)
    b = image_seeds(7, 3, [6], 4)
    assert torch.equal(a[1], b[0]) and len(set(a.reshape(-1).tolist())) == 8
    assert not torch.equal(image_seeds(7, 4, [6], 4), b)
