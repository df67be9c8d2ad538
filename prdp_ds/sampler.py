"""Sampler: two Gaussian policy families with classifier-free guidance, recording what PRDP needs
(docs/design.md §3, docs/flow.md).

DDIM with eta in (0, 1] (epsilon-prediction UNets). Per step, with eps_hat = eps_u + w (eps_c - eps_u):
    x0_hat   = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)
    sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)
    mu       = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma_t^2) eps_hat = a_t x_t + b_t eps_hat
    x_{t-1}  = mu + sigma_t z
The flow SDE of Flow-GRPO (rectified-flow models predicting the velocity v; `flow_step_schedule`): the same
mu = a_t x_t + b_t v_hat, x_next = mu + sigma_t z, with (a_t, b_t, sigma_t) from the shifted sigmas and the noise
level. Only the steps of the SDE window (sampler.sde_steps) are stochastic; the others are deterministic (DDIM
eta = 0, the flow ODE's Euler step), carry no log-ratio and are not recorded: the rollout holds x at the window's
steps and the trajectory's schedule is the window's (`StepSchedule.window`).
Each image draws its start latent and all step noises from its own seed, on the sampling device, so
a (seed, prompt) gives the same trajectory at any batch size and on any rank of one device type. The
frozen reference UNet does not steer the trajectory: its guided prediction eps_ref at every recorded x_t
and the cancellation-free log-ratio r_old (docs/design.md §4) are computed after the policy's loop, over
all (image, step) rows in large batches (`reference_pass`); images are decoded to [0, 1]. When the policy
is bit-identical to the reference (offline datasets, a fresh run's first epoch), the reference pass is
skipped: eps_ref is eps_old and r_old = 0 exactly, what the pass would give.
A rollout (one rank's trajectories and rewards) is saved to and loaded from safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from prdp_ds.config import CHOICES
from prdp_ds.logratio import cfg_step_log_ratio, guided_eps

if TYPE_CHECKING:
    from collections.abc import Sequence

    from prdp_ds.models import Models

ROLLOUT_FIELDS = ("latents", "eps_old", "eps_ref", "log_ratio_old", "images", "seeds")


@dataclass
class StepSchedule:
    timesteps: torch.Tensor  # (T,) descending, the model's time input: long (DDIM) or fp32 sigma * 1000 (flow)
    a: torch.Tensor  # (T,) fp32, coefficient of x_t in mu
    b: torch.Tensor  # (T,) fp32, coefficient of eps_hat (v_hat) in mu
    sigma: torch.Tensor  # (T,) fp32, policy std per step; 0 at a deterministic step

    def to(self, device):
        return StepSchedule(*(t.to(device) for t in (self.timesteps, self.a, self.b, self.sigma)))

    def window(self, start, stop):
        """The schedule of steps [start, stop) (the SDE window a rollout records)."""
        return StepSchedule(*(t[start:stop] for t in (self.timesteps, self.a, self.b, self.sigma)))


SPACINGS = CHOICES["sampler.spacing"]  # ("uniform", "quadratic", "logsnr")


def ddim_timesteps(scheduler, num_steps, spacing="uniform"):
    """(T,) long, descending: the T timesteps a trajectory visits.

    uniform: the scheduler's own set_timesteps (SD v1.4: 981, 961, ..., 1 at T = 50).
    quadratic: DDIM's quadratic sequence (Song et al. 2021, their CIFAR-10 setting):
        t_i = 1 + round((N - 2) (i / (T - 1))^2), i = 0 .. T - 1 (N train timesteps), each kept at least one above
        the one below it. It puts more steps near t = 0, where the linear beta schedule of small pixel models makes
        uniform steps uneven: the step into t = 1 has sigma ~ 0.015 but eps_hat's coefficient b ~ 0.3, so its
        b/sigma (the weight of that step's log-ratio on the model's output) is 11-21x every other step's at T = 10
        (benchmarks/step_share.py).
    logsnr: uniform in log-SNR, log(ab_t / (1 - ab_t)), from t = N - 1 to t = 1: each t_i is the timestep whose
        log-SNR is nearest the i-th of T equally spaced values, each kept at least one below the one before. On the
        world's schedule at T = 10 it makes |b| / sigma 2.5-2.8 at every step but the last (1.1), where uniform
        steps give 23.3 at the step into t = 1 and quadratic ones 6.6 at the first step; SD v1.4's own at T = 50
        peak at 3.3.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "uniform":
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps.long().cpu()
    N = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= N // 2:
        raise ValueError(f"sampler.num_steps must be in [1, {N // 2}] for {spacing} spacing, got {num_steps}")
    if spacing == "logsnr":
        return _logsnr_timesteps(scheduler.alphas_cumprod.double(), num_steps)
    frac = torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.ones(1, dtype=torch.float64)
    ts = (1 + (N - 2) * frac**2).round().long().tolist()
    for i in range(1, num_steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    return torch.tensor(ts[::-1], dtype=torch.long)


def _logsnr_timesteps(abar, num_steps):
    """(T,) long, descending from N - 1 to 1, uniform in log-SNR (ddim_timesteps' 'logsnr'). abar: (N,) fp64."""
    N = abar.shape[0]
    log_snr = (abar / (1 - abar)).log()  # (N,), increasing as t falls
    targets = torch.linspace(float(log_snr[N - 1]), float(log_snr[1]), num_steps, dtype=torch.float64)
    ts = [int((log_snr - v).abs().argmin()) for v in targets]  # ts[0] = N - 1: its own log-SNR
    for i in range(1, num_steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(num_steps - 1, -1, -1):  # room for the steps below
        ts[i] = max(ts[i], num_steps - i)
    return torch.tensor(ts, dtype=torch.long)


def is_flow(scheduler):
    """Whether `scheduler` is a rectified-flow one (the model predicts the velocity: the flow SDE policy)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def window_mask(num_steps, window, dtype=torch.float64):
    """(T,) 1 inside the SDE window [start, stop) (None: every step), 0 outside."""
    start, stop = window or (0, num_steps)
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"the SDE window must lie in [0, {num_steps}) and be non-empty, got [{start}, {stop})")
    mask = torch.zeros(num_steps, dtype=dtype)
    mask[start:stop] = 1
    return mask


def step_schedule(scheduler, num_steps, eta=1.0, spacing="uniform", noise_level=0.7, window=None):
    """All T steps' (timesteps, a_t, b_t, sigma_t) for `scheduler`'s family: `flow_step_schedule` for a flow-matching
    scheduler (noise_level a), else the DDIM subsequence (ddim_timesteps) from the scheduler's alphas_cumprod and
    final_alpha_cumprod (eta). window: the SDE window (start, stop), None for every step; outside it a step is
    deterministic (eta = 0, or a = 0: sigma_t = 0). Computed in fp64, stored in fp32. Each step goes to the next
    timestep of the sequence; the last to final_alpha_cumprod (sigma = 0 for flow)."""
    if is_flow(scheduler):
        if spacing != "uniform":
            raise ValueError(f"sampler.spacing: flow-matching models take 'uniform' (shifted sigmas), got {spacing!r}")
        return flow_step_schedule(scheduler, num_steps, noise_level, window)
    if not 0 < eta <= 1:
        raise ValueError(f"sampler.eta must be in (0, 1] (the policy needs sigma_t > 0), got {eta}")
    timesteps = ddim_timesteps(scheduler, num_steps, spacing)
    abar = scheduler.alphas_cumprod.double()
    ab_t = abar[timesteps]
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod)).double().view(1)
    ab_prev = torch.cat([abar[timesteps[1:]], final])
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    sigma = eta * window_mask(num_steps, window) * var.sqrt()
    a = ab_prev.sqrt() / ab_t.sqrt()
    b = (1 - ab_prev - sigma**2).sqrt() - ab_prev.sqrt() * (1 - ab_t).sqrt() / ab_t.sqrt()
    return StepSchedule(timesteps, a.float(), b.float(), sigma.float())


def flow_sigmas(scheduler, num_steps):
    """(T + 1,) fp64 descending noise levels of a T-step flow trajectory, from 1 to 0: s_i = 1 - i / T for
    i < T (the SD3 / FLUX pipelines' linspace(1, 1 / T, T)), shifted as sigma = h s / (1 + (h - 1) s) by the
    scheduler's static shift h (config.shift), then 0."""
    s = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    h = float(scheduler.config.shift)
    sig = torch.cat([h * s / (1 + (h - 1) * s), torch.zeros(1, dtype=torch.float64)])
    sig[0] = 1.0  # exactly, whatever the rounding of h / (1 + (h - 1))
    return sig


def flow_step_schedule(scheduler, num_steps, noise_level=0.7, window=None):
    """The flow SDE policy of Flow-GRPO (Liu et al. 2025; its code: flow_grpo/diffusers_patch/sd3_sde_with_logprob.py).
    With sigma_i the shifted noise levels (flow_sigmas), dt = sigma_{i+1} - sigma_i < 0 and noise level a,

        s_i   = a sqrt(sigma_i / (1 - sigma_i'))          (sigma_i' = sigma_1 at sigma_i = 1, else sigma_i)
        mu    = x (1 + s_i^2 dt / (2 sigma_i)) + v_hat (1 + s_i^2 (1 - sigma_i) / (2 sigma_i)) dt = a_i x + b_i v_hat
        x'    = mu + s_i sqrt(-dt) z,   so the policy std is sigma_t = s_i sqrt(-dt).

    Outside the SDE window a = 0: the Euler ODE step x' = x + dt v_hat (a_i = 1, b_i = dt, sigma_t = 0).
    timesteps: sigma_i * num_train_timesteps (the model's time input), fp32."""
    sig = flow_sigmas(scheduler, num_steps)
    sigma, nxt = sig[:-1], sig[1:]
    dt = nxt - sigma
    denom = 1 - torch.where(sigma == 1, sig[1] if num_steps > 1 else torch.zeros((), dtype=sig.dtype), sigma)
    s = noise_level * window_mask(num_steps, window) * (sigma / denom).sqrt()
    a = 1 + s**2 * dt / (2 * sigma)
    b = (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    timesteps = (sigma * scheduler.config.num_train_timesteps).float()
    return StepSchedule(timesteps, a.float(), b.float(), (s * (-dt).sqrt()).float())


def image_seeds(base_seed, epoch, group_ids, images_per_group):
    """(G, B) int64 seeds, a pure function of (base_seed, epoch, global group id, image index)."""
    seeds = [
        [
            int(np.random.SeedSequence([base_seed, epoch, int(g), i]).generate_state(1, np.uint64)[0] >> 1)
            for i in range(images_per_group)
        ]
        for g in group_ids
    ]
    return torch.tensor(seeds, dtype=torch.int64)


def image_noise(seed, num_steps, latent_shape, device="cpu"):
    """(T + 1, C, h, w) fp32 standard normal from one image's seed, drawn on `device` by its own
    torch.Generator: x_T, then z for each step. The stream is that of the device type: on the CPU it is
    torch's CPU generator (the numbers this function always gave), while CUDA's Philox stream gives other
    numbers for the same seed, so a trajectory is reproducible per device type (any rank, any batch size)."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn((num_steps + 1, *latent_shape), generator=gen, device=device)


def cfg_predict(unet, x, t, cond, uncond, guidance=None):
    """UNet on the CFG batch [uncond; cond] at latents x (n, C, h, w), timesteps t (scalar or (n,))
    -> (eps_u, eps_c), each (n, C, h, w) in the UNet's dtype. cond, uncond: (n, L, dim).
    A guidance-distilled policy (`guidance_distilled`, FLUX.1-dev) takes the guidance value as an input instead:
    one call on cond, returned as both halves, so that any CFG combination eps_u + w (eps_c - eps_u) of them is
    that output exactly (and its gradient reaches the one call)."""
    dtype = next(unet.parameters()).dtype
    n = x.shape[0]
    if getattr(getattr(unet, "module", unet), "guidance_distilled", False):
        g = torch.full((n,), float(guidance), device=x.device, dtype=torch.float32)
        out = unet(x.to(dtype), t.to(x.device).reshape(-1).expand(n), cond.to(dtype), guidance=g).sample
        return out, out
    x2 = torch.cat([x, x]).to(dtype)
    emb = torch.cat([uncond, cond]).to(dtype)
    t = t.to(x.device).reshape(-1).expand(n)
    out = unet(x2, torch.cat([t, t]), emb).sample
    return out[:n], out[n:]


@dataclass
class Trajectories:
    prompts: list  # G prompts
    seeds: torch.Tensor  # (G, B) int64
    latents: torch.Tensor  # (G, B, T + 1, C, h, w) fp32: x_T ... x_0
    eps_old: torch.Tensor  # (G, B, T, C, h, w) fp32 guided prediction of the sampling policy
    eps_ref: torch.Tensor  # (G, B, T, C, h, w) fp32 guided prediction of the reference UNet
    log_ratio_old: torch.Tensor  # (G, B, T) fp32 log pi_old - log pi_ref at the sampled steps
    schedule: StepSchedule
    images: torch.Tensor  # (G, B, 3, H, W) fp32 in [0, 1]

    def flat(self, name):
        """A (G, B, ...) field as (G * B, ...), images in group-major order."""
        return getattr(self, name).flatten(0, 1)

    @property
    def flat_prompts(self):
        """The G * B prompts in image order (group-major)."""
        return [p for p in self.prompts for _ in range(self.seeds.shape[1])]


def log_ratio_old(eps_old, eps_ref, x_t, x_prev, a, b, sigma, reduction="sum", impl="torch"):
    """r_old = log pi_old(x_prev | x_t) - log pi_ref(x_prev | x_t) per row, fp32, from the recorded guided eps_old.

    eps_old, eps_ref, x_t, x_prev: (rows, C, h, w); a, b, sigma: scalars or (rows,). eps_old goes in as both CFG
    halves with guidance 0 (eps_old + 0 (eps_old - eps_old) = eps_old exactly), so impl='torch' gives bitwise what
    cfg_step_log_ratio gives on the raw outputs eps_old was guided from, and impl='triton' runs the trainer's kernel.
    """
    return cfg_step_log_ratio(eps_old, eps_old, 0.0, eps_ref, x_t, x_prev, a, b, sigma, reduction, impl)


def reference_rows(n, T, ref_batch_size, batch_size, device):
    """(image, step) index pairs, two (m,) long tensors, for each reference call over n images x T steps:
    ref_batch_size rows at a time, step-major (row j is image j % n at step j // n); with ref_batch_size None the
    sampling loop's own calls (batch_size images at one step), so each call sees the batch an interleaved loop
    gave it and the results are bitwise the same."""
    if ref_batch_size is None:
        for lo in range(0, n, batch_size):
            i = torch.arange(lo, min(lo + batch_size, n), device=device)
            for k in range(T):
                yield i, torch.full_like(i, k)
        return
    rows = torch.arange(n * T, device=device)
    for lo in range(0, n * T, ref_batch_size):
        j = rows[lo : lo + ref_batch_size]
        yield j % n, j // n


@torch.no_grad()
def reference_pass(
    ref_unet, latents, eps_old, cond, uncond, sched, guidance_scale, ref_batch_size, batch_size, reduction, impl
):
    """The frozen reference's guided eps_ref at every recorded x_t and r_old, after sampling, in large batches.

    latents: (n, T + 1, C, h, w); eps_old: (n, T, C, h, w) fp32; cond: (n, L, dim); uncond: (1, L, dim);
    sched: the trajectory's StepSchedule. Returns eps_ref (n, T, C, h, w) fp32 and r_old (n, T) fp32.
    Each reference CFG call takes the rows `reference_rows` gives (2 x rows UNet rows, each with its own
    timestep). Memory: what a sampling UNet call at batch size ref_batch_size needs, beside eps_ref itself.
    """
    n, T = eps_old.shape[:2]
    eps_ref = torch.empty_like(eps_old)
    r_old = torch.empty((n, T), device=eps_old.device)
    for i, k in reference_rows(n, T, ref_batch_size, batch_size, eps_old.device):
        x, x_prev = latents[i, k], latents[i, k + 1]
        ref_u, ref_c = cfg_predict(
            ref_unet, x, sched.timesteps[k], cond[i], uncond.expand(i.numel(), -1, -1), guidance_scale
        )
        eps_ref[i, k] = e_ref = guided_eps(ref_u.float(), ref_c.float(), guidance_scale)
        r_old[i, k] = log_ratio_old(
            eps_old[i, k], e_ref, x, x_prev, sched.a[k], sched.b[k], sched.sigma[k], reduction, impl
        )
    return eps_ref, r_old


@torch.no_grad()
def sample(
    models: Models,
    prompts: Sequence[str],
    seeds: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    batch_size: int = 16,
    reduction: str = "sum",
    impl: str = "torch",
    with_reference: bool = True,
    spacing: str = "uniform",
    ref_batch_size: int | None = None,
    policy_is_reference: bool = False,
    noise_level: float = 0.7,
    window: tuple[int, int] | None = None,
) -> Trajectories:
    """Sample G groups x B images (seeds (G, B)) with the policy `models.unet`.

    prompts: G strings; seeds: (G, B) int64 (`image_seeds`); num_steps: T; window: the SDE window [start, stop)
    (None: every step; config.sde_window), T_w = stop - start its steps. Returns Trajectories with latents
    (G, B, T_w + 1, C, h, w) (x at the window's steps and after its last), eps_old and eps_ref (G, B, T_w, C, h, w),
    log_ratio_old (G, B, T_w), the window's schedule and images (G, B, 3, H, W) in [0, 1] after all T steps.
    eta (DDIM) or noise_level (flow): the policy's noise in the window (step_schedule).

    batch_size: images per policy UNet call (the CFG batch is twice that). ref_batch_size: (image, step) rows
    per reference UNet call after sampling (`reference_pass`, `reference_rows`); None: the sampling loop's own
    batches (bitwise what calling the reference beside the policy gives); impl: its log-ratio implementation
    ('torch' or 'triton'). policy_is_reference: the caller knows the policy is bit-identical to models.ref_unet
    (no optimizer step applied since a fresh start); then, as when models.unet is models.ref_unet, eps_ref is
    eps_old (the same tensor) and r_old = 0 without a reference pass. With with_reference=False only latents and
    images are filled (evaluation); eps_old, eps_ref and log_ratio_old are None.
    """
    G, B = seeds.shape
    if len(prompts) != G:
        raise ValueError(f"sample: {len(prompts)} prompts for seeds of shape {tuple(seeds.shape)}")
    unet = models.unet
    device = next(unet.parameters()).device
    latent_shape = models.latent_shape
    full = step_schedule(models.scheduler, num_steps, eta, spacing, noise_level, window).to(device)
    T = num_steps
    start, stop = window or (0, T)
    sched = full.window(start, stop)
    n, T_w = G * B, stop - start
    cond_all = models.encode_prompts(list(prompts)).repeat_interleave(B, dim=0)
    uncond = models.encode_prompts([""])
    latents = torch.empty((n, T_w + 1, *latent_shape), device=device)
    finals = torch.empty((n, *latent_shape), device=device)
    eps_old = torch.empty((n, T_w, *latent_shape), device=device) if with_reference else None
    flat_seeds = seeds.reshape(-1).tolist()
    for lo in range(0, n, batch_size):
        idx = slice(lo, min(lo + batch_size, n))
        noise = torch.stack([image_noise(s, T, latent_shape, device) for s in flat_seeds[idx]])
        cond = cond_all[idx]
        unc = uncond.expand(cond.shape[0], -1, -1)
        x = noise[:, 0]
        for k in range(T):
            if k == start:
                latents[idx, 0] = x
            t, a, b, s = full.timesteps[k], full.a[k], full.b[k], full.sigma[k]
            eps_u, eps_c = cfg_predict(unet, x, t, cond, unc, guidance_scale)
            eps = guided_eps(eps_u.float(), eps_c.float(), guidance_scale)
            x_prev = a * x + b * eps + s * noise[:, k + 1]  # s = 0 outside the window: the deterministic step
            if start <= k < stop:
                latents[idx, k + 1 - start] = x_prev
                if with_reference:
                    eps_old[idx, k - start] = eps
            x = x_prev
        finals[idx] = x
    at_reference = policy_is_reference or models.unet is models.ref_unet
    eps_ref = r_old = None
    if with_reference and at_reference:
        r_old = torch.zeros((n, T_w), device=device)
    elif with_reference:
        eps_ref, r_old = reference_pass(
            models.ref_unet,
            latents,
            eps_old,
            cond_all,
            uncond,
            sched,
            guidance_scale,
            ref_batch_size,
            batch_size,
            reduction,
            impl,
        )
    images = torch.cat([models.decode(finals[lo : lo + batch_size]) for lo in range(0, n, batch_size)])
    shape = lambda t: None if t is None else t.reshape(G, B, *t.shape[1:])  # noqa: E731
    eps_old = shape(eps_old)
    return Trajectories(
        list(prompts),
        seeds,
        shape(latents),
        eps_old,
        eps_old if at_reference else shape(eps_ref),
        shape(r_old),
        sched,
        shape(images),
    )


def save_rollout(path, traj, rewards, parts=None):
    """One rank's trajectories, rewards (G, B) and reward components ({name: (G*B,)}, logged per
    component) -> safetensors file, written under a .tmp name and renamed. eps_ref is stored once when
    it is eps_old (a rollout of the reference itself)."""
    from safetensors.torch import save_file

    path = Path(path)
    shared = traj.eps_ref is traj.eps_old
    tensors = {f: getattr(traj, f).contiguous().cpu() for f in ROLLOUT_FIELDS if not (shared and f == "eps_ref")}
    tmp = path.with_name(path.name + ".tmp")
    components = {f"reward/{name}": v.reshape(-1).contiguous().cpu() for name, v in (parts or {}).items()}
    save_file(
        {**tensors, **components, "rewards": rewards.contiguous().cpu()},
        str(tmp),
        metadata={"prompts": json.dumps(traj.prompts), "eps_ref_is_eps_old": json.dumps(shared)},
    )
    os.replace(tmp, path)


def load_rollout(path, schedule, device):
    """The inverse of save_rollout -> (Trajectories, rewards (G, B), reward components) on `device`
    (no components in a file written before they were stored)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt", device=str(device)) as f:
        meta = f.metadata()
        t = {name: f.get_tensor(name) for name in f.keys()}
    if json.loads(meta.get("eps_ref_is_eps_old", "false")):
        t["eps_ref"] = t["eps_old"]
    traj = Trajectories(prompts=json.loads(meta["prompts"]), schedule=schedule, **{f: t[f] for f in ROLLOUT_FIELDS})
    parts = {name[len("reward/") :]: v for name, v in t.items() if name.startswith("reward/")}
    return traj, t["rewards"], parts
