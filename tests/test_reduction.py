"""Gradient collectives per optimizer step (docs/design.md §8): at ZeRO-1 DeepSpeed reduces once, at the
accumulation boundary, however many pass-2 backward calls the step makes, and the gradient it hands the optimizer
equals ZeRO-2's per-backward reduction."""

import copy
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, B, G, RecordingSGD, T, W, _cfg, _port, _rel

from prdp_ds.engine import load_ds_json

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "inference_all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_fn",
    "all_gather",
    "all_gather_into_tensor",
    "allgather_fn",
    "all_gather_coalesced",
    "broadcast",
    "all_to_all_single",
)
CHUNKS = {2: (3, 4), 8: (3, 1)}  # chunk count -> (images_per_chunk, steps_per_chunk) for 6 images x T = 4 steps


@contextmanager
def counting_collectives():
    """Counts calls of torch.distributed's and deepspeed.comm's collectives ('torch.NAME', 'ds.NAME'). A
    deepspeed.comm all_reduce or broadcast shows up again as the torch.distributed call it makes; its
    all_gather_into_tensor and reduce_scatter_tensor do not (DeepSpeed's backend holds its own references)."""
    import deepspeed.comm as dscomm
    import torch.distributed as tdist

    counts, saved = Counter(), []
    for prefix, module in (("torch", tdist), ("ds", dscomm)):
        for name in COLLECTIVES:
            real = getattr(module, name, None)
            if real is None:
                continue
            saved.append((module, name, real))

            def wrapped(*args, _real=real, _key=f"{prefix}.{name}", **kwargs):
                counts[_key] += 1
                return _real(*args, **kwargs)

            setattr(module, name, wrapped)
    try:
        yield counts
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def one_step(models, traj, rewards, ds_json, cfg, world):
    """A fresh engine around a copy of the policy, one prdp_step (first step: pass 2 and the optimizer step only)
    -> (the gradient handed to the optimizer, collective counts during the step)."""
    from prdp_ds.engine import build_ds_config, make_engine
    from prdp_ds.twopass import prdp_step

    unet = copy.deepcopy(models.unet)
    opt = RecordingSGD(unet.parameters(), 1e-4)
    engine = make_engine(unet, build_ds_config(ds_json, cfg, world), opt)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    with counting_collectives() as counts:
        stats = prdp_step(engine, traj, rewards, cond, uncond, cfg, "torch", first_step=True)
    assert "skipped" not in stats and len(opt.seen) == 1, stats
    return opt.seen[0], dict(counts)


def ds_json(name, stage, bf16):
    """The shipped ds_configs/NAME.json at ZeRO stage `stage`, bf16 on or off, with the recording optimizer."""
    ds = load_ds_json(REPO / "ds_configs" / f"{name}.json")
    ds["zero_optimization"]["stage"] = stage
    return {**ds, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}}


