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


@pytest.mark.parametrize("family", ["tiny", "tiny_sd3", "tiny_flux"])
def test_policy_equal_to_reference_gives_zero_log_ratios_and_valid_images(family):
    """Through the reference pass (a separate, equal reference copy): r_old = 0 exactly, for every policy family."""
    from prdp_ds.models import load_models

    m = load_models(family, seed=1)
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


def interleaved(models, prompts, seeds, T, impl="torch"):
    """The sampler as it was: the reference UNet called beside the policy at every step, all images in one batch
    -> latents (n, T + 1, ...), eps_old, eps_ref (n, T, ...), r_old (n, T), all fp32 (the plain reference)."""
    from prdp_ds.logratio import cfg_step_log_ratio, guided_eps

    s, n = step_schedule(models.scheduler, T), seeds.numel()
    cond = models.encode_prompts(prompts).repeat_interleave(seeds.shape[1], dim=0)
    uncond = models.encode_prompts([""]).expand(n, -1, -1)
    noise = torch.stack([image_noise(q, T, (4, 8, 8)) for q in seeds.reshape(-1).tolist()])
    x, lat, old, ref, r = noise[:, 0], [noise[:, 0]], [], [], []
    with torch.no_grad():
        for k in range(T):
            t, a, b, sg = s.timesteps[k], s.a[k], s.b[k], s.sigma[k]
            eu, ec = cfg_predict(models.unet, x, t, cond, uncond)
            eps = guided_eps(eu.float(), ec.float(), W)
            x_prev = a * x + b * eps + sg * noise[:, k + 1]
            ru, rc = cfg_predict(models.ref_unet, x, t, cond, uncond)
            ref.append(guided_eps(ru.float(), rc.float(), W))
            r.append(cfg_step_log_ratio(eu, ec, W, ref[-1], x, x_prev, a, b, sg, "sum", impl))
            old.append(eps)
            lat.append(x_prev)
            x = x_prev
    return torch.stack(lat, 1), torch.stack(old, 1), torch.stack(ref, 1), torch.stack(r, 1)


def test_reference_pass_after_sampling_equals_the_interleaved_loop_bitwise_at_the_same_batches(models):
    prompts, seeds, T = ["a red fox", "a cat"], image_seeds(2, 0, [1, 5], 3), 4
    traj = sample(models, prompts, seeds, T, W, batch_size=6, ref_batch_size=6)  # one step of all 6 images per call
    want = interleaved(models, prompts, seeds, T)
    default = sample(models, prompts, seeds, T, W, batch_size=6)  # ref_batch_size None: the loop's own batches
    for traj_ in (traj, default):
        got = [traj_.flat(f) for f in ("latents", "eps_old", "eps_ref", "log_ratio_old")]
        for name, g, w in zip(("latents", "eps_old", "eps_ref", "log_ratio_old"), got, want):
            assert torch.equal(g, w), name
    assert traj.log_ratio_old.abs().min() > 0


def fp64_reference(models, traj, W):
    """eps_ref (n, T, ...) and r_old (n, T) in fp64 at the recorded latents, from an fp64 copy of the reference."""
    import copy

    ref64 = copy.deepcopy(models.ref_unet).double()
    s, lat, n, T = traj.schedule, traj.flat("latents").double(), traj.seeds.numel(), traj.schedule.a.numel()
    cond = models.encode_prompts(traj.prompts).repeat_interleave(traj.seeds.shape[1], dim=0).double()
    uncond = models.encode_prompts([""]).double().expand(n, -1, -1)
    eps_ref, r = [], []
    with torch.no_grad():
        for k in range(T):
            x, x_prev = lat[:, k], lat[:, k + 1]
            eu, ec = cfg_predict(ref64, x, s.timesteps[k], cond, uncond)
            e_ref, e_old = eu + W * (ec - eu), traj.flat("eps_old")[:, k].double()
            a, b, sg = (float(v[k]) for v in (s.a, s.b, s.sigma))
            r.append(
                ((b * (e_old - e_ref)) * (2 * x_prev - 2 * a * x - b * (e_old + e_ref))).sum((1, 2, 3)) / (2 * sg**2)
            )
            eps_ref.append(e_ref)
    return torch.stack(eps_ref, 1), torch.stack(r, 1)


