"""Time whole PRDP epochs of the real trainer, phase by phase, over a plan of configurations (levers, precisions, T),
each stage under its own wall-time budget, one JSON row per stage written as soon as it finishes (benchmarks/README.md,
"Epoch benchmark"). train_step.py beside it times single steps and the full-graph (naive) comparison.

One stage = one prdp_ds.train.Trainer built from a training Config (defaults + this script's sizes + `--set` + the
stage's levers) and a DeepSpeed JSON (--ds-config + the levers' `ds.` overrides), then one epoch through its own code:
Trainer.rollout (sample with the engine, reference UNet, brightness reward: weight-free) and Trainer.train_epoch
(K prdp_step calls: pass 1 (not on the first step), loss, pass 2, optimizer). Optionally, between the two, pass 1 at
theta = theta_old (prdp_ds.twopass.policy_log_ratios), which times pass 1 and gives the log-ratio noise floor: per step
index t, RMS and max over images of r(theta_old) recomputed minus r_old recorded at sampling.
UNet `tiny` (CPU) or `sd14` (SD v1.4's UNet config, random weights, random text embeddings, sigmoid of the latents for
images: benchmarks/train_step.py's RandomTextModels, loaded through model.pretrained=sd14-random).

Phases (seconds, synchronized; peak memory per phase: torch.cuda.max_memory_allocated, on CPU the process's max RSS):
  sample     Trainer.rollout minus the reference calls (decode and reward included: tiny)
  reference  the reference UNet's calls (a synchronizing timer around prdp_ds.sampler.cfg_predict on ref_unet)
  pass1      policy_log_ratios at theta_old (own call, not part of the epoch) when the stage asks for it
  pass2      Trainer.train_epoch minus the optimizer steps and minus pass 1 inside later steps (loss included: tiny)
  optimizer  the DeepSpeed optimizer's step() calls
  epoch      rollout + train_epoch: images/s = images per rank / epoch seconds (the issue's yardstick at K = 1)
FLOPs: F = FlopCounterMode's count of one CFG forward of one image (batch 2, train_step.cfg_flops), times the images
actually passed through cfg_predict in each phase (counted by wrappers around prdp_ds.sampler.cfg_predict and
prdp_ds.twopass.cfg_predict; a backward counts 2 forwards, so pass 2 = 3 F per image-step). MFU = FLOPs / (seconds x
--peak-tflops).
Overhead ratio (stage `ratio`): the two-pass step (prdp_step, first step after sampling: pass 1 skipped) minus its
optimizer step, over plain autograd forward + backward (sum of the CFG outputs) of the same UNet rows in the same chunks
on an undistributed copy of the policy at theta_old (no DeepSpeed, no log-ratio); min over --repeats of each
(and the median over the repeats of each run's own ratio: plain and two-pass back to back share one machine load).

Levers (training-config `KEY=VALUE` overrides, or `ds.KEY=VALUE` for the DeepSpeed JSON): a lever whose key the
Config does not have (or whose value it refuses) is skipped with a printed reason. Every stage starts from BASELINE,
the trainer's settings before issue 19 set explicitly (ZeRO-2, DeepSpeed timers on, chunks of 4 images x 1 step,
sampling and reference calls of 16), so that "before" does not move with the shipped defaults; the levers that ran
are kept by the later stages (cumulative: each row is "before" for the next). More with --lever NAME=OVR[;OVR...].
Stages marked fresh (`ratio`) run the shipped defaults instead (Config and --ds-config as they are).

GPU plan (one GPU, SD1.4, bf16, K = 1, 64 images per rank = 8 prompts x 8; the whole run fits --deadline-s = 470 s,
measured from the script's start, and benchmarks/gpu_checks.sh gives it `timeout 500`):
  start-up        ~25 s  imports, CUDA context (not a stage)
  warmup           20 s  T = 2, 16 images: kernels compiled and autotuned, allocator warmed
  base             45 s  T = 10, BASELINE (chunks 4 images x 1 step, ZeRO-2, DeepSpeed timers on) + pass 1, noise
  ds-timer-off     28 s  + DeepSpeed's synchronizing throughput timer off
  chunks-16x2      28 s  + 16 images x 2 steps per pass-2 backward (64 CFG rows)
  chunks-auto      28 s  + train.*_per_chunk = auto (prdp_ds.chunking: the largest chunk that fits)
  zero1            28 s  + ZeRO-1 (bf16 + fp32 grad accumulation: DeepSpeed's BF16 optimizer, reduction at the boundary)
  sample-batch     28 s  + sampler.batch_size = 64 images, sampler.ref_batch_size = 256 (image, step) rows per call
  channels-last    28 s  + model.channels_last = true, + pass 1, noise: "after every lever" at T = 10
  T50             110 s  T = 50, every lever kept (the 0.8 images/s target; peak memory against channels-last's T = 10)
  tf32             20 s  8 images, T = 10, fp32 UNet with TF32 matmuls and convolutions + pass 1, noise
  fp32             22 s  8 images, T = 10, fp32 without TF32 + pass 1, noise
  compile          60 s  + model.compile = true (last; cut to what is left of --deadline-s)
  sum             470 s  (`ratio`, 16 images at T = 10, is in the plan but not run unless --stages names it)
A stage past its budget is stopped (SIGALRM) and its row keeps the phases it finished, status "timeout". bf16 here is
"bf16 UNet with fp32 log-ratio maths": prdp_ds.logratio computes the log-ratio in fp32 from the UNet's bf16 outputs.
CPU plan: the tiny UNet in fp32, T = 4, 8 images, the same levers, then `ratio` (about a minute on 2 cores).

  python benchmarks/epoch.py [--stages base,ratio] [--set KEY=VALUE ...] [--lever NAME=OVR;OVR] [--json PATH]
"""

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before kernels / prdp_ds are imported (docs/design.md §11)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prdp_ds.sampler as sampler_mod  # noqa: E402
import prdp_ds.train as train_mod  # noqa: E402
import prdp_ds.twopass as twopass  # noqa: E402
from benchmarks.provenance import run_meta  # noqa: E402
from benchmarks.train_step import add_timer, build_models, cfg_flops, measure, sync  # noqa: E402
from prdp_ds import config as config_lib  # noqa: E402
from prdp_ds.engine import init_distributed, load_ds_json  # noqa: E402
from prdp_ds.sampler import cfg_predict  # noqa: E402