def run_cases(rank, world, cases):
    """On this rank: for each (config name, stage, bf16, chunks) one step on the tiny rollout (rank-dependent rewards)
    -> [(case, gradient, counts)]."""
    from prdp_ds.models import build_tiny
    from prdp_ds.sampler import image_seeds, sample

    models = build_tiny(0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    traj = sample(models, ["a cat", "a red fox"], image_seeds(0, rank, [0, 1], B), T, W)
    rewards = torch.rand(G, B, generator=torch.Generator().manual_seed(10 + rank))
    out = []
    for name, stage, bf16, n in cases:
        cfg = _cfg(CHUNKS[n][1], CHUNKS[n][0], clip_range=2e-3)
        cfg.train.prompts_per_epoch = G * world
        grad, counts = one_step(models, traj, rewards, ds_json(name, stage, bf16), cfg, world)
        out.append(((name, stage, bf16, n), grad.float(), counts))
    return out


def _worker(rank, world, port, cases, path):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from prdp_ds.engine import init_distributed

    init_distributed()
    results = run_cases(rank, world, cases)
    if rank == 0:
        torch.save(results, path)
    torch.distributed.destroy_process_group()


def on_two_ranks(cases, tmp_path):
    path = tmp_path / "results.pt"
    mp.spawn(_worker, args=(2, _port(), cases, str(path)), nprocs=2, join=True)
    return {case: (grad, counts) for case, grad, counts in torch.load(path)}


def total(counts):
    return sum(counts.values())


def test_zero1_reduces_once_per_step_whatever_the_chunk_count(tmp_path):
    """2 ranks, the shipped ZeRO-1 configs in fp32 and bf16 and with optimizer offload: the collectives of one
    step are the same at 2 and 8 pass-2 backward calls, while ZeRO-2's grow with every backward call (the counter
    sees them). ZeRO-1's gradient equals ZeRO-2's per-backward reduction."""
    zero1 = [(name, 1, bf16) for name, bf16 in (("zero2", False), ("zero2", True), ("zero2_offload", False))]
    cases = [(*c, n) for c in zero1 for n in (2, 8)] + [("zero2", 2, bf16, n) for bf16 in (False, True) for n in (2, 8)]
    res = on_two_ranks(cases, tmp_path)
    for c in zero1:
        assert res[(*c, 2)][1] == res[(*c, 8)][1], (c, res[(*c, 2)][1], res[(*c, 8)][1])
    for bf16 in (False, True):
        assert total(res[("zero2", 2, bf16, 8)][1]) > total(res[("zero2", 2, bf16, 2)][1]), res
    # fp32: both sum the same fp32 chunk gradients; ZeRO-2 averages each chunk over the ranks and sums, ZeRO-1
    # sums locally and averages once: the same sum in another order, equal up to fp32 rounding
    for n in (2, 8):
        assert _rel(res[("zero2", 1, False, n)][0], res[("zero2", 2, False, n)][0]) < 1e-6
        assert _rel(res[("zero2_offload", 1, False, n)][0], res[("zero2", 2, False, n)][0]) < 1e-6
    # other chunks, the same sum: the UNet's batches differ and round differently (test_twopass's full-graph bound)
    assert _rel(res[("zero2", 1, False, 2)][0], res[("zero2", 1, False, 8)][0]) < 1e-4
    # bf16 (fp32 reduction, forced by build_ds_config): ZeRO-1 is DeepSpeed's BF16 optimizer, which adds the bf16
    # chunk gradients into fp32 and averages the fp32 sums; ZeRO-2 averages each chunk in fp32 and adds: fp32 rounding
    for n in (2, 8):
        assert _rel(res[("zero2", 1, True, n)][0], res[("zero2", 2, True, n)][0]) < 1e-6


@pytest.mark.parametrize("bf16", [False, True])
def test_zero1_gradient_equals_per_backward_reduction_on_one_rank(rollout, bf16):
    """1 rank: ZeRO-1 (one reduction at the boundary) hands the optimizer bit for bit ZeRO-2's gradient
    (a reduction per backward call): with one rank the reduction is the identity and both add the same
    chunk gradients into an fp32 sum in the same order."""
    models, traj, rewards = rollout
    cfg = _cfg(1, 3, clip_range=2e-3)  # 8 backward calls
    got, _ = one_step(models, traj, rewards, ds_json("zero2", 1, bf16), cfg, 1)
    want, _ = one_step(models, traj, rewards, ds_json("zero2", 2, bf16), cfg, 1)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


if __name__ == "__main__":  # measurement: python tests/test_reduction.py OUT.json (numbers in docs/design.md §8)
    import pathlib
    import tempfile

    cases = [("zero2", s, bf, n) for s in (1, 2) for bf in (False, True) for n in (2, 8)]
    cases += [("zero2_offload", 1, False, n) for n in (2, 8)] + [
        ("zero3", 3, bf, n) for bf in (False, True) for n in (2, 8)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        res = on_two_ranks(cases, pathlib.Path(tmp))
    table = {f"{c[0]} at ZeRO-{c[1]} {'bf16' if c[2] else 'fp32'} {c[3]} chunks": res[c][1] for c in cases}
    table["grad rel. diff. ZeRO-1 vs ZeRO-2"] = {
        f"{'bf16' if bf else 'fp32'} {n} chunks": _rel(res[("zero2", 1, bf, n)][0], res[("zero2", 2, bf, n)][0])
        for bf in (False, True)
        for n in (2, 8)
    }
    pathlib.Path(sys.argv[1]).write_text(json.dumps(table, indent=1, sort_keys=True))
