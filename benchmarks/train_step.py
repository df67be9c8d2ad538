"""Time one PRDP optimizer step of the real trainer code, phase by phase (docs/design.md §7;
yardsticks: benchmarks/README.md). Whole epochs, levers and precisions: benchmarks/epoch.py, which
uses this module's SD1.4 models, FLOP count and timers.

Everything timed is the trainer's own code on a DeepSpeed ZeRO-2 engine (prdp_ds.engine): one
rollout by prdp_ds.sampler.sample (policy = the engine, frozen reference beside it), then per
method one optimizer step on that rollout. Rewards are random (no reward model is timed), prompts
are G animals. GPU: DeepSpeed bf16, reference in bf16. CPU: fp32, Triton under TRITON_INTERPRET=1.

Models (--unet):
  tiny       prdp_ds.models.build_tiny (the CPU default): SD-shaped UNet, VAE and CLIP, 4x8x8 latents
  sd14       SD v1.4's UNet2DConditionModel config (SD14_UNET, 860M parameters), 4x64x64 latents
  sd35m      SD3.5-medium's SD3Transformer2DModel config (SD35M_TRANSFORMER, 2.24B parameters), CFG pair
  flux       FLUX.1-dev's FluxTransformer2DModel config (FLUX_DEV_TRANSFORMER, 11.9B parameters),
             guidance-distilled: one call per step, the guidance value an input (prdp_ds.sampler.cfg_predict)
  tiny_sd3, tiny_flux   prdp_ds.flow_models.build_tiny_sd3 / build_tiny_flux: the CPU rehearsals of the two,
             with their tiny VAEs and text encoders, 16x8x8 latents
The full-size ones (sd14, sd35m, flux) have random weights (seeded, built on the device) and random text
embeddings of the real shapes (RandomTextModels): SD1.4 (n, 77, 768); SD3.5 (n, 1 + 77 + 256, 4096), row 0 the
pooled 2048 (prdp_ds.flow_models.pack_text); FLUX (n, 1 + 512, 4096), pooled 768; decoding is skipped.
sd35m and flux run at --resolution pixels (default 512: 16x64x64 latents; SD3's sample_size stays 128, its
position table is cropped to the latents) with a static-shift FlowMatchEulerDiscreteScheduler: shift 3.0
(SD3.5) and for FLUX e^mu at the resolution's sequence length (prdp_ds.flow_models.static_scheduler), so the
sampler runs the flow SDE policy. --lora-rank r > 0 trains LoRA adapters (prdp_ds.lora, Models.add_lora), the
reference being the policy with its adapters off. FLUX defaults to r = 64 (tiny_flux to 4, its rehearsal): a full
finetune does not fit one 80-GB GPU, since bf16 weights, fp32 master weights, Adam's two moments and the fp32
gradient sum take at least 2 + 4 + 8 + 4 = 18 bytes per parameter, 214 GB at 11.9B, and a reference copy 24 GB; with
LoRA the frozen base is 24 GB of bf16 (built in bf16 directly: in fp32 it would pass through 48 GB) plus 75M
trainable parameters. sd35m and flux take pass 2 in chunks of 1 image x 1 step by default (--images-per-chunk):
the tensors autograd saves for the backward, counted on a meta-device copy at 512 px (an estimate), are about
5 GiB per model row in bf16 for SD3.5-M (2 rows per image: the CFG pair) and 12 GiB for FLUX with LoRA (1 row),
beside model states of about 45 GB (SD3.5-M: 18 bytes per parameter and its bf16 reference) and 24 GB (FLUX).

Phases (wall clock, torch.cuda.synchronize around each; the reference's calls go through a synchronizing
timer, so `sample` = sample() minus the reference calls):
  sample      policy forwards + per-step bookkeeping (+ tiny VAE decode on the tiny models)
  reference   the frozen reference's forwards at the same x_t
  pass1       prdp_ds.twopass.policy_log_ratios (no grad)
  step first  prdp_step(first_step=True): loss + pass 2 (fwd+bwd per chunk) + optimizer step
  step later  prdp_step(first_step=False): the same plus pass 1 (later steps of an epoch, K > 1)
  optimizer   the DeepSpeed optimizer's step() alone (inside both steps above)
  epoch K=1   sample + reference + step first: the per-image yardstick of benchmarks/README.md (no reward model)
Methods: `twopass-torch` / `twopass-triton` (loss.impl torch / triton), and `naive`: one autograd
graph through all T model calls of all images (r(theta) per step by chunk_log_ratios with grad,
prdp_ds.loss.rdp_loss, one backward) on an engine with one accumulation step; on GPU it tries T
in a descending list and reports the largest that fits (OOM rows say which did not).

FLOPs: F = FlopCounterMode's count, once, of one image's model evaluation at one step (cfg_flops: what
prdp_ds.sampler.cfg_predict runs; the prompts' encoding is not counted) in the run's dtype: the CFG pair (a batch
of 2: uncond and cond rows) for the SD1.x and SD3 families, one call on cond for a guidance-distilled model (FLUX),
so F per image per step is one transformer forward there, not two. The models are per-sample, so cost is linear in
images. A backward costs b forwards: b = 2 for a full finetune (the gradients w.r.t. inputs and weights each cost a
forward, the convention of benchmarks/README.md's yardsticks); with LoRA the frozen base weights get no weight
gradient and b is counted (backward_forwards: FlopCounterMode on a meta-device copy of the policy with the same
adapters; about 1.1 for SD3.5-M and FLUX at rank 64). Per image: sample T*F, reference T*F, pass 1 T*F, pass 2
(1 + b)*T*F (flop_mult). With LoRA, F is the policy's (adapters on); the reference's adapters-off forward is a
little cheaper.
MFU = counted FLOPs / (seconds x --peak-tflops) (default 790, the measured bf16 peak in benchmarks/README.md).
Peak memory: torch.cuda.max_memory_allocated, reset per phase (sample and reference interleave: one
peak for both); on CPU the process's max RSS so far. Each measurement runs --repeats times (default
2: the first warms up kernels and allocators); the last one is reported.
On CPU the timings mean little (2 cores, interpreted Triton); it checks that the wiring runs.

  python benchmarks/train_step.py [--unet tiny|sd14|sd35m|flux|tiny_sd3|tiny_flux] [--T 50] [--groups 2]
      [--images 4] [--images-per-chunk 4] [--steps-per-chunk 1] [--methods naive,torch,triton]
      [--resolution 512] [--lora-rank R] [--json PATH]
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
from prdp_ds.flow_models import (  # noqa: E402
    FLUX_SCHEDULER,
    FLUX_T5_LENGTH,
    SD3_T5_LENGTH,
    FluxPolicy,
    SD3Policy,
    build_tiny_flux,
    build_tiny_sd3,
    pack_text,
    static_scheduler,
)
from prdp_ds.lora import ADAPTER_NAME, add_lora, has_lora  # noqa: E402
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
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (the hub file; not reachable from the machine this
# was written on). Cross-checked against diffusers 0.42: SD3Transformer2DModel's signature notes
# dual_attention_layers (0, ..., 12) for SD3.5, and loaders/single_file_utils.py identifies sd35_medium by a
# pos_embed of 147456 = 384 x 384 rows and adaLN width 9216 = 6 x 1536 (24 heads x 64); public projects that copy
# the file give the same values.
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev transformer/config.json (the hub file, likewise). diffusers 0.42's
# FluxTransformer2DModel defaults are these values but guidance_embeds (False there: FLUX.1-schnell); Black Forest
# Labs' own flux-dev parameters agree: depth 19, depth_single_blocks 38, hidden 3072 = 24 heads x 128, vec_in_dim
# 768, context_in_dim 4096, axes_dim (16, 56, 56), guidance_embed true.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Full-size families: the policy class and config, the packed text (L, D) and pooled width (None: SD1.x's plain
# (n, L, D) embeddings), and the scheduler for a latent side (None: SD1.4's own 64).
FULL_SIZE = {
    "sd14": dict(policy=UNet2DConditionModel, config=SD14_UNET, text=SD14_TEXT, pooled=None, scheduler=None),
    "sd35m": dict(
        policy=SD3Policy,
        config=SD35M_TRANSFORMER,
        text=(SD14_TEXT[0] + SD3_T5_LENGTH, 4096),  # CLIP-L and CLIP-G (77 tokens), then T5
        pooled=2048,
        scheduler=lambda side: static_scheduler(dict(shift=3.0)),  # SD3.5-medium's scheduler config
    ),
    "flux": dict(
        policy=FluxPolicy,
        config=FLUX_DEV_TRANSFORMER,
        text=(FLUX_T5_LENGTH, 4096),
        pooled=768,
        scheduler=lambda side: static_scheduler(FLUX_SCHEDULER, (side // 2) ** 2),  # e^mu at the sequence length
    ),
}
TINY_BUILDERS = {"tiny": build_tiny, "tiny_sd3": build_tiny_sd3, "tiny_flux": build_tiny_flux}
FLOW_FULL = ("sd35m", "flux")  # the families --resolution applies to
LORA_RANK = {"flux": 64, "tiny_flux": 4}  # --lora-rank defaults (else 0: full finetune)
IMAGES_PER_CHUNK = {"sd35m": 1, "flux": 1}  # --images-per-chunk defaults (else 4)
TINY_NOTE = {"tiny": "tiny UNet", "tiny_sd3": "tiny SD3 transformer", "tiny_flux": "tiny FLUX transformer"}
FROZEN = torch.bfloat16 if CUDA else None  # the frozen models' dtype (None: fp32)


def flop_mult(backward_forwards):
    """Forward-equivalents of each phase, x T x F x images; a backward costs `backward_forwards` forwards."""
    b = backward_forwards
    return {
        "sample": 1,
        "reference": 1,
        "pass1": 1,
        "step first": 1 + b,
        "step later": 2 + b,
        "optimizer": 0,
        "epoch K=1": 3 + b,
        "naive step": 1 + b,
    }


class RandomTextModels(Models):
    """Full-size policies with random text embeddings and no VAE (timing only): decoding is replaced by
    sigmoid of the first 3 latent channels, (n, C, h, w) -> (n, 3, h, w) in [0, 1], so that a
    weight-free reward (brightness) still differs between images.

    text (L, D): the text sequence; pooled P: a flow family's pooled width, packed into row 0 (emb (n, 1 + L, D),
    prdp_ds.flow_models.pack_text), or None (emb (n, L, D), SD1.x). latent_side: the latents' h = w where the
    policy's config does not give them (SD3: sample_size is its largest latent, its position table is cropped)."""

    text, pooled, latent_side = SD14_TEXT, None, None

    @property
    def latent_shape(self):
        shape = super().latent_shape
        return shape if self.latent_side is None else (shape[0], self.latent_side, self.latent_side)

    def encode_prompts(self, prompts):
        gen = torch.Generator().manual_seed(len(prompts))
        emb = torch.randn((len(prompts), *self.text), generator=gen)
        if self.pooled is not None:
            emb = pack_text(torch.randn((len(prompts), self.pooled), generator=gen), emb)
        return emb.to(next(self.ref_unet.parameters()).device)

    def decode(self, latents):
        return torch.sigmoid(latents[:, :3].float())


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def new_policy(kind, device, side=None, lora_rank=0, dtype=torch.float32):
    """A fresh policy of `kind` on `device` (seed 0), built in `dtype` (full-size families), its latent side
    `side` where it has one (FLUX), with LoRA adapters of `lora_rank` (0: none)."""
    if kind in TINY_BUILDERS:
        policy = TINY_BUILDERS[kind](0, reference=False).unet.to(device)
    else:
        spec = FULL_SIZE[kind]
        with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
            torch.manual_seed(0)
            policy = spec["policy"](**spec["config"])
        if isinstance(policy, FluxPolicy):
            policy.latent_side = side
    return add_lora(policy, lora_rank) if lora_rank else policy