SD14_RANDOM = "sd14-random"  # model.pretrained value this script's loader answers with train_step's SD1.4 UNets
OPTIONAL_BASE = ["output.noise_every=0"]  # the trainer's own noise pass (pass 1) would otherwise be in the epoch
BASELINE = [  # "before" every lever: the trainer as it was before issue 19, set explicitly (the defaults moved)
    "ds.zero_optimization.stage=2",
    "ds.timers.throughput.enabled=true",
    "train.images_per_chunk=4",
    "train.steps_per_chunk=1",
    "sampler.batch_size=16",
    "sampler.ref_batch_size=16",  # 16 rows per reference call: the batches the interleaved reference had
    "model.channels_last=false",
    "model.compile=false",
]
LEVERS = {  # name -> overrides; `ds.` ones go to the DeepSpeed JSON
    "ds-timer-off": ["ds.timers.throughput.enabled=false"],
    "chunks-16x2": ["train.images_per_chunk=16", "train.steps_per_chunk=2"],
    "chunks-auto": ["train.images_per_chunk=auto", "train.steps_per_chunk=auto"],
    "zero1": ["ds.zero_optimization.stage=1"],
    "sample-batch": ["sampler.batch_size=64"],
    "ref-batch": ["sampler.ref_batch_size=256"],
    "channels-last": ["model.channels_last=true"],
    "compile": ["model.compile=true"],
}
PRECISIONS = {  # name -> (DeepSpeed bf16 on, TF32 matmuls and convolutions on)
    "bf16": (True, False),
    "tf32": (False, True),
    "fp32": (False, False),
}


@dataclasses.dataclass
class Stage:
    name: str
    T: int  # denoising steps
    groups: int  # prompt groups per rank
    images: int  # images per group (images per rank = groups x images)
    budget_s: float  # wall-time limit of the stage
    levers: tuple = ()  # lever names added on top of those kept from earlier stages
    precision: str = "bf16"
    pass1: bool = False  # time pass 1 at theta_old and record the noise floor
    ratio: bool = False  # overhead ratio instead of train_epoch
    keep: bool = True  # the levers that ran here carry into later stages
    fresh: bool = False  # the shipped defaults (Config, --ds-config): neither BASELINE nor the kept levers
    default: bool = True  # run when --stages is not given


