"""The DPOK baseline (Fan et al., NeurIPS 2023) on PRDP's sampler, rewards, engine and logs.

DPOK maximizes E[r] - beta KL(p_theta || p_ref), bounding the KL by the sum of the per-step KLs of the two Gaussian
policies (shared sigma_t), and follows the reward's policy gradient with a clipped importance ratio and a learned
value function V(x_t, t, z) as its baseline. With rho_{i,t} = exp(log pi_theta - log pi_old) (cancellation-free,
against the recorded eps_old, in dpok.reduction units) and the reward weight alpha:

    A_{i,t} = alpha (r_i - V(x_t^i, t, z_i))                        V held fixed (no gradient reaches it),
    L = mean_{i,t} [ -A_{i,t} clip(rho_{i,t}, 1 - eps, 1 + eps) + beta KL_{i,t} ],
    KL_{i,t} = ||b_t (eps_hat_theta - eps_hat_ref)||^2 / (2 sigma_t^2)          (prdp_ds.grpo.step_kl),

the clip as in DPOK's code (google-research dpok/train_online_pg.py: ratio = clamp(ratio), loss = -alpha adv ratio;
a term whose ratio left [1 - eps, 1 + eps] gives no gradient, whatever its advantage's sign). Both terms are sums of
per-(i, t) terms: each chunk of (images x steps) is backpropagated on its own, exactly (prdp_ds.grpo.surrogate_step).

V is DPOK's ValueMulti: [flatten(x_t), z] through three ConditionalLinear layers (a linear map scaled by a learned
per-step vector) with ReLU, then a linear output; z is the prompt's text-encoder states averaged over its tokens
(DPOK takes CLIP's pooled text features). Each epoch, before the policy steps, V takes dpok.value_updates AdamW
steps, each on the mean of dpok.value_steps minibatch MSE losses to the final reward (DPOK: --v_step 5 accumulated
minibatches of --v_batch_size 256 transitions, one optimizer step per sampling round of --g_batch_size 6 images
per GPU, so an epoch of N images matches its value steps per image at value_updates = N / 6).

Where this differs from DPOK's code: its transitions come from a replay buffer of the last 1,000 (about three
sampling rounds of 6 images x 50 steps), here from this epoch's rollout; its minibatches are per GPU, here drawn from
the world's transitions, so that 1 and N ranks train the same V; its policy steps take random minibatches of 24
transitions, here every (image, step) of the rollout, as PRDP's and DDPO's steps do; its KL term is the mean of
(eps_hat_theta - eps_hat_ref)^2 over latent elements (pipeline_stable_diffusion_extended.py), the closed form
without the step's factor b_t^2 / (2 sigma_t^2), here the closed form itself. Its log-probs are means over latent
elements (scheduling_ddim_extended.py), as dpok.reduction 'mean'.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from prdp_ds.config import recorded_steps
from prdp_ds.ddpo import finite_everywhere
from prdp_ds.grpo import surrogate_step, with_policy_loss
from prdp_ds.twopass import all_reduce

ROWS_PER_CALL = 4096  # value-function rows evaluated at once when computing advantages (memory bound only)


class ConditionalLinear(nn.Module):
    """x (n, n_in), t (n,) int64 -> (n, n_out): Linear(x) scaled elementwise by a learned vector of step t."""

    def __init__(self, n_in, n_out, num_steps):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)
        self.embed = nn.Embedding(num_steps, n_out)
        nn.init.uniform_(self.embed.weight)  # DPOK's initialization
        nn.init.xavier_normal_(self.lin.weight)

    def forward(self, x, t):
        return self.embed(t) * self.lin(x)


class ValueNet(nn.Module):
    """V(x_t, t, z): x (n, C, h, w), z (n, D), t (n,) int64 step indices -> (n,) predicted final reward."""

    def __init__(self, in_features, num_steps, width, layers=3):
        super().__init__()
        dims = [in_features] + [width] * layers
        self.hidden = nn.ModuleList(ConditionalLinear(a, b, num_steps) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(width, 1)
        nn.init.xavier_normal_(self.out.weight)

    def forward(self, x, z, t):
        h = torch.cat([x.flatten(1), z], dim=1)
        for layer in self.hidden:
            h = F.relu(layer(h, t))
        return self.out(h).squeeze(1)


def prompt_features(cond):
    """(n, L, D) text-encoder states -> (n, D) fp32, their mean over tokens: the value function's z."""
    return cond.float().mean(dim=1)