def base_dtype(lora_rank, frozen):
    """The dtype a full-size policy is built in: with LoRA its base is frozen, so the frozen dtype; else fp32."""
    return (frozen or torch.float32) if lora_rank else torch.float32


def build_models(kind, device, frozen=FROZEN, lora_rank=0, resolution=None):
    """Policy and reference of `kind` on `device`, the reference cast to `frozen` (None: fp32). With lora_rank > 0
    the policy carries LoRA adapters, its frozen base built in `frozen`, and the reference is the policy with its
    adapters off (Models.add_lora). resolution: pixels (sd35m, flux: latents of side resolution / 8)."""
    if kind in TINY_BUILDERS:
        models = TINY_BUILDERS[kind](0, reference=not lora_rank)
        return (models.add_lora(lora_rank) if lora_rank else models).to(device, frozen_dtype=frozen)
    spec = FULL_SIZE[kind]
    side = resolution // 8 if resolution else None
    unet = new_policy(kind, device, side, dtype=base_dtype(lora_rank, frozen))
    ref = None if lora_rank else copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=frozen or torch.float32)
    scheduler = spec["scheduler"](side) if spec["scheduler"] else make_scheduler()
    models = RandomTextModels(unet, ref, None, None, OpenClipTokenizer(SD14_TEXT[0]), scheduler)
    models.text, models.pooled, models.latent_side = spec["text"], spec["pooled"], side
    return models.add_lora(lora_rank) if lora_rank else models


