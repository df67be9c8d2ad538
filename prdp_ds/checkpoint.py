"""Checkpoints: complete or absent.

OUTPUT_DIR/checkpoints/epoch_XXXX[_stepK]/ holds engine/ (every rank's DeepSpeed state: the full training
state, with or without LoRA), unet/ (the policy UNet in diffusers format; with LoRA only when
output.save_merged_unet, adapters merged), unet_lora/ (with LoRA: the adapter in diffusers' LoRA format),
config.yaml, trainer_state.json (written last) and, only in a mid-epoch (SIGTERM) checkpoint,
rollout_rankR.safetensors (that rank's trajectories and rewards). Everything is written under NAME.tmp and
renamed when complete; checkpoints/latest names the newest complete one; *.tmp directories (a killed save)
are ignored on resume. Loading the saved UNet or adapter elsewhere: docs/outputs.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from prdp_ds import config as config_lib
from prdp_ds.sampler import load_rollout, save_rollout

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine

    from prdp_ds.sampler import StepSchedule, Trajectories

    # (trajectories, rewards (G, B), reward components {name: (G * B,)}) of one rank
    Rollout = tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]


_NAME = re.compile(r"epoch_(\d+)(?:_step(\d+))?")  # checkpoint_name's output


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(epoch, step_in_epoch, steps_per_epoch):
    return f"epoch_{epoch:04d}" if step_in_epoch >= steps_per_epoch else f"epoch_{epoch:04d}_step{step_in_epoch}"


def checkpoint_position(name):
    """A checkpoint_name -> (epoch, steps done in it) to order checkpoints by, numerically; a complete epoch
    (epoch_E) after its mid-epoch checkpoints (epoch_E_stepK). None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    epoch, step = match.groups()
    return int(epoch), math.inf if step is None else int(step)


def save_unet(unet, directory, save_merged_unet=False):
    """The policy in user-facing formats under `directory`: unet/ (full finetuning), or unet_lora/ and,
    if save_merged_unet, unet/ merged (LoRA). Needs the full parameters (gathered under ZeRO-3)."""
    from prdp_ds.lora import has_lora, merged_unet, save_adapter

    directory = Path(directory)
    if not has_lora(unet):
        unet.save_pretrained(str(directory / "unet"), safe_serialization=True)
        return
    save_adapter(unet, directory / "unet_lora")
    if save_merged_unet:
        merged_unet(unet).save_pretrained(str(directory / "unet"), safe_serialization=True)


def save_checkpoint(
    engine: DeepSpeedEngine,
    cfg: config_lib.Config,
    output_dir: str | os.PathLike,
    state: dict[str, Any],
    rank: int,
    rollout: Rollout | None = None,
) -> Path:
    """Collective: every rank calls it. state: JSON-able dict with 'epoch' and 'step_in_epoch'.
    rollout: (Trajectories, rewards (G, B), reward components) of this rank for a mid-epoch checkpoint.
    Returns the checkpoint folder."""
    import deepspeed

    root = Path(output_dir) / "checkpoints"
    name = checkpoint_name(state["epoch"], state["step_in_epoch"], cfg.train.steps_per_epoch)
    tmp, final = root / f"{name}.tmp", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / "engine"), tag="state")
    if rollout is not None:
        save_rollout(tmp / f"rollout_rank{rank}.safetensors", *rollout)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:
            save_unet(engine.module, tmp, cfg.output.save_merged_unet)
    _barrier()
    if rank == 0:
        (tmp / "config.yaml").write_text(config_lib.dump(cfg))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
    _barrier()
    return final


def is_complete(path):
    path = Path(path)
    return not path.name.endswith(".tmp") and (path / "trainer_state.json").is_file() and (path / "engine").is_dir()


def find_checkpoint(output_dir, resume):
    """'latest' -> the newest complete checkpoint under OUTPUT_DIR (None if there is none): the one
    checkpoints/latest names, or without a valid pointer the last by checkpoint_position;
    a path -> that checkpoint, which must be complete."""
    if resume != "latest":
        if not is_complete(resume):
            raise FileNotFoundError(
                f"--resume {resume}: not a complete checkpoint (needs trainer_state.json and engine/)"
            )
        return Path(resume)
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and is_complete(root / pointer.read_text().strip()):
        return root / pointer.read_text().strip()
    complete = [p for p in root.glob("epoch_*") if checkpoint_position(p.name) is not None and is_complete(p)]
    return max(complete, key=lambda p: checkpoint_position(p.name), default=None)


def load_checkpoint(
    engine: DeepSpeedEngine, path: str | os.PathLike, rank: int, schedule: StepSchedule, device: torch.device | str
) -> tuple[dict[str, Any], Rollout | None]:
    """Restore the engine; returns (trainer state, rollout or None) for this rank, the rollout as
    save_checkpoint takes it: (Trajectories, rewards (G, B), reward components {name: (G * B,)})."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path / "engine"), tag="state")
    if load_path is None:
        raise FileNotFoundError(f"{path / 'engine'}: DeepSpeed found no engine state to load")
    state = json.loads((path / "trainer_state.json").read_text())
    rollout_file = path / f"rollout_rank{rank}.safetensors"
    if not rollout_file.is_file():
        return state, None
    return state, load_rollout(rollout_file, schedule, device)
