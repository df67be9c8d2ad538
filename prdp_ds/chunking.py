"""Pass-2 chunk sizes: `train.images_per_chunk` / `train.steps_per_chunk` = 'auto' (docs/configuration.md).

A chunk of a images x s steps is one UNet forward + backward on rows = 2 a s CFG rows. Its peak memory is
modelled as fixed + row_bytes x rows, the line through two measured probes of the policy UNet (1 and 4 images x
1 step, in the compute dtype), taken before the DeepSpeed engine is built: the chunk count is DeepSpeed's
gradient_accumulation_steps. 'auto' picks the chunk with the fewest backward calls per optimizer step whose peak
fits

    budget = free x (1 - train.memory_margin) - 16 B x trainable parameters - 4 B x images x (3T + 1) x latent size

(the engine's fp32 master weights, Adam m and v and fp32 gradient sum; the rollout's latents, eps_old and
eps_ref), ties going to more images per chunk. Sizes divide the rank's images and T as evenly as their chunk
count allows (a = ceil(n / ceil(n / a))). Every rank takes the most conservative measurement of all, so all
agree. On a CPU there is no device memory to fill: 'auto' is all of the rank's images and 1 step per chunk.
The chunking changes memory and speed, not the gradient (up to floating-point summation order).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from prdp_ds import config as config_lib
from prdp_ds.prompts import rank_slice
from prdp_ds.sampler import cfg_predict

if TYPE_CHECKING:
    from pathlib import Path

    from prdp_ds.config import Config
    from prdp_ds.models import Models

AUTO = "auto"
KEYS = ("images_per_chunk", "steps_per_chunk")
PROBE_IMAGES = (1, 4)  # images x 1 step per probe: 2 and 8 CFG rows
STATE_BYTES_PER_PARAM = 16  # fp32 master weight, Adam m and v, fp32 gradient sum
GIB = 2**30


def auto_keys(cfg: Config) -> list[str]:
    """The chunk keys set to 'auto', e.g. ['train.images_per_chunk']."""
    return [f"train.{k}" for k in KEYS if getattr(cfg.train, k) == AUTO]


def images_per_rank(cfg: Config, world: int) -> int:
    return len(rank_slice(cfg.train.prompts_per_epoch, 0, world)) * cfg.train.images_per_prompt


def with_chunks(cfg: Config, images: int, steps: int) -> Config:
    """A copy of cfg with these chunk sizes."""
    out = copy.deepcopy(cfg)
    out.train.images_per_chunk, out.train.steps_per_chunk = images, steps
    return out


def cpu_rule(cfg: Config, world: int) -> Config:
    """'auto' without device memory to fill: all of the rank's images, 1 step per chunk; ints are kept."""
    t = cfg.train
    images = images_per_rank(cfg, world) if t.images_per_chunk == AUTO else t.images_per_chunk
    return with_chunks(cfg, images, 1 if t.steps_per_chunk == AUTO else t.steps_per_chunk)


def _even_sizes(n):
    """Chunk sizes that split n as evenly as their count allows, largest first: ceil(n / c), c = 1 .. n."""
    return sorted({math.ceil(n / c) for c in range(1, n + 1)}, reverse=True)


def budget_bytes(free_bytes, margin, trainable_params, n_images, n_steps, latent_numel):
    """Device bytes a pass-2 chunk may take: free x (1 - margin) less the engine's optimizer state (16 B per
    trainable parameter) and the rollout's fp32 latents, eps_old and eps_ref (n_images x (3 n_steps + 1) latents)."""
    rollout = 4 * n_images * (3 * n_steps + 1) * latent_numel
    return free_bytes * (1 - margin) - STATE_BYTES_PER_PARAM * trainable_params - rollout


