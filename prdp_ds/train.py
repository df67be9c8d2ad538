"""PRDP training (paper Algorithm 1, docs/design.md §6) on a DeepSpeed engine.

    python -m prdp_ds.train [--config ds_configs/zero2.json] [--preset demo] [--set key=value ...]
    deepspeed --num_gpus 8 --module prdp_ds.train --config ds_configs/zero2.json --preset small ...
    torchrun --nproc_per_node 8 -m prdp_ds.train --config ds_configs/zero2.json --preset small ...

Per epoch: draw this rank's prompt groups, sample them with the current policy (no grad),
score them, then K optimizer steps, each exact over whole trajectories (prdp_ds.twopass).
`algo.name: ddpo` takes DDPO's steps instead (prdp_ds.ddpo) on the same rollouts, `algo.name: grpo` GRPO's
(prdp_ds.grpo), `algo.name: dpok` DPOK's with its value function (prdp_ds.dpok), and `algo.online: false` reads
the rollouts from a dataset sampled once from the reference (prdp_ds.offline).
"""

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from prdp_ds import chunking, rundir
from prdp_ds import config as config_lib
from prdp_ds.checkpoint import load_aux_state, load_checkpoint, save_checkpoint
from prdp_ds.config import sde_window
from prdp_ds.ddpo import PerPromptStatTracker, advantages, ddpo_step
from prdp_ds.dpok import ValueFunction, dpok_step
from prdp_ds.engine import batch_arithmetic, build_ds_config, load_ds_json, make_engine, make_optimizer, run_on_ranks
from prdp_ds.grpo import group_advantages, grpo_step, step_subset
from prdp_ds.metrics import RunLog, logratio_noise, peak_memory_mb
from prdp_ds.models import load_models
from prdp_ds.offline import OfflineDataset, dataset_meta
from prdp_ds.prompts import PromptSampler, load_prompts, rank_slice
from prdp_ds.rewards import NonFiniteRewardError, build_reward
from prdp_ds.sampler import image_seeds, sample, step_schedule
from prdp_ds.twopass import policy_log_ratios, prdp_step

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"
EVAL_EPOCH = 2**31 - 1  # eval grids draw seeds as if from this epoch id: never a training epoch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="prdp_ds.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="DeepSpeed JSON (default: ds_configs/zero2.json)")
    p.add_argument(
        "--preset", default=None, help=f"named training preset (default: demo); one of {config_lib.preset_names()}"
    )
    p.add_argument("--train-config", default=None, help="training config YAML (instead of --preset)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=2e-5"
    )
    p.add_argument("--output-dir", default="runs/prdp", help="where config, metrics, samples and checkpoints go")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue the run in --output-dir: 'latest' (its newest checkpoint; none: start anew) or a checkpoint dir",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over in an --output-dir that holds a run: its contents move to OUTPUT_DIR.replaced-<time>",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # added by the deepspeed launcher
    return p.parse_args(argv)


def resolve_impl(name, device):
    return ("triton" if device.type == "cuda" else "torch") if name == "auto" else name


def _mean_all(values, device):
    """Mean over ranks of each float in a dict (non-finite values propagate)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _gather_prompts(prompts):
    """Each rank's list of prompts -> the list of all ranks' lists (on every rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [list(prompts)]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(prompts))
    return out


def _gather(t):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