def new_engine(policy, cfg, world, device):
    ds = build_ds_config({"zero_optimization": {"stage": 2}}, cfg, world)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    return make_engine(policy, ds, make_optimizer(trainable, cfg, device.type == "cuda"))


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


class TimedCalls:
    """`target` behind a synchronizing timer: acc['s'] sums the seconds of its calls; other attributes pass
    through. For the reference, whose calls a LoRA view (prdp_ds.lora.AdaptersDisabled) would not route through
    an instance's forward."""

    def __init__(self, target, acc):
        self.target = self.call = target
        add_timer(self, "call", acc)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.target, name)


def is_distilled(unet):
    """Whether the policy takes the guidance value as an input (one call per step, no CFG pair: FLUX.1-dev)."""
    return getattr(getattr(unet, "module", unet), "guidance_distilled", False)


def cfg_flops(unet, models, device, guidance=1.0):
    """F: FLOPs of one image's model evaluation at one step in the model's dtype, what cfg_predict runs: a CFG
    pair (batch 2: uncond + cond of one image) or, for a guidance-distilled model, one call (guidance: its input
    value; the count does not depend on it). Latents of models.latent_shape."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *models.latent_shape, device=device)
    cond, uncond = models.encode_prompts(["a cat"]), models.encode_prompts([""])  # outside the count: not the model's
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cfg_predict(unet, x, torch.tensor(500), cond, uncond, guidance)
    return counter.get_total_flops()


def backward_forwards(unet, models, guidance=1.0):
    """b: pass 2's backward in forwards. 2 for a full finetune (by convention: input and weight gradients, a
    forward each). With LoRA adapters, counted: FlopCounterMode over one model evaluation (cfg_flops' inputs) and
    its backward on a meta-device copy of the policy with adapters of the same rank (no memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = getattr(unet, "module", unet)
    if not has_lora(module):
        return 2.0
    with torch.device("meta"):
        twin = type(module).from_config(module.config)
    add_lora(twin, module.peft_config[ADAPTER_NAME].r)
    x = torch.zeros(1, *models.latent_shape, device="meta")
    cond, uncond = (models.encode_prompts(p).to("meta") for p in (["a cat"], [""]))
    with FlopCounterMode(display=False) as forward:
        eps_u, eps_c = cfg_predict(twin, x, torch.tensor(500), cond, uncond, guidance)
    with FlopCounterMode(display=False) as backward:
        torch.cat([eps_u, eps_c]).float().sum().backward()
    return backward.get_total_flops() / forward.get_total_flops()


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
    ap.add_argument(
        "--unet", choices=(*TINY_BUILDERS, *FULL_SIZE), default="sd14" if CUDA else "tiny", help="the model family"
    )
    ap.add_argument("--T", type=int, default=50 if CUDA else 4, help="denoising steps")
    ap.add_argument("--groups", type=int, default=2, help="G: prompt groups per rank")
    ap.add_argument("--images", type=int, default=4, help="B: images per group")
    ap.add_argument("--images-per-chunk", type=int, help="pass-2 chunk (default 1 for sd35m and flux, else 4)")
    ap.add_argument("--steps-per-chunk", type=int, default=1)
    ap.add_argument("--sample-batch", type=int, default=16, help="images per sampling model call")
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
    ap.add_argument("--resolution", type=int, help="image pixels, a multiple of 16 (sd35m and flux only; default 512)")
    ap.add_argument("--lora-rank", type=int, help="LoRA rank (0: full finetune; default 64 for flux, 4 for tiny_flux)")
    args = ap.parse_args()
    if args.resolution is not None and (args.unet not in FLOW_FULL or args.resolution <= 0 or args.resolution % 16):
        ap.error(f"--resolution: a positive multiple of 16 for {' and '.join(FLOW_FULL)} (the others' is fixed)")
    if args.unet in FLOW_FULL and args.resolution is None:
        args.resolution = 512
    if args.lora_rank is None:
        args.lora_rank = LORA_RANK.get(args.unet, 0)
    if args.images_per_chunk is None:
        args.images_per_chunk = IMAGES_PER_CHUNK.get(args.unet, 4)
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
    models = build_models(args.unet, device, lora_rank=args.lora_rank, resolution=args.resolution)
    latent_shape, dtype = tuple(models.latent_shape), base_dtype(args.lora_rank, FROZEN)

    def fresh_policy():  # the naive method's: a policy built as the first one was
        return new_policy(args.unet, device, latent_shape[-1], args.lora_rank, dtype)

    engine = new_engine(models.unet, cfg, world, device)
    models.unet = engine  # the policy is called through the engine, as in prdp_ds.train.Trainer
    guidance = cfg.sampler.guidance_scale  # FLUX: its guidance input (timing does not depend on the value)
    F = cfg_flops(engine.module, models, device, guidance)
    b = backward_forwards(engine.module, models, guidance)
    mult = flop_mult(b)
    calls = 1 if is_distilled(engine) else 2  # model rows per image per step: one call, or the CFG pair
    n_params = sum(p.numel() for p in engine.module.parameters())
    n_trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    gas = engine.gradient_accumulation_steps()
    lora = f", LoRA rank {args.lora_rank}: {n_trainable / 1e6:.1f}M trainable" if args.lora_rank else ""
    say(
        f"device: {dev_name}; unet {args.unet} ({n_params / 1e6:.1f}M params{lora}, "
        f"{next(engine.module.parameters()).dtype}); latents {latent_shape}; "
        f"{'one call' if calls == 1 else 'CFG forward'} per image {F / 1e9:.3f} GFLOP, backward {b:.3f} forwards; "
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
                model_calls_per_image_step=calls,
                backward_forwards=b,
                trainable_params=n_trainable,
                latent_shape=list(latent_shape),
                backward_calls_per_step=gas,
                memory=("cuda_max_allocated_per_phase" if CUDA else "process_max_rss_so_far"),
            ),
            note=(
                f"CPU: fp32 {TINY_NOTE.get(args.unet, args.unet)}, Triton interpreted; timings mean little"
                if not CUDA
                else "GPU: DeepSpeed bf16 ZeRO-2; FLOPs counted by FlopCounterMode"
            )
            + (f"; LoRA rank {args.lora_rank}, the reference its adapters-off view" if args.lora_rank else ""),
            rows=rows,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    def row(method, phase, m, T_=T, status="ok"):
        tflop = mult[phase] * T_ * F * n / 1e12 if m and mult[phase] else None
        s = m["s"] if m else None
        rows.append(
            dict(
                method=method,
                phase=phase,
                T=T_,
                status=status,
                seconds=s,
                mem_mb=m["mb"] if m else None,
                images_per_s=n / s if s and mult[phase] else None,
                tflop=tflop,
                mfu=tflop / (s * args.peak_tflops) if s and tflop and args.peak_tflops else None,
            )
        )
        write_json()

    sample_impl = "triton" if CUDA else "torch"  # the trainer's loss.impl=auto
    prompts = [f"A painting of a {ANIMALS[g % len(ANIMALS)]}" for g in range(G)]
    seeds = image_seeds(0, 0, range(rank * G, rank * G + G), B)
    ref_t = {"s": 0.0}
    models.ref_unet = TimedCalls(models.ref_unet, ref_t)
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
                noise_level=cfg.sampler.noise_level,
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
    if args.lora_rank:
        models.ref_unet = None  # the adapters-off view holds the dropped engine's policy
    drop_engine(engine)

    if "naive" in methods:  # one backward per step: images_per_chunk = n, steps_per_chunk = T
        cfg_n = copy.deepcopy(cfg)
        cfg_n.train.images_per_chunk, cfg_n.train.steps_per_chunk = n, T
        tries = (
            sorted({int(t) for t in args.naive_T.split(",") if 0 < int(t) <= T} | {T}, reverse=True) if CUDA else [T]
        )
        engine = new_engine(fresh_policy(), cfg_n, world, device)
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
            engine = new_engine(fresh_policy(), cfg_n, world, device)
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
