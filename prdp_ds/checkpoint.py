"""Checkpoints: complete or absent.

OUTPUT_DIR/checkpoints/epoch_XXXX[_stepK]/ holds engine/ (every rank's DeepSpeed state: the full training
state, with or without LoRA), unet/ (the policy UNet in diffusers format; with LoRA only when
output.save_merged_unet, adapters merged), unet_lora/ (with LoRA: the adapter in diffusers' LoRA format),
config.yaml, trainer_state.json (written last) and, only in a mid-epoch (SIGTERM) checkpoint,
rollout_rankR.safetensors (that rank's trajectories and rewards). Everything is written under NAME.tmp and
renamed when complete; checkpoints/latest names the newest complete one; *.tmp directories (a killed save)
are ignored on resume. A mid-epoch checkpoint also holds epoch_rankR.json: that rank's statistics of the epoch's
steps so far, so the resumed epoch logs one complete metrics row. A DPOK run's checkpoints hold aux_state.pt: its
value function and that network's optimizer.

A write that fails (disk full, quota, an unwritable folder) raises CheckpointError on every rank, naming the
checkpoint and the cause, after removing the partial NAME.tmp: the previous checkpoint and `latest` are untouched.
Loading executes no code from the checkpoint: DeepSpeed's engine state goes through torch.load(weights_only=True)
with the few DeepSpeed types it holds allowlisted (WeightsOnlyLoads); anything else in it is refused
(UnsafeCheckpointError). The other files are safetensors, JSON and YAML.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from prdp_ds import config as config_lib
from prdp_ds.sampler import load_rollout, save_rollout

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from prdp_ds.sampler import StepSchedule, Trajectories

    # (trajectories, rewards (G, B), reward components {name: (G * B,)}) of one rank
    Rollout = tuple[Trajectories, torch.Tensor, dict[str, torch.Tensor]]


_NAME = re.compile(r"epoch_(\d+)(?:_step(\d+))?")  # checkpoint_name's output
AUX_STATE = "aux_state.pt"  # save_checkpoint's aux_state (DPOK's value function), loaded by load_aux_state


class CheckpointError(Exception):
    """A checkpoint cannot be written or read: the message names it and the cause."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than tensors and the allowlisted types: it is not loaded."""


def _failed_anywhere(error):
    """Collective (a barrier too): whether `error` (this rank's, or None) or another rank's is set."""
    flag = torch.tensor([float(error is not None)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def _cause(error, where):
    """One line saying why a write failed: the OS's reason, or the library's first line and the space left."""
    if error is None:
        return "another rank's write failed"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return first
    return f"{first} ({free / 2**20:.1f} MiB left on that filesystem{': it is full' if free < 2**20 else ''})"


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
    epoch_so_far: dict[str, Any] | None = None,
    aux_state: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. state: JSON-able dict with 'epoch' and 'step_in_epoch'.
    rollout: (Trajectories, rewards (G, B), reward components) of this rank for a mid-epoch checkpoint;
    epoch_so_far: this rank's JSON-able statistics of the epoch's steps so far (mid-epoch); aux_state: state
    dicts the same on every rank (DPOK's value function and optimizer), written by rank 0 (load_aux_state).
    Returns the checkpoint folder; CheckpointError on every rank if any rank's write failed."""
    import deepspeed

    root = Path(output_dir) / "checkpoints"
    name = checkpoint_name(state["epoch"], state["step_in_epoch"], cfg.train.steps_per_epoch)
    tmp, final = root / f"{name}.tmp", root / name

    def start():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_state():
        engine.save_checkpoint(str(tmp / "engine"), tag="state")
        if rollout is not None:
            save_rollout(tmp / f"rollout_rank{rank}.safetensors", *rollout)
        if epoch_so_far is not None:
            (tmp / f"epoch_rank{rank}.json").write_text(json.dumps(epoch_so_far))
        if aux_state is not None and rank == 0:
            torch.save(aux_state, tmp / AUX_STATE)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                save_unet(engine.module, tmp, cfg.output.save_merged_unet)

    def commit():  # trainer_state.json last, then one rename: a checkpoint is complete or absent
        if rank == 0:
            (tmp / "config.yaml").write_text(config_lib.dump(cfg))
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = root / "latest.tmp"
            latest_tmp.write_text(name)
            os.replace(latest_tmp, root / "latest")

    for write in (start, write_state, commit):
        error = None
        try:
            write()
        except Exception as err:  # disk full, quota, permissions: torch, safetensors and the OS each say it their way
            error = err
        if _failed_anywhere(error):  # also the barrier between the phases
            cause = _cause(error, root)  # before the partial goes: the free space the write met
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = (root / "latest").read_text().strip() if (root / "latest").is_file() else "no earlier checkpoint"
            raise CheckpointError(
                f"cannot write checkpoint {final}: {cause}; the partial {tmp.name} was removed and "
                f"{kept} is intact: make room (or fix the folder) and run again with --resume"
            ) from error
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


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose loads execute no code: torch.load(weights_only=True), with the DeepSpeed
    types its engine state holds allowlisted (the ZeRO optimizer's loss scaler, stage enum and fragment addresses).
    Everything else is the wrapped engine's (saving included)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @staticmethod
    def allowed():
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(self, path, map_location=None):
        return _load_weights_only(path, map_location, self.allowed())


def _load_weights_only(path, map_location, allowed=()):
    """torch.load(weights_only=True) with `allowed` types allowlisted, or UnsafeCheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]  # torch's 2nd paragraph names the type
        reason = lines[1] if len(lines) > 1 else (lines or ["?"])[0]
        raise UnsafeCheckpointError(
            f"{path}: refused: it holds more than tensors and the allowlisted types, and loading it "
            f"could run code from it ({reason}). Resume only from checkpoints this trainer wrote"
        ) from None


def load_aux_state(path: str | os.PathLike, device: torch.device | str) -> dict[str, Any]:
    """The trainer's state beside the engine that save_checkpoint's aux_state wrote (DPOK's value function and its
    optimizer), loaded as weights only."""
    f = Path(path) / AUX_STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; the run's algorithm keeps state there (checkpoint written by another?)")
    return _load_weights_only(f, device)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read it as JSON: {err}") from None


def load_checkpoint(
    engine: DeepSpeedEngine, path: str | os.PathLike, rank: int, schedule: StepSchedule, device: torch.device | str
) -> tuple[dict[str, Any], Rollout | None, dict[str, Any] | None]:
    """Restore the engine (executing no code from the files) -> (trainer state, rollout or None, epoch so far or
    None) for this rank: the rollout as save_checkpoint takes it, (Trajectories, rewards (G, B), reward components
    {name: (G * B,)}); the epoch so far as its epoch_so_far (both only in a mid-epoch checkpoint)."""
    path = Path(path)
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    state = _read_json(path / "trainer_state.json")
    load_path, _ = engine.load_checkpoint(str(path / "engine"), tag="state")
    if load_path is None:
        raise FileNotFoundError(f"{path / 'engine'}: DeepSpeed found no engine state to load")
    so_far_file = path / f"epoch_rank{rank}.json"
    so_far = _read_json(so_far_file) if so_far_file.is_file() else None
    rollout_file = path / f"rollout_rank{rank}.safetensors"
    if not rollout_file.is_file():
        return state, None, so_far
    return state, load_rollout(rollout_file, schedule, device), so_far