class Preemption:
    """SIGTERM sets a flag; the loop finishes its optimizer step, checkpoints and exits 0."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device):
        flag = torch.tensor([float(self.requested)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


class Trainer:
    """One run. claim: the run directory's prdp_ds.rundir.Claim (the checkpoint to resume and the changes a resume
    makes); None trains from scratch in output_dir unchecked (benchmarks)."""

    def __init__(self, cfg, ds_json, output_dir, rank, world, device, claim=None):
        self.cfg, self.output_dir, self.rank, self.world, self.device = cfg, Path(output_dir), rank, world, device
        self.claim = claim or rundir.Claim(None, {}, [])
        self.reward_fn = build_reward(cfg.reward, device)  # fails here, before any sampling
        # checks the JSON and the split before any model loads; 'auto' chunk sizes are resolved below
        self.ds_config = build_ds_config(ds_json, chunking.cpu_rule(cfg, world), world)
        self.models = load_models(cfg.model.pretrained, cfg.model.seed)
        if cfg.model.lora_rank != 0:  # adapters only; the reference is the same UNet with them disabled
            self.models.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
        p, tok = cfg.prompts, self.models.tokenizer
        self.prompts = load_prompts(
            p.source, p.template, p.field, p.dedupe, p.over_length, tok.lengths, tok.context_length
        )
        self.prompt_sampler = PromptSampler.for_set(self.prompts, cfg.train.prompts_per_epoch, cfg.train.seed)
        on_gpu = device.type == "cuda"
        # frozen parts in the policy's compute dtype: at theta = ref both round alike and r = 0 exactly
        bf16 = self.ds_config["bf16"]["enabled"]
        self.models.to(device, frozen_dtype=torch.bfloat16 if bf16 else None)
        self.models.apply_options(cfg.model.channels_last, cfg.model.compile)
        if cfg.model.gradient_checkpointing:
            self.models.unet.enable_gradient_checkpointing()
        # the checkpoint to resume (None: a fresh run); its config fixes 'auto' chunk sizes
        self.ckpt = self.claim.checkpoint
        # 'auto' chunk sizes: before the engine, whose gradient_accumulation_steps is the chunk count
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.cfg, self.chunk_note = chunking.resolve(cfg, world, device, self.models, dtype, self.ckpt)
        cfg = self.cfg
        self.arith = batch_arithmetic(cfg, world)
        self.ds_config = build_ds_config(ds_json, cfg, world)
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
        unet = self.models.unet
        self.value = None
        if cfg.algo.name == "dpok":  # DPOK's learned baseline beside the policy (prdp_ds.dpok), seeded by train.seed
            text_dim = self.models.encode_prompts([""]).shape[-1]
            self.value = ValueFunction(cfg, self.models.latent_shape, text_dim, device)
        trainable = [q for q in unet.parameters() if q.requires_grad]
        self.engine = make_engine(unet, self.ds_config, make_optimizer(trainable, cfg, on_gpu and not offload))
        self.models.unet = self.engine  # the policy is called through the engine
        self.impl = resolve_impl(cfg.loss.impl, device)
        s = cfg.sampler
        self.window = sde_window(s)
        full = step_schedule(self.models.scheduler, s.num_steps, s.eta, s.spacing, s.noise_level, self.window)
        self.schedule = full.window(*self.window).to(device)  # the recorded steps' (a, b, sigma)
        self.log = RunLog(output_dir, enabled=rank == 0)
        self.bad_in_a_row = 0
        ddpo = cfg.algo.name == "ddpo"
        self.tracker = PerPromptStatTracker(cfg.ddpo.buffer_size, cfg.ddpo.min_count) if ddpo else None
        self.offline = (
            None
            if cfg.algo.online
            else OfflineDataset(
                cfg.algo.offline_dir or self.output_dir / "offline",
                dataset_meta(cfg, world, self.prompts.fingerprint, device.type),
                rank,
            )
        )

    def say(self, text):
        if self.rank == 0:
            tqdm.write(text)

    def warn(self, text):
        """A problem seen on this rank: printed by that rank, whichever it is."""
        tqdm.write(f"[rank {self.rank}] {text}", file=sys.stderr)

    def announce(self):
        if self.rank != 0:
            return
        print("resolved training config:\n" + config_lib.dump(self.cfg), flush=True)
        print("batch arithmetic: " + json.dumps(self.arith), flush=True)
        if self.chunk_note:
            print(self.chunk_note, flush=True)
        print(self.prompts.summary(), flush=True)
        if self.prompt_sampler.repeats_within_epoch:
            print(
                f"warning: train.prompts_per_epoch={self.cfg.train.prompts_per_epoch} exceeds the {len(self.prompts)} "
                "prompts of the set: prompts repeat within an epoch",
                flush=True,
            )
        if self.ds_config["bf16"]["enabled"]:
            print("precision: bf16 UNets (fp32 master weights and gradient sums)", flush=True)
        elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            print("precision: fp32 (bf16.enabled is false in the DeepSpeed JSON)", flush=True)
        else:
            print("precision: fp32 (no bf16-capable accelerator found)", flush=True)
        for note in self.claim.notes:
            print(note, flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.ckpt is None:  # a fresh start: nothing of an earlier attempt governs any epoch
            (self.output_dir / rundir.HISTORY).unlink(missing_ok=True)
        if self.ckpt is None or not (self.output_dir / "config.yaml").is_file():  # the config the run started with
            (self.output_dir / "config.yaml").write_text(config_lib.dump(self.cfg))

    def rollout(self, epoch, from_reference=False, policy_is_reference=False):
        """Sample this rank's groups for `epoch` with the policy (or the reference) and score them
        -> (traj, rewards (G,B), parts, seconds). policy_is_reference: no optimizer step applied since a fresh
        start, so the policy is bit-identical to the reference and the sampler skips the reference pass."""
        cfg, s = self.cfg, self.cfg.sampler
        models = dataclasses.replace(self.models, unet=self.models.ref_unet) if from_reference else self.models
        start = time.perf_counter()
        group_ids = rank_slice(cfg.train.prompts_per_epoch, self.rank, self.world)
        all_prompts = self.prompt_sampler.prompts(self.prompts, epoch)
        seeds = image_seeds(cfg.train.seed, epoch, group_ids, cfg.train.images_per_prompt)
        traj = sample(
            models,
            [all_prompts[g] for g in group_ids],
            seeds,
            s.num_steps,
            s.guidance_scale,
            s.eta,
            s.batch_size,
            cfg.loss.reduction,
            self.impl,
            spacing=s.spacing,
            ref_batch_size=s.ref_batch_size,
            policy_is_reference=policy_is_reference,
            noise_level=s.noise_level,
            window=self.window,
        )
        G, B = seeds.shape
        try:
            total, parts = self.reward_fn(traj.images.flatten(0, 1), traj.flat_prompts)
        except NonFiniteRewardError as err:  # the step is skipped on every rank (prdp_step)
            self.warn(f"epoch {epoch}: {err}")
            total = torch.full((G * B,), float("nan"), device=self.device)
            parts = {name: total for name in self.reward_fn.components}
        return traj, total.reshape(G, B).to(self.device), parts, time.perf_counter() - start

    def eval_grid(self, epoch):
        """Sample the fixed grid (eval prompts x fixed seeds, the same every epoch), save it, and score it
        -> {'eval/reward_mean': mean total, 'eval/<component>': mean} (paired across epochs: same noise)."""
        o = self.cfg.output
        prompts = [self.cfg.prompts.template.format(p) for p in o.eval_prompts]
        seeds = image_seeds(self.cfg.train.seed, EVAL_EPOCH, range(len(prompts)), o.eval_images)
        traj = sample(
            self.models,
            prompts,
            seeds,
            self.cfg.sampler.num_steps,
            self.cfg.sampler.guidance_scale,
            self.cfg.sampler.eta,
            self.cfg.sampler.batch_size,
            with_reference=False,
            spacing=self.cfg.sampler.spacing,
            noise_level=self.cfg.sampler.noise_level,
            window=self.window,
        )
        self.log.save_grid(epoch, traj.images)
        try:
            total, parts = self.reward_fn(traj.images.flatten(0, 1), traj.flat_prompts)
        except NonFiniteRewardError as err:
            self.warn(f"epoch {epoch}: the sample grid's reward: {err}")
            return {}
        return {"eval/reward_mean": total.mean().item(), **{f"eval/{k}": v.mean().item() for k, v in parts.items()}}

    def train_epoch(self, epoch, traj, rewards, parts, sample_s, first_k, preempt, so_far=None):
        """Optimizer steps first_k..K-1 on one rollout -> the epoch's metrics record (SystemExit on
        preemption or too many bad steps). so_far: the statistics of steps 0..first_k-1 from a mid-epoch
        checkpoint ({'steps', 'noise', 'sample_s', 'train_s'}), so that the record covers the whole epoch."""
        cfg = self.cfg
        cond = self.models.encode_prompts(traj.flat_prompts)
        uncond = self.models.encode_prompts([""])
        start = time.perf_counter()
        if self.tracker is not None:  # DDPO: this epoch's rewards enter the tracker once
            tracker_before = self.tracker.state_dict()
            adv = advantages(self.tracker, traj, rewards, cfg.ddpo)
        elif cfg.algo.name == "grpo":  # from this epoch's rewards alone: a resume recomputes them
            adv = group_advantages(rewards, cfg.grpo.adv_clip)
        so_far = so_far or {"steps": [], "noise": {}, "sample_s": 0.0, "train_s": 0.0}
        value_stats = so_far.get("value", {})
        if self.value is not None:  # DPOK: V learns from this epoch's rollout once (a mid-epoch resume loaded it)
            if first_k == 0:
                value_stats = self.value.fit(traj, cond, rewards, epoch)
            adv = self.value.advantages(traj, cond, rewards)
        sample_s += so_far["sample_s"]
        noise = self.logratio_noise(epoch, traj, cond, uncond) if first_k == 0 else so_far["noise"]
        steps, k = list(so_far["steps"]), first_k
        while k < cfg.train.steps_per_epoch:
            if cfg.algo.name == "prdp":
                stats = prdp_step(
                    self.engine, traj, rewards, cond, uncond, cfg, self.impl, first_step=k == 0 and cfg.algo.online
                )
            elif cfg.algo.name == "ddpo":
                stats = ddpo_step(self.engine, traj, adv, cond, uncond, cfg, self.impl)
            elif cfg.algo.name == "dpok":
                stats = dpok_step(self.engine, traj, adv, cond, uncond, cfg, self.impl)
            else:
                steps_k = step_subset(cfg, epoch, k, rewards.device)
                stats = grpo_step(self.engine, traj, adv, cond, uncond, cfg, self.impl, steps_k)
            k += 1
            self._handle_bad(epoch, k, stats, traj)
            steps.append(stats)
            if preempt.agreed(self.device) and k < cfg.train.steps_per_epoch:
                self.say(f"SIGTERM: checkpointing epoch {epoch} after step {k} and exiting")
                state = self.state(epoch, k, tracker_before if self.tracker is not None else None)
                elapsed = so_far["train_s"] + time.perf_counter() - start
                save_checkpoint(
                    self.engine,
                    cfg,
                    self.output_dir,
                    state,
                    self.rank,
                    rollout=(traj, rewards, parts) if self.offline is None else None,
                    epoch_so_far={
                        "steps": steps,
                        "noise": noise,
                        "sample_s": sample_s,
                        "train_s": elapsed,
                        "value": value_stats,
                    },
                    aux_state=self.aux_state(),
                )
                raise SystemExit(0)
        train_s = so_far["train_s"] + time.perf_counter() - start
        all_rewards = _gather(rewards.reshape(-1))
        applied = [s for s in steps if "skipped" not in s]
        local_keys = ("clip_frac", "kl", "pred_err", "kl_penalty", "policy_loss", "adv_mean", "adv_std")
        local_keys += ("steps_trained",)
        keys = [key for key in local_keys if applied and key in applied[0]]
        local = {key: sum(s[key] for s in applied) / len(applied) for key in keys}
        components = {}
        for name, v in parts.items():
            v = _gather(v.reshape(-1).to(self.device))
            components.update(
                {f"reward/{name}": float(v.mean()), f"reward/{name}_std": float(v.std()) if v.numel() > 1 else 0.0}
            )
        n = all_rewards.numel()
        record = {
            "epoch": epoch,
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()) if n > 1 else 0.0,
            "num_images": n,
            "loss": sum(s["loss"] for s in applied) / len(applied) if applied else float("nan"),
            "grad_norm": sum(s["grad_norm"] for s in applied) / len(applied) if applied else float("nan"),
            "lr": self.engine.get_lr()[0],
            "steps_applied": len(applied),
            "steps_skipped": len(steps) - len(applied),
            **_mean_all(local, self.device),
            **value_stats,
            **components,
            **noise,
            "sample_s": sample_s,
            "train_s": train_s,
            "images_per_s": n / max(sample_s + train_s, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        return record

    def logratio_noise(self, epoch, traj, cond, uncond):
        """Every output.noise_every epochs of online PRDP, before the epoch's first optimizer step (theta = theta_old):
        r recomputed by pass 1 minus r recorded by the sampler -> metrics.logratio_noise's record, or {}.
        Rank 0 warns when its max exceeds loss.clip_range: the proximal clip of steps 2..K then acts on noise."""
        cfg = self.cfg
        every = cfg.output.noise_every
        if not (every and epoch % every == 0 and cfg.algo.online and cfg.algo.name == "prdp"):
            return {}
        r = policy_log_ratios(self.engine, traj, cond, uncond, cfg, self.impl)
        noise = logratio_noise(r, traj.log_ratio_old)
        if noise["logratio_noise_max"] > cfg.loss.clip_range:
            self.say(
                f"warning: epoch {epoch}: log-ratio noise (r recomputed at theta_old - r sampled) reaches "
                f"{noise['logratio_noise_max']:.3g} nats > loss.clip_range {cfg.loss.clip_range:.3g}: "
                "the clip of steps 2..K acts on numerical noise (precision: docs/outputs.md)"
            )
        return noise

    def state(self, epoch, step_in_epoch, tracker_state=None):
        """What trainer_state.json holds besides the engine: position, DDPO statistics (GRPO keeps none: its
        advantages and step subsets are functions of the rollout, the seed, the epoch and the step)."""
        state = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "algo": self.cfg.algo.name,
            "prompts": self.prompt_sampler.state_dict(epoch + 1),
        }
        if self.tracker is not None:
            state["ddpo_tracker"] = tracker_state or self.tracker.state_dict()
        return state

    def aux_state(self):
        """What checkpoints keep beside the engine and trainer_state.json: DPOK's value function, or None."""
        return None if self.value is None else self.value.state_dict()

    def _handle_bad(self, epoch, k, stats, traj):
        if "skipped" not in stats:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.warn(
            f"epoch {epoch} step {k}: skipped, non-finite {stats['skipped']} "
            f"(this rank's prompts: {traj.prompts}); {self.bad_in_a_row} bad step(s) in a row"
        )
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            self.say(
                f"stopping: {self.bad_in_a_row} bad steps in a row (train.max_bad_steps); "
                "the last complete checkpoint is intact"
            )
            raise SystemExit(3)

    def run(self):
        cfg, ckpt = self.cfg, self.ckpt
        start_epoch, first_k, rollout, so_far = 0, 0, None, None
        if ckpt is not None:
            state, rollout, so_far = load_checkpoint(self.engine, ckpt, self.rank, self.schedule, self.device)
            if "prompts" in state:
                self.prompt_sampler.check_state(state["prompts"])
            if self.tracker is not None:
                self.tracker.load_state_dict(state["ddpo_tracker"])
            if self.value is not None:
                self.value.load_state_dict(load_aux_state(ckpt, self.device))
            for group in self.engine.optimizer.param_groups:  # a changed train.lr takes effect (the rest is in cfg)
                group["lr"] = cfg.train.lr
            start_epoch, first_k = state["epoch"], state["step_in_epoch"]
            if first_k >= cfg.train.steps_per_epoch:
                start_epoch, first_k, rollout, so_far = start_epoch + 1, 0, None, None
            self.say(f"resumed from {ckpt} at epoch {start_epoch} step {first_k}")
        preempt = Preemption()  # before announcing: a launcher may signal as soon as it sees output
        self.announce()
        if self.claim.changes and self.rank == 0:
            rundir.record_changes(self.output_dir, self.claim.changes, start_epoch, first_k, ckpt)
            self.say(
                f"changed on resume, from epoch {start_epoch} step {first_k} on (recorded in {rundir.HISTORY}): "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.claim.changes.items())
            )
        if start_epoch >= cfg.train.epochs:
            self.say(f"nothing to train: the run is at epoch {start_epoch} and train.epochs is {cfg.train.epochs}")
        if self.offline is not None:
            self.say(f"offline mode: rollouts of the reference model in {self.offline.dir}")
            self.offline.build(cfg.train.epochs, lambda e: self.rollout(e, from_reference=True)[:3])
        bar = tqdm(range(start_epoch, cfg.train.epochs), disable=self.rank != 0, desc="epochs", dynamic_ncols=True)
        for epoch in bar:
            if rollout is not None:
                (traj, rewards, parts), sample_s = rollout, 0.0
                rollout = None
            elif self.offline is not None:
                (traj, rewards, parts), sample_s = self.offline.load(epoch, self.schedule, self.device), 0.0
                first_k = first_k if epoch == start_epoch else 0
            else:
                traj, rewards, parts, sample_s = self.rollout(epoch, policy_is_reference=ckpt is None and epoch == 0)
                first_k = 0
            record = self.train_epoch(epoch, traj, rewards, parts, sample_s, first_k, preempt, so_far)
            so_far = None
            last = epoch == cfg.train.epochs - 1
            if cfg.output.sample_every and (epoch % cfg.output.sample_every == 0 or last):
                record.update(self.eval_grid(epoch))
            resumed_from = epoch if epoch == start_epoch else None  # rows an interrupted attempt left go first
            self.log.log(record, resumed_from)
            self.log.log_prompts(epoch, _gather_prompts(traj.prompts), resumed_from)
            bar.set_postfix(reward=f"{record['reward_mean']:.4g}", loss=f"{record['loss']:.4g}")
            self.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if (
                last
                or (cfg.output.save_every and (epoch + 1) % cfg.output.save_every == 0)
                or preempt.agreed(self.device)
            ):
                save_checkpoint(
                    self.engine,
                    cfg,
                    self.output_dir,
                    self.state(epoch, cfg.train.steps_per_epoch),
                    self.rank,
                    aux_state=self.aux_state(),
                )
                self.log.plot_rewards()
                if preempt.requested:
                    self.say(f"SIGTERM: checkpointed epoch {epoch}, exiting")
                    raise SystemExit(0)
        self.log.close()


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_lib.resolve(
            args.preset if args.preset or args.train_config else "demo", args.train_config, args.set
        )
        ds_json = load_ds_json(args.config or DEFAULT_DS_CONFIG)
    except ValueError as err:
        sys.exit(f"prdp_ds.train: {err}")

    def train(rank, world, device):
        claim = rundir.agree(lambda: rundir.claim(args.output_dir, cfg, args.resume, args.restart), rank)
        sigterm = signal.getsignal(signal.SIGTERM)  # Trainer.run installs Preemption's handler
        try:
            Trainer(cfg, ds_json, args.output_dir, rank, world, device, claim).run()
        finally:
            signal.signal(signal.SIGTERM, sigterm)  # a caller that runs main in-process gets its own back
            claim.release()

    run_on_ranks("prdp_ds.train", train)


if __name__ == "__main__":
    main()
