"""Time one PRDP optimizer step of the real trainer code, phase by phase (docs/design.md §7;
yardsticks: benchmarks/README.md). Whole epochs, levers and precisions: benchmarks/epoch.py, which
uses this module's SD1.4 models, FLOP count and timers.

Everything timed is the trainer's own code on a DeepSpeed ZeRO-2 engine (prdp_ds.engine): one
rollout by prdp_ds.sampler.sample (policy = the engine, frozen reference UNet beside it), then per
method one optimizer step on that rollout. Rewards are random (no reward model is timed), prompts
are G animals. UNet: `tiny` (prdp_ds.models.build_tiny, the CPU default) or `sd14` (the SD v1.4
UNet2DConditionModel config below, 860M parameters, random weights; random (n, 77, 768) text
embeddings stand in for CLIP and decoding is skipped). GPU: DeepSpeed bf16, reference in bf16.
CPU: fp32, Triton under TRITON_INTERPRET=1.

Phases (wall clock, torch.cuda.synchronize around each; the reference UNet's forward is wrapped by
a synchronizing timer, so `sample` = sample() minus the reference calls):
  sample      policy CFG forwards + per-step bookkeeping (+ tiny VAE decode on tiny)
  reference   the frozen reference UNet's CFG forwards at the same x_t
  pass1       prdp_ds.twopass.policy_log_ratios (no grad)
  step first  prdp_step(first_step=True): loss + pass 2 (fwd+bwd per chunk) + optimizer step
  step later  prdp_step(first_step=False): the same plus pass 1 (later steps of an epoch, K > 1)
  optimizer   the DeepSpeed optimizer's step() alone (inside both steps above)
  epoch K=1   sample + reference + step first: the per-image yardstick of benchmarks/README.md (no reward model)
Methods: `twopass-torch` / `twopass-triton` (loss.impl torch / triton), and `naive`: one autograd
graph through all T UNet calls of all images (r(theta) per step by chunk_log_ratios with grad,
prdp_ds.loss.rdp_loss, one backward) on an engine with one accumulation step; on GPU it tries T
in a descending list and reports the largest that fits (OOM rows say which did not).

FLOPs: counted once with FlopCounterMode on one CFG forward (a batch of 2: one image's uncond and
cond rows) in the run's dtype, F; the UNet is per-sample so cost is linear in images. Per image:
sample T*F, reference T*F, pass 1 T*F, pass 2 3*T*F (forward + backward ~ 2x forward).
MFU = counted FLOPs / (seconds x --peak-tflops) (default 790, the measured bf16 peak in benchmarks/README.md).
Peak memory: torch.cuda.max_memory_allocated, reset per phase (sample and reference interleave: one
peak for both); on CPU the process's max RSS so far. Each measurement runs --repeats times (default
2: the first warms up kernels and allocators); the last one is reported.
On CPU the timings mean little (2 cores, interpreted Triton); it checks that the wiring runs.

  python benchmarks/train_step.py [--unet tiny|sd14] [--T 50] [--groups 2] [--images 4]
      [--images-per-chunk 4] [--steps-per-chunk 1] [--methods naive,torch,triton] [--json PATH]
  deepspeed --num_gpus N benchmarks/train_step.py ...   (per-rank timings; rank 0 reports)
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before kernels / prdp_ds are imported (docs/design.md §11)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402

from prdp_ds.config import Config  # noqa: E402
from prdp_ds.engine import build_ds_config, init_distributed, make_engine, make_optimizer  # noqa: E402
from prdp_ds.loss import rdp_loss  # noqa: E402
from prdp_ds.models import Models, OpenClipTokenizer, build_tiny, make_scheduler  # noqa: E402
from prdp_ds.prompts import ANIMALS  # noqa: E402
from prdp_ds.sampler import cfg_predict, image_seeds, sample  # noqa: E402
from prdp_ds.twopass import chunk_log_ratios, policy_log_ratios, prdp_step  # noqa: E402

SD14_UNET = dict(  # CompVis/stable-diffusion-v1-4 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
SD14_TEXT = (77, 768)
FLOP_MULT = {
    "sample": 1,
    "reference": 1,
    "pass1": 1,
    "step first": 3,
    "step later": 4,
    "optimizer": 0,
    "epoch K=1": 5,
    "naive step": 3,
}  # x T x F x images


class RandomTextModels(Models):
    """SD1.4 UNets with random text embeddings and no VAE (timing only): decoding is replaced by
    sigmoid of the first 3 latent channels, (n, 4, 64, 64) -> (n, 3, 64, 64) in [0, 1], so that a
    weight-free reward (brightness) still differs between images."""

    def encode_prompts(self, prompts):
        gen = torch.Generator().manual_seed(len(prompts))
        return torch.randn((len(prompts), *SD14_TEXT), generator=gen).to(next(self.ref_unet.parameters()).device)

    def decode(self, latents):
        return torch.sigmoid(latents[:, :3].float())


def new_policy(kind, device):
    if kind == "tiny":
        return build_tiny(0).unet.to(device)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        return UNet2DConditionModel(**SD14_UNET)


def build_models(kind, device, frozen=torch.bfloat16 if CUDA else None):
    """Policy and reference UNets of `kind` on `device`, the reference cast to `frozen` (None: fp32)."""
    if kind == "tiny":
        return build_tiny(0).to(device, frozen_dtype=frozen)
    unet = new_policy(kind, device)
    ref = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=frozen or torch.float32)
    return RandomTextModels(unet, ref, None, None, OpenClipTokenizer(SD14_TEXT[0]), make_scheduler())


def new_engine(policy, cfg, world, device):
    ds = build_ds_config({"zero_optimization": {"stage": 2}}, cfg, world)
    return make_engine(policy, ds, make_optimizer(policy.parameters(), cfg, device.type == "cuda"))


def drop_engine(engine):
    engine.destroy()
    del engine
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def sync():
    torch.cuda.synchronize() if CUDA else None


def peak_mb():
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def measure(out):
    """Fills out['s'] (seconds) and out['mb'] (peak memory of this phase)."""
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield out
    sync()
    out.update(s=time.perf_counter() - t0, mb=peak_mb())


def add_timer(obj, name, acc):
    """Wrap obj.<name> (a module's forward, an optimizer's step) so acc['s'] sums its synced time."""
    orig = getattr(obj, name)

    def timed(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        sync()
        acc["s"] += time.perf_counter() - t0
        return out

    setattr(obj, name, timed)


def cfg_flops(unet, models, device):
    """FLOPs of one CFG forward (batch 2: uncond + cond of one image) in the UNet's dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    c = unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cfg_predict(unet, x, torch.tensor(500), models.encode_prompts(["a cat"]), models.encode_prompts([""]))
    return counter.get_total_flops()