def fitting_chunk(n_images, n_steps, row_bytes, fixed_bytes, budget_bytes, images=None, steps=None):
    """The (images_per_chunk, steps_per_chunk) with the fewest backward calls ceil(n_images / a) ceil(n_steps / s)
    whose peak fixed_bytes + row_bytes x 2 a s is at most budget_bytes, ties going to the larger a; `images` or
    `steps` given fixes that size. Raises ValueError, naming the keys, when no chunk fits."""
    best = None
    for a in [images] if images else _even_sizes(n_images):
        for s in [steps] if steps else _even_sizes(n_steps):
            if fixed_bytes + row_bytes * 2 * a * s <= budget_bytes:
                rank = (math.ceil(n_images / a) * math.ceil(n_steps / s), -a)
                if best is None or rank < best[0]:
                    best = (rank, (a, s))
    if best is None:
        a, s = images or 1, steps or 1
        raise ValueError(
            f"train.images_per_chunk / train.steps_per_chunk = auto: the smallest chunk ({a} image(s) x {s} step(s)) "
            f"needs {(fixed_bytes + row_bytes * 2 * a * s) / GIB:.2f} GiB, the budget is {budget_bytes / GIB:.2f} GiB "
            "(free memory x (1 - train.memory_margin) - optimizer state - rollout)"
        )
    return best[1]


def measure_rows(unet, text, latent_shape, dtype, device, images=PROBE_IMAGES):
    """CUDA: peak bytes of one CFG forward + backward (sum of the outputs) of a copy of `unet` in `dtype` at each
    probe size -> (row_bytes, fixed_bytes), the line through the two (rows = 2 x images). text: (1, L, dim)."""
    probe = copy.deepcopy(unet).to(device=device, dtype=dtype)
    peaks = []
    for n in images:
        probe.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.randn((n, *latent_shape), device=device)
        t = torch.linspace(999, 1, n, device=device).long()
        emb = text.expand(n, -1, -1)
        eps_u, eps_c = cfg_predict(probe, x, t, emb, emb, guidance=1.0)
        (eps_u.float().sum() + eps_c.float().sum()).backward()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del x, t, eps_u, eps_c
    del probe
    torch.cuda.empty_cache()
    rows = [2 * n for n in images]
    row_bytes = max((peaks[1] - peaks[0]) / (rows[1] - rows[0]), 1.0)
    return row_bytes, max(peaks[0] - row_bytes * rows[0], 0.0)


def saved_chunks(checkpoint: Path) -> tuple[int, int]:
    """The chunk sizes a checkpoint's run used (its config.yaml holds them resolved)."""
    train = config_lib.load_yaml(checkpoint / "config.yaml")["train"]
    return train["images_per_chunk"], train["steps_per_chunk"]


def resolve(cfg: Config, world: int, device: torch.device, models: Models, dtype: torch.dtype, checkpoint=None):
    """cfg with 'auto' chunk sizes replaced by ints -> (Config, the line saying what was chosen or None).

    checkpoint: a checkpoint being resumed; its sizes are taken for the 'auto' keys, so a resume repeats the
    run's chunking. Otherwise CUDA measures (module doc) and other devices take cpu_rule. Collective on CUDA."""
    keys = auto_keys(cfg)
    if not keys:
        return cfg, None
    t = cfg.train
    explicit = [None if getattr(t, k) == AUTO else getattr(t, k) for k in KEYS]
    if checkpoint is not None:
        out = with_chunks(cfg, *[e or s for e, s in zip(explicit, saved_chunks(checkpoint))])
        how = f"as in {checkpoint}"
    elif device.type != "cuda":
        out, how = cpu_rule(cfg, world), "no device memory to fill: all of the rank's images x 1 step"
    else:
        latent_shape = models.latent_shape
        row, fixed = measure_rows(models.unet, models.encode_prompts([""]), latent_shape, dtype, device)
        n, T = images_per_rank(cfg, world), config_lib.recorded_steps(cfg)
        trainable = sum(p.numel() for p in models.unet.parameters() if p.requires_grad)
        free, _ = torch.cuda.mem_get_info(device)
        budget = budget_bytes(free, t.memory_margin, trainable, n, T, math.prod(latent_shape))
        worst = torch.tensor([row, fixed, -budget], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        row, fixed, budget = worst[0].item(), worst[1].item(), -worst[2].item()
        out = with_chunks(cfg, *fitting_chunk(n, T, row, fixed, budget, *explicit))
        how = (
            f"measured {row / 2**20:.1f} MiB per CFG row + {fixed / GIB:.2f} GiB; budget {budget / GIB:.1f} GiB "
            f"of {free / GIB:.1f} GiB free, train.memory_margin={t.memory_margin}"
        )
    chosen = ", ".join(f"{k}=auto -> {getattr(out.train, k.split('.')[1])}" for k in keys)
    return out, f"chunk sizes: {chosen} ({how})"