GPU_PLAN = [
    Stage("warmup", 2, 2, 8, 20, keep=False),
    Stage("base", 10, 8, 8, 45, pass1=True),
    Stage("ds-timer-off", 10, 8, 8, 28, ("ds-timer-off",)),
    Stage("chunks-16x2", 10, 8, 8, 28, ("chunks-16x2",)),
    Stage("chunks-auto", 10, 8, 8, 28, ("chunks-auto",)),
    Stage("zero1", 10, 8, 8, 28, ("zero1",)),
    Stage("sample-batch", 10, 8, 8, 28, ("sample-batch", "ref-batch")),
    Stage("channels-last", 10, 8, 8, 28, ("channels-last",), pass1=True),
    Stage("T50", 50, 8, 8, 110),
    Stage("tf32", 10, 1, 8, 20, precision="tf32", pass1=True, keep=False),
    Stage("fp32", 10, 1, 8, 22, precision="fp32", pass1=True, keep=False),
    Stage("ratio", 10, 2, 8, 25, ratio=True, keep=False, fresh=True, default=False),
    Stage("compile", 10, 8, 8, 60, ("compile",)),
]
CPU_PLAN = [
    Stage("base", 4, 2, 4, 60, precision="fp32", pass1=True),
    Stage("ds-timer-off", 4, 2, 4, 30, ("ds-timer-off",), precision="fp32"),
    Stage("chunks-16x2", 4, 2, 4, 30, ("chunks-16x2",), precision="fp32"),
    Stage("chunks-auto", 4, 2, 4, 30, ("chunks-auto",), precision="fp32"),
    Stage("zero1", 4, 2, 4, 30, ("zero1",), precision="fp32"),
    Stage("sample-batch", 4, 2, 4, 30, ("sample-batch", "ref-batch"), precision="fp32"),
    Stage("channels-last", 4, 2, 4, 30, ("channels-last",), precision="fp32", pass1=True),
    Stage("ratio", 4, 2, 4, 60, precision="fp32", ratio=True, keep=False, fresh=True),
]


class StageTimeout(Exception):
    """A stage ran past its budget."""