@pytest.mark.parametrize("ref_batch_size, impl", [(1, "torch"), (5, "torch"), (64, "torch"), (5, "triton")])
def test_reference_pass_at_other_batch_sizes_is_within_rounding_of_fp64_and_leaves_the_trajectory(
    models, ref_batch_size, impl
):
    prompts, seeds, T = ["a dog", "a bird"], image_seeds(3, 1, [0, 2], 3), 4
    base = sample(models, prompts, seeds, T, W, batch_size=4)
    traj = sample(models, prompts, seeds, T, W, batch_size=4, impl=impl, ref_batch_size=ref_batch_size)
    assert torch.equal(traj.latents, base.latents) and torch.equal(traj.eps_old, base.eps_old)
    assert torch.equal(traj.latents, sample(models, prompts, seeds, T, W, batch_size=4, with_reference=False).latents)
    eps64, r64 = fp64_reference(models, traj, W)
    _, _, eps32, r32 = interleaved(models, prompts, seeds, T)  # plain fp32 at other batches
    for got, plain, exact in ((traj.flat("eps_ref"), eps32, eps64), (traj.flat("log_ratio_old"), r32, r64)):
        err, plain_err = (got.double() - exact).abs().max(), (plain.double() - exact).abs().max()
        assert err <= 2 * plain_err + 1e-6 * exact.abs().max(), (err, plain_err)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_a_policy_known_to_be_the_reference_skips_the_pass_and_gets_what_the_pass_gives(lora_rank):
    m = build_tiny(1)  # fresh: the policy equals the reference (with LoRA: B = 0, adapters disabled)
    if lora_rank:
        m.add_lora(lora_rank)
    calls = []
    if not lora_rank:  # (a LoRA reference is a view of the policy module: no module of its own to hook)
        m.ref_unet.register_forward_hook(lambda *args: calls.append(1))
    prompts, seeds = ["a cat"], image_seeds(0, 3, [0], 4)
    skip = sample(m, prompts, seeds, 3, W, batch_size=4, policy_is_reference=True)
    assert not calls
    computed = sample(m, prompts, seeds, 3, W, batch_size=4, ref_batch_size=4)
    assert lora_rank or len(calls) == 3  # the pass ran: one reference call per step
    assert skip.eps_ref is skip.eps_old and torch.equal(skip.log_ratio_old, torch.zeros(1, 4, 3))
    assert torch.equal(computed.log_ratio_old, torch.zeros(1, 4, 3))
    assert torch.equal(skip.eps_ref, computed.eps_ref) and torch.equal(skip.latents, computed.latents)


def test_noise_is_todays_cpu_stream_and_invariant_to_batch_size_and_rank_slicing(models):
    seed = int(image_seeds(5, 0, [0], 1)[0, 0])
    want = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # the stream before: CPU
    assert torch.equal(image_noise(seed, 3, (4, 8, 8)), want)
    assert torch.equal(image_noise(seed, 3, (4, 8, 8), torch.device("cpu")), want)
    prompts, seeds = ["a dog", "a cow", "a bird", "a fox"], image_seeds(1, 2, range(4), 2)
    whole = sample(models, prompts, seeds, 2, W, batch_size=8, with_reference=False)
    for rank in range(2):  # two ranks' slices of the groups, each at another batch size
        part = sample(models, prompts[2 * rank : 2 * rank + 2], seeds[2 * rank : 2 * rank + 2], 2, W, batch_size=3)
        assert torch.equal(part.latents[:, :, 0], whole.latents[2 * rank : 2 * rank + 2, :, 0])  # x_T: same bits
        torch.testing.assert_close(part.latents, whole.latents[2 * rank : 2 * rank + 2], **TOL)


