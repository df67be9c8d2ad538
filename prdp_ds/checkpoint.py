"""Checkpoints: complete or absent.

Layout: OUTPUT_DIR/checkpoints/epoch_XXXX[_stepK]/ holding
  engine/               DeepSpeed engine state of every rank (weights, optimizer, ZeRO partitions):
                        the full training state, with or without LoRA
  unet/                 full finetuning: the policy UNet in diffusers format (safetensors), loadable by
                        StableDiffusionPipeline.from_pretrained(..., unet=UNet2DConditionModel.from_pretrained(...));
                        with LoRA: only when output.save_merged_unet, the UNet with the adapters merged
                        (a plain UNet2DConditionModel, same loading)
  unet_lora/            with LoRA (model.lora_rank > 0): the adapter in diffusers' LoRA format
                        (pytorch_lora_weights.safetensors), loadable by pipe.load_lora_weights(unet_lora_dir)
                        or prdp_ds.lora.load_adapter
  config.yaml           the resolved training config
  trainer_state.json    epoch, optimizer steps taken within it, counters (written last)
  rollout_rankR.safetensors  only for a mid-epoch (SIGTERM) checkpoint: that rank's trajectories,
                        rewards and reward components
Everything is written under NAME.tmp and renamed when complete; checkpoints/latest names the
newest complete one. Directories ending in .tmp (a killed save) are ignored on resume.
"""
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from prdp_ds import config as config_lib
from prdp_ds.sampler import load_rollout, save_rollout


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(epoch, step_in_epoch, steps_per_epoch):
    return f"epoch_{epoch:04d}" if step_in_epoch >= steps_per_epoch else f"epoch_{epoch:04d}_step{step_in_epoch}"


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


def save_checkpoint(engine, cfg, output_dir, state, rank, rollout=None):
    """Collective: every rank calls it. state: JSON-able dict with 'epoch' and 'step_in_epoch'.
    rollout: (Trajectories, rewards (G, B), reward components) of this rank for a mid-epoch checkpoint."""
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
    """'latest' -> the newest complete checkpoint under OUTPUT_DIR (None if there is none);
    a path -> that checkpoint, which must be complete."""
    if resume != "latest":
        if not is_complete(resume):
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (needs trainer_state.json and engine/)")
        return Path(resume)
    root = Path(output_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and is_complete(root / pointer.read_text().strip()):
        return root / pointer.read_text().strip()
    complete = sorted(p for p in root.glob("epoch_*") if is_complete(p)) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(engine, path, rank, schedule, device):
    """Restore the engine; returns (trainer state, rollout or None) for this rank."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path / "engine"), tag="state")
    if load_path is None:
        raise FileNotFoundError(f"{path / 'engine'}: DeepSpeed found no engine state to load")
    state = json.loads((path / "trainer_state.json").read_text())
    rollout_file = path / f"rollout_rank{rank}.safetensors"
    if not rollout_file.is_file():
        return state, None
    return state, load_rollout(rollout_file, schedule, device)
