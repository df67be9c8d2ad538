"""Which denoising steps carry the PRDP log-ratio? A diagnostic for choosing T (README, "The paper in miniature").

    python benchmarks/step_share.py [--T 10 20] [--spacing uniform quadratic] \
        [--json benchmarks/results/step_share_cpu.json]

The per-step log-ratio r_t = log pi_theta(x_{t-1}|x_t) - log pi_ref(x_{t-1}|x_t) changes with the UNet's
prediction through the mean mu = a_t x_t + b_t eps_hat, against the step's noise sigma_t, so a step's
sensitivity scales as b_t / sigma_t. Two measurements per T and timestep spacing (sampler.spacing):
  proxy:    b_t / sigma_t from the scheduler alone, as a share of its sum over steps (the world's scheduler and
            Stable Diffusion v1.4's; no weights needed);
  measured: the world model after one sign step of size --step on every UNet weight (an Adam-like first step),
            sampling --prompts world_small prompts x --images images: mean |r_t| per step as a share of the sum.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import cpu_name, run_meta  # noqa: E402
from prdp_ds.models import SD14_SCHEDULER, load_models, make_scheduler  # noqa: E402
from prdp_ds.sampler import image_seeds, sample, step_schedule  # noqa: E402
from prdp_ds.world.model import SCHEDULER as WORLD_SCHEDULER  # noqa: E402
from prdp_ds.world.scenes import world_small_prompts  # noqa: E402


def proxy_share(scheduler_cfg, T, spacing="uniform"):
    s = step_schedule(make_scheduler(scheduler_cfg), T, 1.0, spacing)
    k = s.b.abs() / s.sigma
    return {"timesteps": s.timesteps.tolist(), "sigma": s.sigma.tolist(), "share": (k / k.sum()).tolist()}


def measured_share(T, spacing, step, prompts, images, guidance):
    models = load_models("world")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(step * torch.sign(torch.randn_like(p)))
    traj = sample(
        models,
        world_small_prompts()[:prompts],
        image_seeds(0, 0, range(prompts), images),
        T,
        guidance,
        1.0,
        prompts * images,
        spacing=spacing,
    )
    r = traj.log_ratio_old.reshape(-1, T).abs().mean(0)
    return {"mean_abs_r": r.tolist(), "share": (r / r.sum()).tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[10, 20])
    p.add_argument("--spacing", nargs="+", default=["uniform", "quadratic"])
    p.add_argument("--step", type=float, default=1e-5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--json")
    args = p.parse_args()
    device = cpu_name()
    meta = run_meta("benchmarks/step_share.py", device)
    print(f"# device: {device}")
    out = {"meta": meta, "args": vars(args), "world": {}, "sd14_proxy_T50": proxy_share(SD14_SCHEDULER, 50)}
    for spacing in args.spacing:
        out["world"][spacing] = {}
        for T in args.T:
            res = {
                "proxy": proxy_share(WORLD_SCHEDULER, T, spacing),
                "measured": measured_share(T, spacing, args.step, args.prompts, args.images, args.guidance),
            }
            out["world"][spacing][T] = res
            top = max(range(T), key=lambda i: res["measured"]["share"][i])
            print(
                f"world, {spacing} spacing, T={T}: step {top} (t={res['proxy']['timesteps'][top]}) carries "
                f"{res['measured']['share'][top]:.0%} of mean |r_t| (proxy {res['proxy']['share'][top]:.0%})"
            )
    sd = out["sd14_proxy_T50"]["share"]
    print(f"SD v1.4 scheduler, T=50: the largest step's proxy share is {max(sd):.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