@contextlib.contextmanager
def deadline(seconds):
    """Raise StageTimeout in the main thread after `seconds` (SIGALRM; checked between Python bytecodes)."""

    def expire(signum, frame):
        raise StageTimeout(f"past its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Counters:
    """Images through cfg_predict per phase and the reference's synchronized seconds, filled by the wrappers that
    install() puts around prdp_ds.sampler.cfg_predict, prdp_ds.twopass.cfg_predict and twopass.policy_log_ratios."""

    def __init__(self):
        self.ref_unet = None
        self.reset()

    def reset(self):
        self.images = dict(sample=0, reference=0, pass1=0, pass2=0)
        self.ref_s = 0.0
        self.pass1_s = 0.0

    def install(self):
        def sampler_predict(unet, x, t, cond, uncond, guidance=None):
            if unet is not self.ref_unet:
                self.images["sample"] += x.shape[0]
                return cfg_predict(unet, x, t, cond, uncond, guidance)
            self.images["reference"] += x.shape[0]
            sync()
            t0 = time.perf_counter()
            out = cfg_predict(unet, x, t, cond, uncond, guidance)
            sync()
            self.ref_s += time.perf_counter() - t0
            return out

        def twopass_predict(unet, x, t, cond, uncond, guidance=None):
            self.images["pass2" if torch.is_grad_enabled() else "pass1"] += x.shape[0]
            return cfg_predict(unet, x, t, cond, uncond, guidance)

        policy_log_ratios = twopass.policy_log_ratios

        def timed_pass1(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = policy_log_ratios(*args, **kwargs)
            sync()
            self.pass1_s += time.perf_counter() - t0
            return out

        sampler_mod.cfg_predict = sampler_predict
        twopass.cfg_predict = twopass_predict
        twopass.policy_log_ratios = timed_pass1


def sd14_loader(real_loader, device):
    """prdp_ds.train.load_models that answers model.pretrained=sd14-random with train_step's SD1.4 UNets (fp32
    reference: the Trainer casts it to the policy's dtype) and passes every other source to the real loader."""

    def load(source, seed=0, reference=True):
        return (
            build_models("sd14", device, frozen=None) if source == SD14_RANDOM else real_loader(source, seed, reference)
        )

    return load


def accepted(override):
    """Whether the training Config has this key and accepts this value."""
    try:
        config_lib.resolve(None, None, [override])
    except config_lib.ConfigError:
        return False
    return True


def merge(base, extra):
    """Deep merge of nested dicts (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def phase(seconds, mb, images=None, flops=None, peak_tflops=None):
    """One phase's record: seconds, peak MB, images/s (images per rank), TFLOP and MFU where they apply."""
    out = dict(s=seconds, mb=mb)
    if images and seconds > 0:
        out["images_per_s"] = images / seconds
    if flops is not None:
        out["tflop"] = flops / 1e12
        out["mfu"] = flops / (seconds * peak_tflops * 1e12) if peak_tflops and seconds > 0 else None
    return out


def noise_floor(r_recomputed, r_old):
    """r(theta_old) recomputed minus r_old recorded at sampling, both (G, B, T) -> per step index RMS and max |.|."""
    d = (r_recomputed - r_old).flatten(0, 1).double()
    return dict(
        rms_per_step=d.pow(2).mean(0).sqrt().tolist(),
        max_per_step=d.abs().amax(0).tolist(),
        rms=d.pow(2).mean().sqrt().item(),
        max=d.abs().max().item(),
    )


def plain_fwd_bwd(unet, traj, cond, uncond, cfg):
    """Plain autograd forward + backward of the UNet rows of every pass-2 chunk (twopass.chunks, same CFG batches as
    twopass.chunk_log_ratios) with loss = sum of the CFG outputs; -> synchronized seconds. unet: a bare module."""
    sched, n = traj.schedule, traj.seeds.numel()
    sync()
    t0 = time.perf_counter()
    for images, steps in twopass.chunks(cfg, n):
        ni, nk = images.stop - images.start, steps.stop - steps.start
        x_t = traj.flat("latents")[images, steps].flatten(0, 1)
        c = cond[images].repeat_interleave(nk, dim=0)
        eps_u, eps_c = cfg_predict(unet, x_t, sched.timesteps[steps].repeat(ni), c, uncond.expand(c.shape[0], -1, -1))
        (eps_u.float().sum() + eps_c.float().sum()).backward()
    sync()
    seconds = time.perf_counter() - t0
    unet.zero_grad(set_to_none=True)
    return seconds


class Bench:
    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.counters = Counters()
        self.counters.install()
        self.flops_per_image = None  # F: one CFG forward of one image
        self.kept = []  # lever names carried into later stages
        self.rows, self.summary = [], {}
        self.levers = dict(LEVERS)
        for spec in args.lever:
            name, sep, ovr = spec.partition("=")
            if not sep or not ovr:
                raise SystemExit(f"--lever expects NAME=KEY=VALUE[;KEY=VALUE...], got {spec!r}")
            self.levers[name] = [o.strip() for o in ovr.split(";") if o.strip()]
        self.ds_base = load_ds_json(args.ds_config)
        self.tmp = tempfile.TemporaryDirectory(prefix="prdp_epoch_bench_")
        self.start = time.perf_counter()
        self.meta = run_meta("benchmarks/epoch.py", device_name())

    def say(self, text):
        if self.rank == 0:
            print(text, flush=True)

    def base_overrides(self, stage):
        a = self.args
        return [
            f"model.pretrained={a.unet if a.unet == 'tiny' else SD14_RANDOM}",
            f"sampler.num_steps={stage.T}",
            f"train.prompts_per_epoch={stage.groups * self.world}",
            f"train.images_per_prompt={stage.images}",
            f"train.steps_per_epoch={a.K}",
            "train.epochs=1",
            "output.sample_every=0",
            "output.save_every=0",
            "reward={brightness: 1.0}",
            *[o for o in OPTIONAL_BASE if accepted(o)],
        ]

    def resolve(self, stage):
        """-> (cfg, ds_json, levers that apply, {skipped lever: reason}, overrides) for a stage."""
        baseline = [] if stage.fresh else BASELINE
        overrides = self.base_overrides(stage) + [o for o in baseline if not o.startswith("ds.") and accepted(o)]
        overrides += self.args.set
        ds_overrides, applied, skipped = [o[3:] for o in baseline if o.startswith("ds.")], [], {}
        names = ([] if stage.fresh else list(self.kept)) + [n for n in stage.levers if n not in self.kept]
        for name in names:
            if name not in self.levers:
                skipped[name] = "unknown lever"
                continue
            train = [o for o in self.levers[name] if not o.startswith("ds.")]
            try:
                config_lib.resolve(None, None, overrides + train)
            except config_lib.ConfigError as err:
                skipped[name] = f"the training config refuses it: {err}"
                continue
            overrides += train
            ds_overrides += [o[3:] for o in self.levers[name] if o.startswith("ds.")]
            applied.append(name)
        bf16, _ = PRECISIONS[stage.precision]
        ds_json = merge(self.ds_base, {"bf16": {"enabled": bf16}})
        for o in ds_overrides:
            ds_json = merge(ds_json, config_lib.parse_override(o))
        return (
            config_lib.resolve(None, None, overrides),
            ds_json,
            applied,
            skipped,
            overrides + [f"ds.{o}" for o in ds_overrides],
        )

    def run(self, plan):
        for stage in plan:
            left = self.args.deadline_s - (time.perf_counter() - self.start)
            if left < self.args.min_stage_s:
                self.add_row(dict(stage=stage.name, status=f"not run: {left:.0f} s left of --deadline-s"))
                continue
            self.run_stage(stage, min(stage.budget_s * self.args.budget_scale, left))
        self.finish()

    def run_stage(self, stage, budget):
        cfg, ds_json, applied, skipped, overrides = self.resolve(stage)
        for name, reason in skipped.items():
            self.say(f"[{stage.name}] lever {name} skipped: {reason}")
        n = stage.groups * stage.images
        row = dict(
            stage=stage.name,
            status="running",
            T=stage.T,
            K=cfg.train.steps_per_epoch,
            images_per_rank=n,
            precision=stage.precision,
            levers=applied,
            levers_skipped=skipped,
            overrides=overrides,
            zero_stage=ds_json.get("zero_optimization", {}).get("stage"),
            budget_s=budget,
            phases={},
        )
        bf16, tf32 = PRECISIONS[stage.precision]
        if CUDA:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        trainer, t0 = None, time.perf_counter()
        try:
            with deadline(budget):
                trainer = train_mod.Trainer(cfg, ds_json, self.tmp.name, self.rank, self.world, self.device)
                self.measure_epoch(stage, trainer, row)
            row["status"] = "ok" if row["status"] == "running" else row["status"]
            if stage.keep:
                self.kept += [name for name in applied if name not in self.kept]
        except StageTimeout as err:
            row["status"] = f"timeout: {err}"
        except Exception as err:  # an OOM or a lever DeepSpeed refuses: recorded, the next stage runs
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            traceback.print_exc()
        row["wall_s"] = time.perf_counter() - t0
        try:  # after a timeout inside a backward the engine may be half-way: its teardown may fail too
            if trainer is not None:
                trainer.log.close()
                trainer.engine.destroy()
        except Exception as err:
            row["teardown"] = f"{type(err).__name__}: {err}"
        del trainer
        self.counters.ref_unet = None
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        self.add_row(row)
        self.print_row(row)

    def measure_epoch(self, stage, trainer, row):
        """Fills row['phases'] (and 'noise_floor' / 'overhead') as each phase finishes: a timeout keeps them."""
        a, c, ph = self.args, self.counters, row["phases"]
        c.ref_unet = trainer.models.ref_unet
        t = trainer.cfg.train
        row["chunk"] = dict(
            images=t.images_per_chunk,
            steps=t.steps_per_chunk,
            backward_calls=trainer.engine.gradient_accumulation_steps(),
            note=getattr(trainer, "chunk_note", None),
        )
        if self.flops_per_image is None:
            self.flops_per_image = cfg_flops(trainer.models.ref_unet, trainer.models, self.device)
        F, peak = self.flops_per_image, a.peak_tflops
        n = row["images_per_rank"]
        c.reset()
        m_roll = {}
        with measure(m_roll):
            traj, rewards, parts, _ = trainer.rollout(0)
        ph["sample"] = phase(m_roll["s"] - c.ref_s, m_roll["mb"], n, c.images["sample"] * F, peak)
        ph["reference"] = phase(c.ref_s, m_roll["mb"], n, c.images["reference"] * F, peak)
        row["cfg_images"] = dict(c.images)
        self.add_row(row)
        cond, uncond = trainer.models.encode_prompts(traj.flat_prompts), trainer.models.encode_prompts([""])
        if stage.pass1:
            c.reset()
            m1 = {}
            with measure(m1):
                r = twopass.policy_log_ratios(trainer.engine, traj, cond, uncond, trainer.cfg, trainer.impl)
            ph["pass1"] = phase(m1["s"], m1["mb"], n, c.images["pass1"] * F, peak)
            row["noise_floor"] = noise_floor(r, traj.log_ratio_old)
            row["cfg_images"]["pass1"] = c.images["pass1"]
            self.add_row(row)
        opt = {"s": 0.0}
        add_timer(trainer.engine.optimizer, "step", opt)
        if stage.ratio:
            row["overhead"] = self.overhead(trainer, traj, rewards, cond, uncond, opt)
            return
        c.reset()
        m_train = {}
        with measure(m_train):
            record = trainer.train_epoch(0, traj, rewards, parts, 0.0, 0, types.SimpleNamespace(agreed=lambda d: False))
        pass2_s = m_train["s"] - opt["s"] - c.pass1_s
        ph["pass2"] = phase(pass2_s, m_train["mb"], n, 3 * c.images["pass2"] * F, peak)
        ph["optimizer"] = phase(opt["s"], m_train["mb"])
        if c.pass1_s:
            ph["pass1_in_steps"] = phase(c.pass1_s, m_train["mb"], n, c.images["pass1"] * F, peak)
        epoch_images = row["cfg_images"]["sample"] + row["cfg_images"]["reference"] + c.images["pass1"]
        epoch_flops = (epoch_images + 3 * c.images["pass2"]) * F
        ph["epoch"] = phase(m_roll["s"] + m_train["s"], max(m_roll["mb"], m_train["mb"]), n, epoch_flops, peak)
        row["cfg_images"].update(pass2=c.images["pass2"], pass1_in_steps=c.images["pass1"])
        row["steps"] = dict(applied=record["steps_applied"], skipped=record["steps_skipped"])
        if record["steps_skipped"]:
            row["status"] = "ok, but a step was skipped (no backward): its times are not a step's"

    def overhead(self, trainer, traj, rewards, cond, uncond, opt):
        """Two-pass step (pass 1 skipped: first step after sampling) vs plain forward + backward of the same rows."""
        plain = copy.deepcopy(trainer.models.ref_unet).requires_grad_(True)  # theta_old, the policy's compute dtype
        plain_s, step_s, opt_s = [], [], []
        for _ in range(self.args.repeats):
            plain_s.append(plain_fwd_bwd(plain, traj, cond, uncond, trainer.cfg))
            opt["s"] = 0.0
            sync()
            t0 = time.perf_counter()
            stats = twopass.prdp_step(trainer.engine, traj, rewards, cond, uncond, trainer.cfg, trainer.impl, True)
            sync()
            step_s.append(time.perf_counter() - t0)
            opt_s.append(opt["s"])
            if "skipped" in stats:
                raise RuntimeError(f"prdp_step skipped the update ({stats['skipped']}): the ratio would be wrong")
        i = min(range(len(step_s)), key=lambda j: step_s[j] - opt_s[j])
        best_plain = min(plain_s)
        pairs = sorted((step_s[j] - opt_s[j]) / plain_s[j] for j in range(len(step_s)))  # each under one load
        return dict(
            pass1="skipped (first step after sampling)",
            twopass_step_s=step_s[i],
            optimizer_s=opt_s[i],
            plain_fwd_bwd_s=best_plain,
            overhead_ratio=(step_s[i] - opt_s[i]) / best_plain,
            overhead_ratio_incl_optimizer=step_s[i] / (best_plain + opt_s[i]),
            overhead_ratio_median_of_pairs=pairs[len(pairs) // 2],
            backward_calls=len(twopass.chunks(trainer.cfg, traj.seeds.numel())),
            repeats=dict(twopass_step_s=step_s, optimizer_s=opt_s, plain_fwd_bwd_s=plain_s),
        )

    def add_row(self, row):
        if row not in self.rows:
            self.rows.append(row)
        self.write()

    def finish(self):
        by = {r["stage"]: r for r in self.rows}
        t10, t50 = by.get("channels-last"), by.get("T50")
        if t10 and t50 and "epoch" in t10.get("phases", {}) and "epoch" in t50.get("phases", {}):
            self.summary["peak_mb_T50_over_T10"] = t50["phases"]["epoch"]["mb"] / t10["phases"]["epoch"]["mb"]
        self.summary["wall_s"] = time.perf_counter() - self.start
        self.write()
        if self.args.json:
            self.say(f"wrote {self.args.json}")

    def write(self):
        """The whole record, rewritten (atomically) after every phase: a run stopped by a time limit keeps its rows."""
        if not (self.args.json and self.rank == 0):
            return
        import deepspeed

        out = dict(
            self.meta,
            deepspeed=deepspeed.__version__,
            world_size=self.world,
            env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET") if k in os.environ},
            torch_threads=torch.get_num_threads(),
            settings=dict(
                vars(self.args),
                cfg_forward_flops_per_image=self.flops_per_image,
                memory="cuda_max_allocated_per_phase" if CUDA else "process_max_rss_so_far",
                levers=self.levers,
            ),
            rows=self.rows,
            summary=self.summary,
        )
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, path)

    def print_row(self, row):
        ph = row.get("phases", {})
        cells = []
        for name in ("sample", "reference", "pass1", "pass2", "optimizer", "epoch"):
            if name in ph:
                p = ph[name]
                mfu = f" {100 * p['mfu']:.0f}%" if p.get("mfu") is not None else ""
                cells.append(f"{name} {p['s']:.3g}s{mfu}")
        epoch = ph.get("epoch")
        extra = f"; {epoch['images_per_s']:.3g} img/s, peak {epoch['mb']:.0f} MB" if epoch else ""
        if "noise_floor" in row:
            extra += f"; noise rms {row['noise_floor']['rms']:.2e} max {row['noise_floor']['max']:.2e}"
        if "overhead" in row:
            o = row["overhead"]
            extra += (
                f"; overhead ratio {o['overhead_ratio']:.3f} (with the optimizer "
                f"{o['overhead_ratio_incl_optimizer']:.3f}; median of the runs' own "
                f"{o['overhead_ratio_median_of_pairs']:.3f})"
            )
        self.say(
            f"[{row['stage']}] {row['status']} ({row['wall_s']:.1f} s; levers {row['levers']}): "
            + ", ".join(cells)
            + extra
        )


def device_name():
    if CUDA:
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), TRITON_INTERPRET=1"


def main():
    plan = GPU_PLAN if CUDA else CPU_PLAN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=("tiny", "sd14"), default="sd14" if CUDA else "tiny")
    ap.add_argument(
        "--stages", default=",".join(s.name for s in plan if s.default), help="subset of the plan, in plan order"
    )
    ap.add_argument("--K", type=int, default=1, help="optimizer steps per epoch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    ap.add_argument("--lever", action="append", default=[], metavar="NAME=OVR;OVR", help="add or replace a lever")
    ap.add_argument("--ds-config", default=str(train_mod.DEFAULT_DS_CONFIG), help="DeepSpeed JSON of every stage")
    ap.add_argument("--deadline-s", type=float, default=470.0 if CUDA else 300.0, help="whole run, from start")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every stage's budget")
    ap.add_argument("--min-stage-s", type=float, default=10.0, help="a stage with less time left is not run")
    ap.add_argument("--repeats", type=int, default=1 if CUDA else 3, help="ratio stage: runs of each side (min)")
    ap.add_argument("--peak-tflops", type=float, default=790.0 if CUDA else None)
    ap.add_argument("--json", help="write the record here (rewritten after every phase)")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in plan})
    if unknown:
        raise SystemExit(f"--stages: {unknown} not in the plan {[s.name for s in plan]}")
    rank, world, device = init_distributed()
    import deepspeed

    deepspeed.utils.logger.setLevel("WARNING")
    train_mod.load_models = sd14_loader(train_mod.load_models, device)
    bench = Bench(args, rank, world, device)
    bench.say(f"device: {bench.meta['device']}; unet {args.unet}; stages {wanted}; deadline {args.deadline_s:.0f} s")
    if not CUDA:
        bench.say("NO GPU: fp32 tiny UNet, Triton interpreted: the times check the wiring, except the overhead ratio")
    bench.run([s for s in plan if s.name in wanted])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