def _one_process_group(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.mark.slow
def test_the_trainer_skips_the_reference_pass_in_a_fresh_runs_first_epoch_only(tmp_path, monkeypatch):
    """A fresh run's first rollout is sampled before any optimizer step: the trainer passes policy_is_reference and
    gets what the reference pass gives at the policy's batches (r_old = 0, the same eps_ref bits); a later epoch and
    a resumed run (the policy moved) compute the reference."""
    from helpers import SMALL

    import prdp_ds.train as train

    real, seen = train.sample, []

    def spy(*args, **kw):
        traj = real(*args, **kw)
        seen.append(kw["policy_is_reference"])
        if kw["policy_is_reference"]:
            n = args[2].numel()  # all of the rank's images in one sampling batch (batch_size 32 >= 16)
            computed = real(*args, **{**kw, "policy_is_reference": False, "ref_batch_size": n})
            zeros = torch.zeros_like(traj.log_ratio_old)
            assert torch.equal(traj.log_ratio_old, zeros) and torch.equal(computed.log_ratio_old, zeros)
            assert traj.eps_ref is traj.eps_old and torch.equal(traj.eps_ref, computed.eps_ref)
        return traj

    monkeypatch.setattr(train, "sample", spy)
    common = ["--preset", "tiny_demo", *SMALL, "--output-dir", str(tmp_path), "--set", "output.save_every=1"]
    _one_process_group(monkeypatch)
    train.main([*common, "--set", "train.epochs=2"])
    assert seen == [True, False]
    seen.clear()
    _one_process_group(monkeypatch)
    train.main([*common, "--set", "train.epochs=3", "--resume", "latest"])
    assert seen == [False]


def flow_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def flow_grpo_step_fp64(x, v, sigmas, i, noise_level):
    """Flow-GRPO's sde_step_with_logprob (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), transcribed in fp64:
    -> (mean, std) of x_next."""
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1]
    dt = sigma_prev - sigma
    std_dev_t = (sigma / (1 - (sigma_max if sigma == 1 else sigma))).sqrt() * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * (-dt).sqrt()


@pytest.mark.parametrize("T,shift", [(1, 1.0), (5, 3.0), (10, 3.1), (16, 1.7)])
def test_flow_sigmas_are_the_pipelines_shifted_sigmas(T, shift):
    """linspace(1, 1 / T, T) shifted by the scheduler (diffusers' SD3 / FLUX pipelines pass these sigmas), then 0."""
    import numpy as np

    from prdp_ds.sampler import flow_sigmas

    sched = flow_scheduler(shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T))
    got = flow_sigmas(sched, T)
    assert got[0] == 1 and got[-1] == 0 and (got[1:] < got[:-1]).all()
    torch.testing.assert_close(got.float(), sched.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("T,shift,a", [(1, 1.0, 0.7), (6, 3.0, 0.7), (9, 3.1, 1.0), (4, 2.0, 0.3)])
def test_flow_schedule_is_flow_grpos_sde_step_in_fp64(T, shift, a):
    from prdp_ds.sampler import flow_sigmas, flow_step_schedule

    sched = flow_scheduler(shift)
    s = flow_step_schedule(sched, T, a)
    sig = flow_sigmas(sched, T)
    gen = torch.Generator().manual_seed(T)
    x, v = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64).unbind(0)
    for i in range(T):
        mean, std = flow_grpo_step_fp64(x, v, sig, i, a)
        torch.testing.assert_close((s.a[i].double() * x + s.b[i].double() * v), mean, rtol=2e-7, atol=1e-7)
        torch.testing.assert_close(s.sigma[i].double(), std, rtol=2e-7, atol=0.0)
        assert s.sigma[i] > 0
    torch.testing.assert_close(s.timesteps, (sig[:-1] * 1000).float())


