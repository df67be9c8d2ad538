"""Is one epoch's PRDP gradient on the world signal or noise? A diagnostic (README, "The paper in miniature").

    python benchmarks/grad_snr.py [--batches 6] [--json benchmarks/results/grad_snr_cpu.json]

At theta = ref every log-ratio is 0, so the PRDP loss's gradient is -(2 / (beta T)) sum over valid pairs of dr_ij
(grad R_i - grad R_j): a reward-weighted score function, the same direction at any beta. For --batches independent
batches shaped like one epoch of the 2026-11-30 `world` preset (6 prompts x 6 images of world_small, fresh noise
each), this computes that gradient over the UNet's weights and reports the mean cosine c between the gradients of
different batches: the shared (signal) part carries about a fraction c of a batch gradient's squared norm, and the
mean of n batches has cosine about sqrt(n c / (1 + (n - 1) c)) with the signal. Per reward (the alignment reward,
which the world does not learn; the aesthetic one, which it learns slowly) and per timestep spacing. It also gives
each step's share of the gradient's norm.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import cpu_name, run_meta  # noqa: E402
from prdp_ds.config import Config  # noqa: E402
from prdp_ds.loss import rdp_loss  # noqa: E402
from prdp_ds.models import load_models  # noqa: E402
from prdp_ds.rewards import build_reward  # noqa: E402
from prdp_ds.sampler import image_seeds, sample  # noqa: E402
from prdp_ds.twopass import chunk_log_ratios  # noqa: E402
from prdp_ds.world.scenes import world_small_prompts  # noqa: E402


def batch_gradient(models, reward_fn, prompts, seeds, cfg):
    """-> (flat gradient of the PRDP loss at theta = ref over the UNet's weights, (T,) per-step gradient norms).
    The per-step log-ratios are the trainer's own (prdp_ds.twopass.chunk_log_ratios), one step at a time."""
    at_ref = copy.copy(models)
    at_ref.unet = models.ref_unet  # sample from pi_ref: r_old = 0
    T, n = cfg.sampler.num_steps, seeds.numel()
    traj = sample(at_ref, prompts, seeds, T, cfg.sampler.guidance_scale, batch_size=n, spacing=cfg.sampler.spacing)
    G, B = seeds.shape
    rewards, _ = reward_fn(traj.images.flatten(0, 1), traj.flat_prompts)
    R = torch.zeros(G, B, T, requires_grad=True)
    rdp_loss(R, torch.zeros(G, B, T), rewards.view(G, B).float(), 1e9, cfg.loss.kl_weight).backward()
    weight = R.grad.flatten(0, 1)  # (G*B, T) dL/dr_{i,t}
    cond = models.encode_prompts(traj.flat_prompts)
    uncond = models.encode_prompts([""])
    params = [p for p in models.unet.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    step_norms = []
    for k in range(T):
        r = chunk_log_ratios(models.unet, traj, cond, uncond, slice(0, n), slice(k, k + 1), cfg, "torch")  # (n, 1)
        grads = torch.autograd.grad((weight[:, k] * r[:, 0]).sum(), params)
        step_norms.append(torch.cat([g.flatten() for g in grads]).norm().item())
        total = [a + g for a, g in zip(total, grads)]
    return torch.cat([g.flatten() for g in total]), step_norms


def pairwise_cosines(grads):
    """-> the cosines between the gradients of every pair of different batches."""
    g = torch.stack([x / x.norm() for x in grads])
    c = g @ g.T
    i, j = torch.triu_indices(len(grads), len(grads), offset=1)
    return c[i, j].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--prompts", type=int, default=6, help="prompts per batch (the 2026-11-30 world preset: 6)")
    p.add_argument("--images", type=int, default=6, help="images per prompt (the 2026-11-30 world preset: 6)")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--rewards", nargs="+", default=["world_alignment", "world_aesthetic"])
    p.add_argument("--spacing", nargs="+", default=["uniform", "quadratic"])
    p.add_argument("--model", default="world", help="model.pretrained: world, or world:WEIGHTS_DIR")
    p.add_argument("--json")
    args = p.parse_args()
    if args.batches < 3:
        p.error(f"--batches must be at least 3 (the spread of the pairwise cosines needs 3 pairs), got {args.batches}")
    device = cpu_name()
    meta = run_meta("benchmarks/grad_snr.py", device)
    print(f"# device: {device}")
    models = load_models(args.model)
    all_prompts = world_small_prompts()
    out = {"meta": meta, "args": vars(args), "results": {}}
    for reward in args.rewards:
        reward_fn = build_reward({reward: 1.0}, "cpu")
        for spacing in args.spacing:
            cfg = Config()
            cfg.sampler.num_steps, cfg.sampler.guidance_scale, cfg.sampler.spacing = args.T, args.guidance, spacing
            cfg.loss.kl_weight = args.beta
            grads, norms = [], []
            for b in range(args.batches):
                ids = [(b * args.prompts + i) % len(all_prompts) for i in range(args.prompts)]
                seeds = image_seeds(0, b, ids, args.images)
                g, step_norms = batch_gradient(models, reward_fn, [all_prompts[i] for i in ids], seeds, cfg)
                grads.append(g)
                norms.append(step_norms)
            cos = torch.tensor(pairwise_cosines(grads), dtype=torch.float64)
            share = torch.tensor(norms).mean(0)
            res = {
                "mean_pairwise_cosine": cos.mean().item(),
                "pairwise_cosine_std": cos.std().item(),
                "pairwise_cosines": cos.tolist(),
                "step_norm_share": (share / share.sum()).tolist(),
            }
            out["results"][f"{reward}/{spacing}"] = res
            print(
                f"{reward}, {spacing} spacing: cosine between batch gradients {cos.mean():+.4f} (mean of "
                f"{len(cos)} pairs, std {cos.std():.4f}); largest step's share of the gradient norm "
                f"{max(res['step_norm_share']):.0%}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
