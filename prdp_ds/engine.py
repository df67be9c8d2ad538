"""DeepSpeed setup: distributed init, the DeepSpeed config, and the engine around the policy UNet.

The training config owns batch sizes, accumulation, gradient clipping and the optimizer; they are
written into the DeepSpeed JSON, and a JSON that sets one of them to another value is an error.
Accumulation equals the number of pass-2 backward calls per optimizer step (docs/design.md §8): with
fewer accumulation steps than backward calls ZeRO-2 silently produces wrong gradients. Each backward
uses scale_wrt_gas=False, so the summed gradient is exactly that of the loss, and the sum is kept in
fp32 (data_types.grad_accum_dtype) and reduced across ranks in fp32 (communication_data_type). The
shipped configs use ZeRO-1, which reduces once per optimizer step, at the accumulation boundary;
ZeRO-2 and ZeRO-3 reduce on every backward call.
"""

import json
import math
import os
import socket
import sys
from pathlib import Path

import torch

from prdp_ds.config import trained_steps
from prdp_ds.prompts import rank_slice

OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)


def init_distributed():
    """Initialise torch.distributed through DeepSpeed (gloo on CPU). Returns (rank, world_size, device)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:  # plain `python -m prdp_ds.train`: a one-process group
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
        )
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    _unlink_shm_buffer(rank, world)
    return rank, world, torch.device("cpu")


def _unlink_shm_buffer(rank, world):
    """DeepSpeed's CPU backend, when every rank is on this machine (the launcher's LOCAL_SIZE equals the world size),
    creates a 66 MB shared-memory buffer per rank (/dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK) and never
    unlinks it: each run would leave its buffers in RAM until reboot. By the time init_distributed returns every rank
    has mapped every other's, so after a barrier each rank unlinks its own name; the mappings live on, and the memory
    is freed when the last rank exits, however it exits."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    if world > 1:
        torch.distributed.barrier()
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def run_on_ranks(prog, fn):
    """init_distributed, then fn(rank, world, device); a bad config, path, weight file, run directory or checkpoint
    (or a checkpoint write that failed) ends the process with one line naming the rank and the problem. A process
    group made here is torn down at the end; one the caller made is left to the caller."""
    from prdp_ds.checkpoint import CheckpointError
    from prdp_ds.models import ModelLoadError
    from prdp_ds.rundir import RunDirError

    owned = not torch.distributed.is_initialized()
    rank, world, device = init_distributed()
    try:
        return fn(rank, world, device)
    except (ValueError, FileNotFoundError, ModelLoadError, CheckpointError, RunDirError) as err:
        sys.exit(f"{prog} (rank {rank}): {err}")
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_arithmetic(cfg, world_size):
    """The per-rank and per-step sizes implied by the config (raises on an impossible split)."""
    t = cfg.train
    groups = len(rank_slice(t.prompts_per_epoch, 0, world_size))  # raises on an uneven split
    images = groups * t.images_per_prompt
    image_chunks = math.ceil(images / t.images_per_chunk)
    step_chunks = math.ceil(trained_steps(cfg) / t.steps_per_chunk)
    return dict(
        world_size=world_size,
        groups_per_rank=groups,
        images_per_rank=images,
        images_per_epoch=images * world_size,
        backward_calls_per_step=image_chunks * step_chunks,
        unet_cfg_rows_per_backward=2 * t.images_per_chunk * t.steps_per_chunk,
    )


def load_ds_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read DeepSpeed JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object")
    return data


def build_ds_config(ds_json, cfg, world_size, path="--config"):
    """The DeepSpeed config: the user's JSON plus the values the training config owns, fp32 gradient
    accumulation and reduction (forced), and DeepSpeed's throughput timer off unless the JSON sets `timers`."""
    arith = batch_arithmetic(cfg, world_size)
    gas = arith["backward_calls_per_step"]
    micro = cfg.train.images_per_chunk
    owned = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": cfg.train.grad_clip,
    }
    out = dict(ds_json)
    for key in OWNED:
        if key in ds_json and ds_json[key] != owned.get(key):
            where = {"optimizer": "train.lr / train.weight_decay / train.adam_*", "scheduler": "(constant lr)"}
            raise ValueError(
                f"{path}: {key!r} is owned by the training config "
                f"({where.get(key, 'derived from train.* and sampler.num_steps')}); "
                f"remove it from the JSON (it says {ds_json[key]!r}, the training config gives {owned.get(key)!r})"
            )
    out.update(owned)
    accum = out.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if accum != "fp32":  # pass 2 sums ~T x images/chunk backward calls: in bf16 that alone costs ~1%
        raise ValueError(
            f"{path}: data_types.grad_accum_dtype must be 'fp32' (the gradient is summed over every "
            f"pass-2 backward call), got {accum!r}"
        )
    comm = out.setdefault("communication_data_type", "fp32")
    if comm != "fp32":  # DeepSpeed's default under bf16 is bf16: ZeRO-1 would round the fp32 sum it reduces
        raise ValueError(
            f"{path}: communication_data_type must be 'fp32' (the gradient reduction carries the fp32 sum "
            f"over every pass-2 backward call), got {comm!r}"
        )
    out.setdefault("timers", {"throughput": {"enabled": False}})  # DeepSpeed's default synchronizes every step
    bf16 = out.get("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    out["bf16"] = {**out.get("bf16", {}), "enabled": bool(bf16)}
    zero = out.setdefault("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        out["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps the offloaded fp32 state
    out.setdefault("steps_per_print", 10**9)
    return out


def make_optimizer(params, cfg, on_cuda_device):
    t = cfg.train
    return torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        fused=on_cuda_device or None,
    )


def make_engine(unet, ds_config, optimizer):
    """Wrap the policy UNet in a DeepSpeed engine. A step whose gradient is non-finite is discarded:
    ZeRO-3 and ZeRO-1/2 do so when they compute the global norm (DeepSpeed's BF16 optimizer, ZeRO-1 with
    bf16, always does); forcing ZeRO-1/2's overflow check covers runs that compute none (train.grad_clip = 0).
    tests/test_twopass.py checks stages 1, 2 and 3."""
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(
        model=unet,
        optimizer=optimizer,
        config=ds_config,
        model_parameters=[p for p in unet.parameters() if p.requires_grad],
    )
    if hasattr(engine.optimizer, "check_grad_overflow"):  # ZeRO-1/2: off for fp32 by default
        engine.optimizer.check_grad_overflow = True
    return engine