def test_flow_steps_outside_the_sde_window_are_the_euler_ode_step():
    """a = 0 outside the window: x' = x + dt v, diffusers' FlowMatchEulerDiscreteScheduler.step, and sigma = 0."""
    import numpy as np

    from prdp_ds.sampler import flow_step_schedule

    T = 6
    sched = flow_scheduler(3.0)
    window = flow_step_schedule(sched, T, 0.7, window=(2, 4))
    every = flow_step_schedule(sched, T, 0.7)
    assert (window.sigma[[0, 1, 4, 5]] == 0).all() and (window.sigma[2:4] > 0).all()
    for f in ("a", "b", "sigma", "timesteps"):
        assert torch.equal(getattr(window, f)[2:4], getattr(every, f)[2:4])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T))
    x, v = torch.randn(2, 2, 4, 6, 6, generator=torch.Generator().manual_seed(0)).unbind(0)
    for i in (0, 1, 4, 5):
        want = sched.step(v, sched.timesteps[i], x).prev_sample
        sched._step_index = None  # each call here is one step from its own state
        torch.testing.assert_close(window.a[i] * x + window.b[i] * v, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,shift,a", [(4, 3.0, 0.7), (10, 3.0, 1.0)])
def test_flow_step_log_ratio_is_the_fp64_log_prob_difference(T, shift, a):
    """The cancellation-free log-ratio (prdp_ds.logratio) with a flow step's (a, b, sigma): mu_1 - mu_2 = b (v_1 - v_2).
    Rule: its error against fp64 <= 2x that of the naive fp32 log-prob difference + 1e-6."""
    from prdp_ds.logratio import step_log_ratio
    from prdp_ds.sampler import flow_step_schedule

    s = flow_step_schedule(flow_scheduler(shift), T, a)
    gen = torch.Generator().manual_seed(7)
    for k in range(T):
        x, v1, dv, z = torch.randn(4, 3, 16, 5, 5, generator=gen).unbind(0)
        v2 = v1 + 1e-3 * dv
        x_next = s.a[k] * x + s.b[k] * v1 + s.sigma[k] * z
        diff = {}
        for dt in (torch.float64, torch.float32):
            c = [t.to(dt) for t in (s.a[k], s.b[k], s.sigma[k], x, x_next)]
            lp = [gaussian_log_prob(c[4], c[0] * c[3] + c[1] * v.to(dt), c[2]) for v in (v1, v2)]
            diff[dt] = (lp[0] - lp[1]).double()
        got = step_log_ratio(v1, v2, x, x_next, s.a[k], s.b[k], s.sigma[k]).double()
        want, naive = diff[torch.float64], diff[torch.float32]
        assert ((got - want).abs() <= 2 * (naive - want).abs().max() + 1e-6).all()
        assert torch.equal(step_log_ratio(v1, v1, x, x_next, s.a[k], s.b[k], s.sigma[k]), torch.zeros(3))


def test_ddim_steps_outside_the_sde_window_are_deterministic_ddim_steps(models):
    """With window [1, 3) of T = 5: steps 0, 3, 4 are DDIM eta = 0 steps (sigma 0); the rollout records x_1 .. x_3,
    eps_old and r_old at steps 1, 2 and the window's schedule; the images are x_0 after all 5 steps (fp64 loop)."""
    T, window, prompts, seeds = 5, (1, 3), ["a red fox"], image_seeds(3, 0, [0], 2)
    traj = sample(models, prompts, seeds, T, W, window=window)
    full = step_schedule(models.scheduler, T, window=window)
    every = step_schedule(models.scheduler, T)
    assert traj.latents.shape[2] == 3 and traj.eps_old.shape[2] == 2 and traj.log_ratio_old.shape == (1, 2, 2)
    assert torch.equal(traj.schedule.sigma, every.sigma[1:3]) and (full.sigma[[0, 3, 4]] == 0).all()
    assert traj.log_ratio_old.abs().min() > 0
    at_ref = sample(models, prompts, seeds, T, W, window=window, policy_is_reference=True)
    assert torch.equal(at_ref.log_ratio_old, torch.zeros(1, 2, 2)) and torch.equal(at_ref.latents, traj.latents)
    cond = models.encode_prompts(prompts).expand(2, -1, -1)
    uncond = models.encode_prompts([""]).expand(2, -1, -1)
    noise = torch.stack([image_noise(s, T, (4, 8, 8)) for s in seeds.reshape(-1).tolist()]).double()
    abar = models.scheduler.alphas_cumprod.double()
    ab = [abar[t] for t in full.timesteps] + [torch.tensor(float(models.scheduler.final_alpha_cumprod)).double()]
    x = noise[:, 0]
    with torch.no_grad():
        for k, t in enumerate(full.timesteps):
            eu, ec = cfg_predict(models.unet, x.float(), t, cond, uncond)
            eps = (eu + W * (ec - eu)).double()
            sigma2 = (1 - ab[k + 1]) / (1 - ab[k]) * (1 - ab[k] / ab[k + 1]) * (window[0] <= k < window[1])
            x0 = (x - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()
            x = ab[k + 1].sqrt() * x0 + (1 - ab[k + 1] - sigma2).sqrt() * eps + sigma2.sqrt() * noise[:, k + 1]
            if window[0] <= k + 1 <= window[1]:
                torch.testing.assert_close(traj.latents[0, :, k + 1 - window[0]], x.float(), **TOL)
    torch.testing.assert_close(traj.images[0], models.decode(x.float()), **TOL)