def dpok_terms(log_ratio, adv, kl, clip_range, kl_weight):
    """Per-(image, step) terms of L: log_ratio (n, k) = log pi_theta - log pi_old in dpok.reduction units,
    adv (n, k) = alpha (r - V), kl (n, k) KL_t -> (n, k) -adv clip(rho, 1 - eps, 1 + eps) + kl_weight KL_t."""
    ratio = torch.clamp(torch.exp(log_ratio), 1 - clip_range, 1 + clip_range)
    return -adv * ratio + kl_weight * kl


class ValueFunction:
    """DPOK's learned baseline and its AdamW optimizer; the same on every rank (seeded by train.seed, gradients
    averaged). latent_shape: (C, h, w); text_dim: the text encoder's width."""

    def __init__(self, cfg, latent_shape, text_dim, device):
        self.cfg, d = cfg, cfg.dpok
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            net = ValueNet(math.prod(latent_shape) + text_dim, recorded_steps(cfg), d.value_width)
        self.net = net.to(device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=d.value_lr)

    def _draw(self, epoch, step, n, size):
        """The minibatch value step `step` of `epoch` takes: flat indices (rank-major, image * T + step) into the
        world's n transitions, drawn from (train.seed, epoch, step) alone, so any world size and a resume draw it
        alike."""
        seed = int(np.random.SeedSequence([self.cfg.train.seed, epoch, step]).generate_state(1, np.uint64)[0])
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed >> 1))[: min(size, n)]

    def fit(self, traj, cond, rewards, epoch):
        """dpok.value_updates AdamW steps, each on the mean of dpok.value_steps minibatch MSE losses of V to the final
        reward, over the world's (image, step) transitions of this epoch -> {'value_loss': the mean of those losses}.
        Each rank evaluates the drawn transitions it holds and the gradient sums are all-reduced: 1 and N ranks take
        the same steps. cond: (G B, L, D) text states of traj.flat_prompts; rewards: (G, B). No step anywhere if any
        reward is not finite."""
        if not finite_everywhere(rewards):
            return {"value_loss": float("nan")}
        d, T = self.cfg.dpok, traj.log_ratio_old.shape[2]
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        lat, z, r = traj.flat("latents"), prompt_features(cond), rewards.reshape(-1).float()
        n, lo = r.numel() * T, rank * r.numel() * T  # every rank holds as many images
        total = torch.zeros(1, dtype=torch.float64, device=rewards.device)
        for u in range(d.value_updates):
            self.opt.zero_grad(set_to_none=True)
            for s in range(d.value_steps):
                idx = self._draw(epoch, u * d.value_steps + s, n * world, d.value_batch_size)
                mine = (idx[(idx >= lo) & (idx < lo + n)] - lo).to(lat.device)
                image, step = mine // T, mine % T
                err = self.net(lat[image, step], z[image], step) - r[image]
                loss = (err**2).sum() / (idx.numel() * d.value_steps)
                loss.backward()
                total += loss.detach().double()
            for p in self.net.parameters():  # DPOK's DDP-wrapped value function: one gradient for the world
                all_reduce(p.grad)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"value_loss": all_reduce(total).item() / d.value_updates}

    @torch.no_grad()
    def advantages(self, traj, cond, rewards):
        """(G, B, T) fp32 A_{i,t} = alpha (r_i - V(x_t^i, t, z_i)); NaN where a reward is not finite."""
        G, B, T = traj.log_ratio_old.shape
        lat, z = traj.flat("latents"), prompt_features(cond)
        values = torch.empty(G * B, T, device=rewards.device)
        per_call = max(1, ROWS_PER_CALL // T)
        steps = torch.arange(T, device=lat.device)
        for lo in range(0, G * B, per_call):
            hi = min(lo + per_call, G * B)
            x = lat[lo:hi, :T].flatten(0, 1)
            values[lo:hi] = self.net(x, z[lo:hi].repeat_interleave(T, 0), steps.repeat(hi - lo)).reshape(hi - lo, T)
        adv = self.cfg.dpok.reward_weight * (rewards.reshape(G * B, 1).float() - values)
        return adv.reshape(G, B, T)

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def dpok_step(engine, traj, adv, cond, uncond, cfg, impl):
    """One DPOK optimizer step over this rank's whole rollout (surrogate_step with dpok_terms, every step).

    adv: (G, B, T) fp32 (ValueFunction.advantages). Returns a dict of floats like grpo_step's."""
    d = cfg.dpok

    def terms(log_ratio, a, kl):
        return dpok_terms(log_ratio, a, kl, d.clip_range, d.kl_weight)

    steps = torch.arange(recorded_steps(cfg), device=adv.device)
    out = surrogate_step(engine, traj, adv, cond, uncond, cfg, impl, steps, terms, d.clip_range, d.reduction)
    return with_policy_loss(out, d.kl_weight)