def naive_step(engine, traj, rewards, cond, uncond, cfg, T):
    """Full-graph backprop over the first T steps: all r(theta) with grad, one loss, one backward."""
    G, B, _ = traj.log_ratio_old.shape
    n = G * B
    r = torch.cat(
        [chunk_log_ratios(engine, traj, cond, uncond, slice(0, n), slice(k, k + 1), cfg, "torch") for k in range(T)],
        dim=1,
    ).reshape(G, B, T)
    loss = rdp_loss(
        r, traj.log_ratio_old[:, :, :T].contiguous(), rewards, cfg.loss.clip_range, cfg.loss.kl_weight, "torch"
    )
    engine.backward(loss)
    engine.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=("tiny", "sd14"), default="sd14" if CUDA else "tiny")
    ap.add_argument("--T", type=int, default=50 if CUDA else 4, help="denoising steps")
    ap.add_argument("--groups", type=int, default=2, help="G: prompt groups per rank")
    ap.add_argument("--images", type=int, default=4, help="B: images per group")
    ap.add_argument("--images-per-chunk", type=int, default=4)
    ap.add_argument("--steps-per-chunk", type=int, default=1)
    ap.add_argument("--sample-batch", type=int, default=16, help="images per sampling UNet call")
    ap.add_argument("--methods", default="naive,torch,triton", help="subset of naive,torch,triton")
    ap.add_argument(
        "--naive-T",
        default="50,40,32,24,16,12,8,6,4,3,2,1",
        help="GPU: T values tried (descending, <= --T) for the naive method",
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the last counts (warm)")
    ap.add_argument("--peak-tflops", type=float, default=790.0 if CUDA else None)
    ap.add_argument("--json", help="write rows, device, date, command and versions here")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rank, world, device = init_distributed()
    import deepspeed

    deepspeed.utils.logger.setLevel("WARNING")
    say = print if rank == 0 else (lambda *a, **k: None)
    dev_name = (
        torch.cuda.get_device_name()
        if CUDA
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), TRITON_INTERPRET=1"
    )
    if not CUDA:
        say(
            "=" * 96 + "\nNO GPU: fp32, tiny sizes, Triton interpreted. TIMINGS HERE MEAN LITTLE; this run checks\n"
            "that the benchmark drives the real trainer code. Run on a GPU (--unet sd14) for real numbers.\n" + "=" * 96
        )
    G, B, T, n = args.groups, args.images, args.T, args.groups * args.images
    cfg = Config()
    cfg.sampler.num_steps, cfg.sampler.batch_size = T, args.sample_batch
    cfg.train.prompts_per_epoch, cfg.train.images_per_prompt = G * world, B
    cfg.train.images_per_chunk, cfg.train.steps_per_chunk = args.images_per_chunk, args.steps_per_chunk
    models = build_models(args.unet, device)
    engine = new_engine(models.unet, cfg, world, device)
    models.unet = engine  # the policy is called through the engine, as in prdp_ds.train.Trainer
    F = cfg_flops(engine.module, models, device)
    n_params = sum(p.numel() for p in engine.module.parameters())
    gas = engine.gradient_accumulation_steps()
    say(
        f"device: {dev_name}; unet {args.unet} ({n_params / 1e6:.1f}M params, "
        f"{next(engine.module.parameters()).dtype}); CFG forward per image {F / 1e9:.3f} GFLOP; "
        f"G={G} B={B} T={T} per rank, world {world}; chunks {args.images_per_chunk} images x "
        f"{args.steps_per_chunk} steps ({gas} backward calls per step)"
    )

    rows = []

    def write_json():  # after every row: a run stopped at a time limit keeps what it measured
        if not (args.json and rank == 0):
            return
        out = dict(
            device=dev_name,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
            env={
                k: os.environ[k]
                for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if k in os.environ
            },
            torch_threads=torch.get_num_threads(),
            torch=torch.__version__,
            deepspeed=deepspeed.__version__,
            world_size=world,
            settings=dict(
                vars(args),
                unet_params=n_params,
                cfg_forward_flops_per_image=F,
                backward_calls_per_step=gas,
                memory=("cuda_max_allocated_per_phase" if CUDA else "process_max_rss_so_far"),
            ),
            note=(
                "CPU: fp32 tiny UNet, Triton interpreted; timings mean little"
                if not CUDA
                else "GPU: DeepSpeed bf16 ZeRO-2; FLOPs counted by FlopCounterMode"
            ),
            rows=rows,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    def row(method, phase, m, T_=T, status="ok"):
        tflop = FLOP_MULT[phase] * T_ * F * n / 1e12 if m and FLOP_MULT[phase] else None
        s = m["s"] if m else None
        rows.append(
            dict(
                method=method,
                phase=phase,
                T=T_,
                status=status,
                seconds=s,
                mem_mb=m["mb"] if m else None,
                images_per_s=n / s if s and FLOP_MULT[phase] else None,
                tflop=tflop,
                mfu=tflop / (s * args.peak_tflops) if s and tflop and args.peak_tflops else None,
            )
        )
        write_json()

    sample_impl = "triton" if CUDA else "torch"  # the trainer's loss.impl=auto
    prompts = [f"A painting of a {ANIMALS[g % len(ANIMALS)]}" for g in range(G)]
    seeds = image_seeds(0, 0, range(rank * G, rank * G + G), B)
    ref_t = {"s": 0.0}
    add_timer(models.ref_unet, "forward", ref_t)
    for _ in range(args.repeats):
        ref_t["s"], m_samp = 0.0, {}
        with measure(m_samp):
            traj = sample(
                models,
                prompts,
                seeds,
                T,
                cfg.sampler.guidance_scale,
                cfg.sampler.eta,
                cfg.sampler.batch_size,
                cfg.loss.reduction,
                sample_impl,
                ref_batch_size=cfg.sampler.ref_batch_size,
            )
    m_ref = {"s": ref_t["s"], "mb": m_samp["mb"]}
    m_samp = {"s": m_samp["s"] - ref_t["s"], "mb": m_samp["mb"]}
    row("shared", "sample", m_samp)
    row("shared", "reference", m_ref)
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    rewards = torch.rand((G, B), generator=torch.Generator().manual_seed(rank)).to(device)

    opt_t = {"s": 0.0}
    add_timer(engine.optimizer, "step", opt_t)
    for impl in [m for m in ("torch", "triton") if m in methods]:
        name = f"twopass-{impl}"
        for _ in range(args.repeats):
            m1, m_first, m_later = {}, {}, {}
            with measure(m1):
                policy_log_ratios(engine, traj, cond, uncond, cfg, impl)
            opt_t["s"] = 0.0
            with measure(m_first):
                stats = prdp_step(engine, traj, rewards, cond, uncond, cfg, impl, first_step=True)
            m_opt = {"s": opt_t["s"], "mb": None}
            with measure(m_later):
                stats_later = prdp_step(engine, traj, rewards, cond, uncond, cfg, impl, first_step=False)
        for s in (stats, stats_later):
            if "skipped" in s:
                raise RuntimeError(f"{name}: prdp_step skipped the update ({s['skipped']}): timing would be wrong")
        row(name, "pass1", m1)
        row(name, "step first", m_first)
        row(name, "step later", m_later)
        row(name, "optimizer", m_opt)
        row(name, "epoch K=1", {"s": m_samp["s"] + m_ref["s"] + m_first["s"], "mb": max(m_samp["mb"], m_first["mb"])})
    models.unet = None
    drop_engine(engine)

    if "naive" in methods:  # one backward per step: images_per_chunk = n, steps_per_chunk = T
        cfg_n = copy.deepcopy(cfg)
        cfg_n.train.images_per_chunk, cfg_n.train.steps_per_chunk = n, T
        tries = (
            sorted({int(t) for t in args.naive_T.split(",") if 0 < int(t) <= T} | {T}, reverse=True) if CUDA else [T]
        )
        engine = new_engine(new_policy(args.unet, device), cfg_n, world, device)
        for T_ in tries:
            oom, m = False, {}
            try:
                for _ in range(args.repeats):
                    m = {}
                    with measure(m):
                        naive_step(engine, traj, rewards, cond, uncond, cfg_n, T_)
            except torch.cuda.OutOfMemoryError:
                oom = True  # cleaned up outside the except block (its traceback holds the graph)
            if not oom:
                row("naive", "naive step", m, T_, status="largest T that fits" if CUDA and T_ != T else "ok")
                break
            row("naive", "naive step", None, T_, status="OOM")
            drop_engine(engine)  # an OOM inside backward leaves ZeRO's buffers half-filled: start afresh
            engine = new_engine(new_policy(args.unet, device), cfg_n, world, device)
        drop_engine(engine)

    fmt = lambda v, f: format("-", ">" + f.split(".")[0]) if v is None else format(v, f)  # noqa: E731
    say(
        f"\n{'method':<15} {'phase':<11} {'T':>3} {'seconds':>9} {'img/s':>8} {'TFLOP':>9} {'MFU':>6} "
        f"{'peak MB':>9}  status"
    )
    for r in rows:
        say(
            f"{r['method']:<15} {r['phase']:<11} {r['T']:>3} {fmt(r['seconds'], '9.3f')} "
            f"{fmt(r['images_per_s'], '8.3f')} {fmt(r['tflop'], '9.4f')} "
            f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '5.1f') + '%':>6} "
            f"{fmt(r['mem_mb'], '9.0f')}  {r['status']}"
        )
    say(
        f"images per rank per step: {n}; img/s = {n} / seconds; peak memory: "
        + ("torch.cuda.max_memory_allocated per phase" if CUDA else "process max RSS so far (not per phase)")
    )
    write_json()
    if args.json:
        say(f"wrote {args.json}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
