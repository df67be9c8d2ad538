"""Evaluate a base model and finetuned UNets on equal terms (paper §4.1, docs/design.md §13).

    python -m prdp_ds.evaluate --base tiny --model prdp=runs/prdp --prompts animals \
        --reward '{brightness: 1.0}' --samples 64 --output-dir runs/eval
    deepspeed --num_gpus 8 --module prdp_ds.evaluate --base /models/sd-v1-4 \
        --model prdp=runs/prdp/checkpoints/epoch_0099 --model lora=runs/lora --prompts animals \
        --prompts photo=/data/hpdv2_photo.txt --reward '{hpsv2: {checkpoint: /models/HPS_v2_compressed.pt}}' \
        --samples 256 --output-dir runs/eval          # (torchrun --nproc_per_node 8 -m prdp_ds.evaluate ... too)

Every model (row "base" plus each --model) samples the same prompts with the same seeds: image i of
prompt k in a prompt set draws its noise from image_seeds(seed, EVAL_EPOCH, [k], S)[0, i], so differences
to the base are paired. Work is split into resumable units (model x prompt set x --prompts-per-unit prompts)
dealt round-robin to the ranks; a rerun skips finished units and refuses other settings. Outputs: eval.json
(mean, std, se, n per model x prompt set x reward, paired differences to base), table.txt, grids/SET.png.
--train-config FILE / --preset NAME supply the defaults. Layout and options: docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from prdp_ds import config as config_lib
from prdp_ds.engine import run_on_ranks
from prdp_ds.models import ModelLoadError, check_parts, load_models
from prdp_ds.prompts import load_prompts
from prdp_ds.rewards import build_reward
from prdp_ds.sampler import SPACINGS, image_seeds, is_flow, sample

EVAL_EPOCH = 2**31 - 2  # evaluation seeds as if from this epoch id: neither a training epoch nor the training grid's
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PRECISIONS = ("auto", "fp32", "bf16")  # --precision choices
GRID_TILE = 128  # pixels per grid image
FROM_CONFIG = {
    "base": "model.pretrained",
    "base_seed": "model.seed",
    "num_steps": "sampler.num_steps",
    "guidance_scale": "sampler.guidance_scale",
    "eta": "sampler.eta",
    "spacing": "sampler.spacing",
    "noise_level": "sampler.noise_level",
    "sde_steps": "sampler.sde_steps",
    "sde_start": "sampler.sde_start",
    "batch_size": "sampler.batch_size",
    "seed": "train.seed",
    "reward": "reward",
    "template": "prompts.template",
}


class SettingsMismatch(ValueError):
    """The output directory holds results computed with other settings."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="prdp_ds.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", help="base model: 'tiny' or a local diffusers SD folder (default: model.pretrained)")
    p.add_argument("--base-seed", type=int, help="seed of the tiny base model's weights (default: model.seed)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a diffusers UNet folder, a checkpoint (holding unet/ or unet_lora/) or a training run folder",
    )
    p.add_argument(
        "--prompts",
        action="append",
        default=[],
        metavar="[NAME=]SOURCE",
        help="a prompt set load_prompts accepts, e.g. 'animals' or a .txt file (default: prompts.source)",
    )
    p.add_argument("--template", help="format string applied to every prompt (default: prompts.template)")
    p.add_argument("--max-prompts", type=int, help="take the first K prompts of each set")
    p.add_argument("--reward", help="YAML mapping like the training config's reward (default: its reward)")
    p.add_argument("--samples", type=int, default=64, help="images per prompt, S (paper: 256 small, 64 large scale)")
    p.add_argument("--num-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--eta", type=float)
    p.add_argument("--spacing", choices=SPACINGS, help="DDIM timestep spacing (default: sampler.spacing)")
    p.add_argument("--noise-level", type=float, help="flow SDE noise level (default: sampler.noise_level)")
    p.add_argument("--sde-steps", type=int, help="SDE window length, 0 = every step (default: sampler.sde_steps)")
    p.add_argument("--sde-start", type=int, help="first step of the SDE window (default: sampler.sde_start)")
    p.add_argument("--batch-size", type=int, help="images per sampler call")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="dtype of the models: auto = bf16 on a bf16-capable GPU (as training samples there), else "
        "fp32; fp32 for models trained with bf16 off (ds_configs/zero2_fp32.json)",
    )
    p.add_argument("--seed", type=int, help="base seed of the evaluation noise (default: train.seed)")
    p.add_argument("--prompts-per-unit", type=int, default=8, help="prompts per resumable unit of work")
    p.add_argument("--grid-prompts", type=int, default=4)
    p.add_argument("--grid-samples", type=int, default=4)
    p.add_argument("--output-dir", default="runs/eval")
    p.add_argument("--train-config", help="training config YAML to take defaults from")
    p.add_argument("--preset", help=f"training preset to take defaults from; one of {config_lib.preset_names()}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = config_lib.resolve(args.preset, args.train_config)
    for attr, key in FROM_CONFIG.items():
        if getattr(args, attr) is None:
            section, name = key.split(".") if "." in key else (key, None)
            setattr(args, attr, getattr(getattr(cfg, section), name) if name else getattr(cfg, section))
    if isinstance(args.reward, str):
        try:
            args.reward = yaml.safe_load(args.reward)
        except yaml.YAMLError as err:
            raise ValueError(f"--reward {args.reward!r}: not YAML ({err})") from err
    args.prompts = args.prompts or [cfg.prompts.source]
    for key in ("samples", "num_steps", "batch_size", "prompts_per_unit", "max_prompts"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    return args


def _named(arg, flag):
    name, sep, value = arg.partition("=")
    if not sep or not NAME.match(name):
        raise ValueError(f"{flag} {arg!r}: expected NAME=VALUE with NAME made of letters, digits and _.+-")
    return name, value


def resolve_model(arg):
    """'NAME=PATH' -> (name, kind 'unet' | 'lora', folder): a run folder's checkpoints/latest, a checkpoint's
    unet/ (preferred) or unet_lora/, or a diffusers UNet folder."""
    name, path = _named(arg, "--model")
    if name == "base":
        raise ValueError(f"--model {arg!r}: the name 'base' is reserved for --base")
    folder = Path(path).resolve()
    if (folder / "checkpoints" / "latest").is_file():
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    if (folder / "unet" / "config.json").is_file():
        return name, "unet", str(folder / "unet")
    if (folder / "unet_lora").is_dir():
        return name, "lora", str(folder / "unet_lora")
    if (folder / "config.json").is_file():
        return name, "unet", str(folder)
    raise ModelLoadError(
        f"--model {arg}: {folder} is not a model; expected a diffusers UNet folder (config.json + "
        "*.safetensors), a checkpoint folder holding unet/ or unet_lora/, or a training run folder "
        "holding checkpoints/latest"
    )


def load_prompt_sets(args):
    sets = {}
    for arg in args.prompts:
        name, source = _named(arg, "--prompts") if "=" in arg and not Path(arg).exists() else (Path(arg).stem, arg)
        if name in sets or not NAME.match(name):
            raise ValueError(
                f"--prompts {arg!r}: prompt set name {name!r} is repeated or not a plain name; name it with NAME=SOURCE"
            )
        sets[name] = list(load_prompts(source, args.template))[: args.max_prompts]
    return sets


def make_settings(args, models, sets):
    s = {
        k: getattr(args, k)
        for k in (
            "base",
            "base_seed",
            "template",
            "max_prompts",
            "reward",
            "samples",
            "num_steps",
            "guidance_scale",
            "eta",
            "spacing",
            "batch_size",
            "seed",
            "prompts_per_unit",
            "grid_prompts",
            "grid_samples",
        )
    }
    s.update(config_lib.later_sampler_settings(vars(args)))
    s.update(
        precision=str(_dtype(args.precision)).replace("torch.", ""),
        eval_epoch=EVAL_EPOCH,
        models={name: {"kind": kind, "path": path} for name, kind, path in models},
        prompt_sets={
            name: {"num_prompts": len(p), "sha256": hashlib.sha256(json.dumps(p).encode()).hexdigest()}
            for name, p in sets.items()
        },
    )
    return json.loads(json.dumps(s))


def check_settings(path, settings):
    """Refuse a directory holding results of other settings; record the union of models and prompt sets."""
    old = json.loads(path.read_text()) if path.is_file() else settings
    diff = [(k, old.get(k), v) for k, v in settings.items() if k not in ("models", "prompt_sets") and old.get(k) != v]
    diff += [
        (f"{k}.{n}", old[k][n], v)
        for k in ("models", "prompt_sets")
        for n, v in settings[k].items()
        if old[k].get(n, v) != v
    ]
    if diff:
        raise SettingsMismatch(
            f"{path.parent.parent} holds results computed with other settings ("
            + "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, a, b in diff)
            + "); use another --output-dir"
        )
    _write(
        path,
        lambda tmp: tmp.write_text(
            json.dumps({**settings, **{k: {**old[k], **settings[k]} for k in ("models", "prompt_sets")}}, indent=1)
        ),
    )


def _write(path, writer):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    os.replace(tmp, path)


def _save_tensors(tensors, metadata, path):
    save_file(tensors, str(path), metadata=metadata)


def _dtype(precision):
    """--precision -> the evaluation dtype; auto: bf16 on a bf16-capable GPU (as training samples there), else fp32."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _place(module, device, dtype):
    module = module.to(device) if dtype == torch.float32 else module.to(device, dtype)
    return module.eval().requires_grad_(False)


# a flow transformer's config keys that fix what it reads and writes (evaluate.check_model)
SHAPE_KEYS = (
    "in_channels",
    "out_channels",
    "sample_size",
    "patch_size",
    "joint_attention_dim",
    "pooled_projection_dim",
)


def check_model(name, path, base):
    """A finetuned policy fits the base's VAE and text encoder: a UNet by prdp_ds.models.check_parts, a flow
    transformer (the base's class) by having the base policy's shape keys (SHAPE_KEYS). ModelLoadError otherwise."""
    cls = type(base.unet)
    try:
        cfg = cls.load_config(path)
    except (OSError, ValueError) as err:
        msg = f"--model {name}: cannot read a diffusers {cls.__name__} config.json in {path}: {err}"
        raise ModelLoadError(msg) from err
    where = f"--model {name} ({path})"
    if not is_flow(base.scheduler):
        return check_parts(cfg, base.vae.config, base.text_encoder.config, where)
    want = {k: base.unet.config[k] for k in SHAPE_KEYS if base.unet.config.get(k) is not None}
    bad = [f"{k} {cfg.get(k)!r} (the base's {v!r})" for k, v in want.items() if cfg.get(k) != v]
    if bad:
        raise ModelLoadError(f"{where}: does not fit the base model {base.unet.__class__.__name__}: " + ", ".join(bad))


def load_unet(model, base_unet):
    """A --model's policy: the base's class from its folder (a flow transformer's runtime latent side copied from the
    base: FLUX's is the VAE's, not in its config), or the base with the LoRA adapters loaded."""
    name, kind, path = model
    if kind == "lora":
        from prdp_ds.lora import load_adapter  # LoRA runs only

        return load_adapter(copy.deepcopy(base_unet), path)
    try:
        unet = type(base_unet).from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"--model {name}: cannot load a diffusers {type(base_unet).__name__} (config.json + *.safetensors) from "
            f"{path}: {err}"
        ) from err
    if getattr(base_unet, "latent_side", None) is not None:
        unet.latent_side = base_unet.latent_side
    return unet


def run_unit(models, reward_fn, prompts, ids, args):
    """Sample prompts (global ids `ids`) x S images; -> {reward name: (P, S) fp64, 'grid': uint8 images}."""
    S, n = args.samples, len(prompts) * args.samples
    flat_prompts = [p for p in prompts for _ in range(S)]
    flat_seeds = image_seeds(args.seed, EVAL_EPOCH, ids, S).reshape(-1, 1)
    scores, grid = {}, []
    for lo in range(0, n, args.batch_size):
        batch = flat_prompts[lo : lo + args.batch_size]
        images = sample(
            models,
            batch,
            flat_seeds[lo : lo + len(batch)],
            args.num_steps,
            args.guidance_scale,
            args.eta,
            args.batch_size,
            with_reference=False,
            spacing=args.spacing,
            noise_level=args.noise_level,
            window=config_lib.sde_window(args),
        ).images[:, 0]
        total, parts = reward_fn(images, batch)
        for name, v in {"total": total, **parts}.items():
            scores.setdefault(name, []).append(v.double().cpu())
        keep = [
            j - lo for j in range(lo, lo + len(batch)) if ids[j // S] < args.grid_prompts and j % S < args.grid_samples
        ]
        grid.append((images[keep] * 255).round().to(torch.uint8).cpu())
    out = {name: torch.cat(v).reshape(len(prompts), S) for name, v in scores.items()}
    grid = torch.cat(grid)
    rows = sum(i < args.grid_prompts for i in ids)
    return {**out, "grid": grid.reshape(rows, min(S, args.grid_samples), *grid.shape[1:])}


def evaluate(
    args: argparse.Namespace,
    models_arg: list[tuple[str, str, str]],
    sets: dict[str, list[str]],
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """Collective, one call per rank: sample and score this rank's share of the pending units (model x
    prompt set x prompts), rank 0 saving each; then rank 0 writes eval.json, table.txt and the grids.

    models_arg: (name, kind, folder) per --model (`resolve_model`); sets: prompt set name -> prompts.
    A unit's scores are (P, S) per reward for its P prompts x S = args.samples images."""
    out = Path(args.output_dir)
    settings = make_settings(args, models_arg, sets)
    reward_fn = build_reward(args.reward, device)  # unknown rewards fail here, before any sampling
    units = [
        (m, s, lo, min(lo + args.prompts_per_unit, len(p)))
        for m in [("base", "base", "")] + models_arg
        for s, p in sets.items()
        for lo in range(0, len(p), args.prompts_per_unit)
    ]
    plan = [None]
    if rank == 0:
        try:
            check_settings(out / "partial" / "settings.json", settings)
            plan = [[u for u in units if not unit_file(out, u).is_file()]]
        except SettingsMismatch as err:
            plan = [str(err)]
    dist.broadcast_object_list(plan, src=0)
    if isinstance(plan[0], str):
        raise SettingsMismatch(plan[0])
    pending = plan[0]
    base = load_models(args.base, args.base_seed, reference=False)  # sampling needs no reference UNet
    dtype = _dtype(args.precision)
    for m in (base.unet, base.vae, base.text_encoder):
        _place(m, device, dtype)
    for name, kind, path in models_arg:  # every finetuned UNet fits the base's VAE and text encoder, before sampling
        if kind == "unet":
            check_model(name, path, base)
    base_unet, current = base.unet, None
    bar = tqdm(total=len(pending), desc="units", disable=rank != 0, dynamic_ncols=True)
    for start in range(0, len(pending), world):  # one round: a unit per rank, rank 0 saves them
        mine = pending[start + rank] if start + rank < len(pending) else None
        result, error = None, None
        try:
            if mine is not None:
                model, s, lo, hi = mine
                if model != current:
                    base.unet = base_unet if model[0] == "base" else _place(load_unet(model, base_unet), device, dtype)
                    current = model
                result = run_unit(base, reward_fn, sets[s][lo:hi], list(range(lo, hi)), args)
        except Exception as err:  # noqa: BLE001  every rank must learn of it, or the others wait forever
            error = err
        gathered = [None] * world
        dist.all_gather_object(gathered, (mine, result, error and f"{type(error).__name__}: {error}"))
        failed = [(r, msg) for r, (_, _, msg) in enumerate(gathered) if msg]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        for unit, res, _ in gathered if rank == 0 else []:
            if unit is not None:
                prompts = json.dumps(sets[unit[1]][unit[2] : unit[3]])
                tensors = {k: v.contiguous() for k, v in res.items()}
                _write(unit_file(out, unit), functools.partial(_save_tensors, tensors, {"prompts": prompts}))
                bar.update()
    bar.close()
    if rank == 0:
        summarize(out, settings, units, sets)
    dist.barrier()


def unit_file(out, unit):
    (name, _, _), prompt_set, lo, hi = unit
    return out / "partial" / name / prompt_set / f"{lo:06d}-{hi:06d}.safetensors"


def _stats(x):
    x = x.flatten()
    n = x.numel()
    std = float(x.std()) if n > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "se": std / math.sqrt(n), "n": n}


def summarize(out, settings, units, sets):
    """Read every unit of this run -> eval.json, table.txt (printed) and the grids."""
    scores, grids = {}, {}  # scores[model][prompt set][reward]: (P, S) per-image rewards in prompt order
    for unit in units:
        model, prompt_set = unit[0][0], unit[1]
        with safe_open(str(unit_file(out, unit)), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        grids.setdefault(prompt_set, {}).setdefault(model, []).append(tensors.pop("grid"))
        cell = scores.setdefault(model, {}).setdefault(prompt_set, {})
        for r, v in tensors.items():
            cell[r] = torch.cat([cell[r], v]) if r in cell else v
    results = {m: {s: {r: _stats(v) for r, v in cell.items()} for s, cell in row.items()} for m, row in scores.items()}
    # paired differences to base: every model saw the same prompts and seeds
    vs_base = {
        m: {s: {r: _stats(v - scores["base"][s][r]) for r, v in cell.items()} for s, cell in row.items()}
        for m, row in scores.items()
        if m != "base"
    }
    grid_files = {
        s: str(save_grid(out / "grids" / f"{s}.png", rows, sets[s]))
        for s, rows in grids.items()
        if any(g.numel() for g in rows["base"])
    }
    _write(
        out / "eval.json",
        lambda tmp: tmp.write_text(
            json.dumps({"settings": settings, "results": results, "vs_base": vs_base, "grids": grid_files}, indent=1)
        ),
    )
    text = format_tables(results)
    _write(out / "table.txt", lambda tmp: tmp.write_text(text))
    print(text, flush=True)


def format_tables(results):
    """One table per reward: models as rows, prompt sets as columns, cells 'mean ± se'."""
    models = list(results)
    sets = list(results[models[0]])
    blocks = []
    for reward in results[models[0]][sets[0]]:
        rows = [["model", *sets]] + [
            [m, *(f"{results[m][s][reward]['mean']:.4f} ± {results[m][s][reward]['se']:.4f}" for s in sets)]
            for m in models
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        blocks.append(f"reward: {reward}\n" + "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]))
    return "\n\n".join(blocks) + "\n"


def save_grid(path, rows, prompts):
    """rows: {model: [(p, s, 3, H, W) uint8 per unit]} -> a labelled PNG, one row of p x s images per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    images = torch.stack([torch.cat(v) for v in rows.values()])  # (M, P, S, 3, H, W)
    M, P, S, _, H, W = images.shape
    size = (GRID_TILE, round(W * GRID_TILE / H))
    tiles = torch.nn.functional.interpolate(
        images.flatten(0, 2).float() / 255, size=size, mode="bilinear", antialias=True
    ).clamp(0, 1)
    grid = make_grid(tiles, nrow=P * S, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100 + 1.5, grid.shape[0] / 100 + 0.8))
    ax.imshow(grid)
    ax.set_yticks([(m + 0.5) * (size[0] + 2) for m in range(M)], list(rows))
    ax.set_xticks([(p + 0.5) * S * (size[1] + 2) for p in range(P)], [prompts[p][:40] for p in range(P)], fontsize=8)
    for p in range(1, P):  # separate the prompts
        ax.axvline(p * S * (size[1] + 2), color="black", linewidth=1.5)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m prdp_ds.evaluate ARGV` (options: the module doc); a bad argument exits with one line."""
    try:
        args = parse_args(argv)
        models = [resolve_model(arg) for arg in args.model]
        if len({m[0] for m in models}) != len(models):
            raise ValueError(f"--model names must be unique, got {[m[0] for m in models]}")
        sets = load_prompt_sets(args)
    except (ValueError, ModelLoadError) as err:
        sys.exit(f"prdp_ds.evaluate: {err}")
    run_on_ranks("prdp_ds.evaluate", lambda rank, world, device: evaluate(args, models, sets, rank, world, device))


if __name__ == "__main__":
    main()
