"""Sample a grid from the world model and judge it.

    python -m prdp_ds.world.samples --weights prdp_ds/world/weights --prompts world_small \
        --seeds 4 --num-steps 20 --guidance 1 3 5 --out prdp_ds/world/weights/samples.png
    python -m prdp_ds.world.samples --flow --prompts world_small --seeds 4 --num-steps 10 --guidance 1 3 5 \
        --out prdp_ds/world/weights_flow/samples.png       (the flow-matching world, its SDE sampler)

Rows = prompts, columns = seeds (one block of columns per guidance scale, the ground-truth render of
the prompt first). Prints and records (samples.json beside the PNG) per guidance scale: the judge's
accuracy (all stated attributes right), the per-attribute accuracy, and the mean alignment and
aesthetic rewards.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from prdp_ds.prompts import load_prompts
from prdp_ds.sampler import SPACINGS, sample
from prdp_ds.world import scenes
from prdp_ds.world.classifier import load_classifier, predict
from prdp_ds.world.model import build_world_models
from prdp_ds.world.rewards import aesthetic_score, alignment_score, judge, parse_prompts


def evaluate(images, prompts, classifier):
    parsed = parse_prompts(prompts)
    probs = predict(classifier, images)
    per_attr = {}
    for k in scenes.ATTRIBUTES:
        hits = [bool(probs[k][i].argmax() == a[k]) for i, a in enumerate(parsed) if k in a]
        if hits:
            per_attr[k] = sum(hits) / len(hits)
    return dict(
        judge_accuracy=judge(images, prompts, classifier).float().mean().item(),
        per_attribute=per_attr,
        alignment=alignment_score(images, prompts, classifier).mean().item(),
        aesthetic=aesthetic_score(images).mean().item(),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None)
    p.add_argument("--prompts", default="world_small")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--spacing", default="uniform", choices=SPACINGS, help="DDIM timestep spacing")
    p.add_argument("--flow", action="store_true", help="the flow-matching world (weights_flow, flow SDE sampler)")
    p.add_argument("--noise-level", type=float, default=0.7, help="the flow SDE's noise level (with --flow)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build_world_models(False if args.weights == "random" else args.weights, flow=args.flow)
    models.unet.eval()
    classifier = load_classifier()
    prompts = list(load_prompts(args.prompts).prompts)
    G, B = len(prompts), args.seeds
    seeds = torch.arange(G * B).reshape(G, B) + 1000
    truth, _ = scenes.render(scenes.scenes_from_attributes([scenes.parse_caption(q) for q in prompts], seed=1))
    columns, results = [truth.unsqueeze(1)], {}
    for w in args.guidance:
        start = time.time()
        with torch.no_grad():
            traj = sample(
                models,
                prompts,
                seeds,
                args.num_steps,
                w,
                eta=args.eta,
                batch_size=32,
                with_reference=False,
                spacing=args.spacing,
                noise_level=args.noise_level,
            )
        images = traj.images  # (G, B, 3, H, W)
        flat = images.reshape(G * B, *images.shape[2:])
        res = evaluate(flat, [q for q in prompts for _ in range(B)], classifier)
        res["sample_s"] = round(time.time() - start, 1)
        results[str(w)] = res
        print(f"guidance {w}: " + json.dumps(res), flush=True)
        columns.append(torch.ones(G, 1, 3, 32, 32))  # white separator
        columns.append(images)
    grid = torch.cat(columns, 1)
    import torchvision.utils as vutils

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(grid.reshape(-1, *grid.shape[2:]), out, nrow=grid.shape[1], padding=1, pad_value=1.0)
    record = dict(
        prompts=prompts,
        seeds=seeds.tolist(),
        num_steps=args.num_steps,
        spacing=args.spacing,
        eta=args.eta,
        **({"flow": True, "noise_level": args.noise_level} if args.flow else {}),
        layout=f"rows = prompts; columns: ground-truth render, then per guidance scale a white column and {B} samples",
        guidance=args.guidance,
        results=results,
    )
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
