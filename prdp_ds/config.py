"""Training configuration: dataclasses, named YAML presets, and `--set a.b=v` overrides.

Resolution order: dataclass defaults < preset (or --train-config FILE) < --set overrides. Every
key is checked against the dataclasses: unknown keys are rejected with the valid ones listed,
values are type-checked, then the resolved values against their key's range or choices (RANGES,
CHOICES) and each other (_relation_errors). All problems are reported at once, one line each, before
any model is built. The resolved config is printed once and saved with every checkpoint.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    # 'tiny' (random-weight test models), 'world' (the pretrained synthetic world), 'tiny_sd3' / 'tiny_flux' (random
    # flow-matching transformers) or a local diffusers folder: SD v1.x, SD3 / SD3.5 or FLUX.1 (docs/flow.md)
    pretrained: str = "tiny"
    seed: int = 0  # seed of the tiny models' random weights
    gradient_checkpointing: bool = False  # UNet activation checkpointing in pass 2 (use_reentrant=False)
    lora_rank: int = 0  # 0: finetune the full UNet; > 0: train only LoRA adapters of this rank (peft)
    lora_alpha: float = 0.0  # LoRA scale numerator (scale = alpha / rank); 0 means alpha = rank
    channels_last: bool = (
        False  # the frozen reference UNet in channels_last memory format (the policy stays contiguous)
    )
    compile: bool = False  # torch.compile the reference UNet's forward (reference pass); the engine's policy untouched


@dataclass
class SamplerConfig:
    num_steps: int = 50  # T, denoising steps per trajectory
    guidance_scale: float = 5.0  # w, classifier-free guidance scale (FLUX.1-dev: its distilled guidance input)
    eta: float = 1.0  # DDIM eta (policy std scale) in the SDE window; must be > 0
    noise_level: float = 0.7  # flow-matching models: Flow-GRPO's SDE noise level a in the SDE window (> 0)
    # steps [sde_start, sde_start + sde_steps) are stochastic and trained; the others deterministic (DDIM eta = 0 or
    # the flow ODE) and carry no log-ratio. sde_steps 0: every step (the paper's setting)
    sde_steps: int = 0
    sde_start: int = 0  # first step of the SDE window (0: the first denoising step)
    spacing: str = "uniform"  # DDIM timesteps: 'uniform' (the scheduler's own), 'quadratic' (more steps near t = 0)
    # or 'logsnr' (uniform in log-SNR: every step's |b|/sigma alike; sampler.ddim_timesteps)
    batch_size: int = 16  # images per UNet call while sampling (the CFG batch is twice that)
    # (image, step) rows per reference UNet call, run after sampling (CFG batch twice that; memory as batch_size would)
    ref_batch_size: int = 64


@dataclass
class LossConfig:
    kl_weight: float = 3e-5  # beta, KL weight (reward units per nat)
    clip_range: float = 1e-6  # epsilon, stepwise proximal clip range (nats)
    reduction: str = "sum"  # 'sum' (true log-likelihood, paper) or 'mean' over latent elements (rescales beta by D)
    impl: str = "auto"  # 'auto' (triton on CUDA, torch elsewhere), 'torch' or 'triton'


@dataclass
class TrainConfig:
    epochs: int = 100  # E, sampling rounds
    steps_per_epoch: int = 10  # K, optimizer steps per sampling round
    prompts_per_epoch: int = 32  # N, prompt groups per epoch over all ranks (divisible by the world size)
    images_per_prompt: int = 16  # B, images per prompt group
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip
    # images per pass-2 backward (the CFG batch is 2 x images x steps); 'auto': sized to the device (prdp_ds.chunking)
    images_per_chunk: int | str = 4
    steps_per_chunk: int | str = 1  # denoising steps per pass-2 backward; 'auto' as images_per_chunk
    memory_margin: float = 0.2  # fraction of the free device memory that 'auto' chunk sizing leaves unused, in [0, 1)
    seed: int = 0  # seeds prompts and per-image noise: (seed, epoch, group, image)
    max_bad_steps: int = 3  # stop after this many skipped (non-finite) steps in a row


@dataclass
class PromptsConfig:
    source: str = "animals"  # 'animals' (45 common animals) or a local .txt file, one prompt per line
    template: str = "{}"  # format string applied to each prompt, e.g. 'A painting of a {}'
    field: str = "prompt"  # jsonl / json / csv / parquet: the column holding the prompt ('caption' for Pick-a-Pic)
    dedupe: bool = True  # drop repeated prompts (counted and reported at start)
    over_length: str = "truncate"  # prompts longer than the text encoder's context: 'truncate' (as SD does) or 'drop'


@dataclass
class AlgoConfig:
    # 'prdp' (this paper), 'ddpo' (its baseline, docs/design.md §9), 'dpok' (its other named baseline) or 'grpo'
    # (Flow-GRPO/DanceGRPO)
    name: str = "prdp"
    online: bool = True  # False: offline mode (paper 4.3), train on trajectories sampled once from the reference
    offline_dir: str = ""  # offline dataset folder ('' means OUTPUT_DIR/offline); reused and completed if present


@dataclass
class DDPOConfig:
    clip_range: float = 1e-4  # PPO clip on the per-step ratio exp(logp_theta - logp_old)
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    per_prompt_norm: bool = True  # standardize rewards per prompt from its history (False: batch statistics, ablation)
    buffer_size: int = 16  # rewards kept per prompt in the statistics tracker (DDPO's default)
    min_count: int = 16  # history needed before a prompt's own statistics replace the batch's
    reduction: str = "mean"  # units of the PPO ratio's log-prob: 'mean' over latent elements (DDPO's code) or 'sum'


@dataclass
class GRPOConfig:
    # PPO clip on the per-step ratio exp(logp_theta - logp_old); 1e-4: Flow-GRPO config/base.py train.clip_range and
    # DanceGRPO fastvideo/train_grpo_flux.py --clip_range
    clip_range: float = 1e-4
    # advantages are clipped to [-adv_clip, adv_clip]; 5.0: DanceGRPO train_grpo_flux.py --adv_clip_max (Flow-GRPO too)
    adv_clip: float = 5.0
    # beta, weight of the per-step KL to the reference (0: off). Flow-GRPO config/base.py: train.beta = 0.0; its SD3.5
    # presets (config/grpo.py) set 0.01 (pickscore_sd3), 0.02 (clipscore_sd3), 0.04 (geneval_sd3, general_ocr_sd3), in
    # per-element-mean units; DanceGRPO uses no KL
    kl_weight: float = 0.0
    # fraction of each trajectory's T steps trained per optimizer step, in (0, 1]: DanceGRPO's timestep_fraction
    # (train_grpo_flux.py default 1.0; Flow-GRPO's presets 0.99); 1.0 trains every step
    step_fraction: float = 1.0
    reduction: str = "mean"  # units of the ratio's log-prob and of KL_t: 'mean' over latent elements (both) or 'sum'


@dataclass
class DPOKConfig:
    # Defaults: google-research dpok/train_online_pg.py's flags, named after each field.
    reward_weight: float = 100.0  # alpha, the reward's weight in the loss (--reward_weight)
    kl_weight: float = 0.01  # beta, the weight of the per-step KL to the reference (--kl_weight)
    clip_range: float = 1e-4  # the importance ratio is clipped to [1 - clip_range, 1 + clip_range] (--ratio_clip)
    reduction: str = "mean"  # units of the ratio's log-prob and of KL_t: 'mean' over latent elements or 'sum'
    value_lr: float = 1e-4  # the value function's AdamW learning rate (--v_lr)
    # AdamW steps of the value function per epoch. DPOK takes one per sampling round of --g_batch_size 6 images: an
    # epoch of N images matches its value steps per sampled image at N / 6 (the E1 arm: 128 images, 21)
    value_updates: int = 1
    value_steps: int = 5  # minibatch losses averaged into each value step (--v_step)
    value_batch_size: int = 256  # transitions (x_t, t) per value minibatch, of the world's (--v_batch_size: per GPU)
    value_width: int = 256  # width of the value network's three hidden layers (DPOK's ValueMulti)


@dataclass
class OutputConfig:
    save_every: int = 10  # epochs between checkpoints (the last epoch is always saved)
    sample_every: int = 5  # epochs between sample grids (samples/epoch_XXXX.png)
    eval_prompts: list[str] = field(default_factory=lambda: ["cat", "dog", "horse", "fox"])  # grid rows (templated)
    eval_images: int = 4  # grid columns: fixed seeds per eval prompt
    save_merged_unet: bool = False  # with LoRA: also save the UNet with the adapters merged (unet/) in checkpoints
    noise_every: int = 10  # epochs between log-ratio noise measurements (logratio_noise_*; one no-grad pass); 0: off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpok: DPOKConfig = field(default_factory=DPOKConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    reward: dict[str, typing.Any] = field(
        default_factory=lambda: {"brightness": 1.0}
    )  # name -> weight or {weight, options}


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


CHOICES = {
    "loss.reduction": ("sum", "mean"),
    "loss.impl": ("auto", "torch", "triton"),
    "algo.name": ("prdp", "ddpo", "grpo", "dpok"),
    "prompts.over_length": ("truncate", "drop"),
    "ddpo.reduction": ("sum", "mean"),
    "grpo.reduction": ("sum", "mean"),
    "dpok.reduction": ("sum", "mean"),
    "sampler.spacing": ("uniform", "quadratic", "logsnr"),
}
AUTO_OR_INT = ("train.images_per_chunk", "train.steps_per_chunk")  # a positive int or 'auto'


def _at_least(n):
    return lambda v: v >= n, f"at least {n}"


def has_one_field(template):
    """Whether `template` has '{}' as its only replacement field (what prdp_ds.prompts.load_prompts needs)."""
    try:
        return "\0" in template.format("\0")
    except (IndexError, KeyError, ValueError):
        return False


_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite float > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite float >= 0")
_NON_EMPTY = (lambda v: v != "", "a non-empty string")

# key -> (test, what is expected): the range of the key's (type-checked) value, whatever the other keys say. Keys
# in neither RANGES nor CHOICES: the bools, algo.offline_dir (any folder), output.eval_prompts (_relation_errors).
RANGES = {
    "model.pretrained": _NON_EMPTY,
    "model.seed": _at_least(0),
    "model.lora_rank": _at_least(0),
    "model.lora_alpha": (_NON_NEGATIVE[0], "a finite float >= 0 (0 means alpha = rank)"),
    "sampler.num_steps": _at_least(1),
    "sampler.guidance_scale": (_NON_NEGATIVE[0], "a finite float >= 0 (0: unconditional, 1: no guidance)"),
    "sampler.eta": (lambda v: 0 < v <= 1, "a float in (0, 1] (the policy needs sigma_t > 0)"),
    "sampler.noise_level": (lambda v: math.isfinite(v) and 0 < v <= 2, "a float in (0, 2] (the policy needs s > 0)"),
    "sampler.sde_steps": _at_least(0),
    "sampler.sde_start": _at_least(0),
    "sampler.batch_size": _at_least(1),
    "sampler.ref_batch_size": _at_least(1),
    "loss.kl_weight": _POSITIVE,
    "loss.clip_range": _POSITIVE,
    "train.epochs": _at_least(1),
    "train.steps_per_epoch": _at_least(1),
    "train.prompts_per_epoch": _at_least(1),
    "train.images_per_prompt": _at_least(1),
    "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two floats in [0, 1)"),
    "train.adam_eps": _POSITIVE,
    "train.grad_clip": (_NON_NEGATIVE[0], "a finite float >= 0 (0: no clipping)"),
    **{key: (lambda v: v == "auto" or v >= 1, "a positive int or 'auto'") for key in AUTO_OR_INT},
    "train.memory_margin": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.seed": _at_least(0),
    "train.max_bad_steps": _at_least(1),
    "prompts.source": _NON_EMPTY,
    "prompts.template": (has_one_field, "a format string with '{}' as its only replacement field"),
    "prompts.field": _NON_EMPTY,
    "ddpo.clip_range": _POSITIVE,
    "ddpo.adv_clip": _POSITIVE,
    "ddpo.buffer_size": _at_least(1),
    "ddpo.min_count": _at_least(1),
    "grpo.clip_range": _POSITIVE,
    "grpo.adv_clip": _POSITIVE,
    "grpo.kl_weight": _NON_NEGATIVE,
    "grpo.step_fraction": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "dpok.reward_weight": _POSITIVE,
    "dpok.kl_weight": _NON_NEGATIVE,
    "dpok.clip_range": _POSITIVE,
    "dpok.value_lr": _POSITIVE,
    "dpok.value_updates": _at_least(1),
    "dpok.value_steps": _at_least(1),
    "dpok.value_batch_size": _at_least(1),
    "dpok.value_width": _at_least(1),
    "output.save_every": _at_least(0),
    "output.sample_every": _at_least(0),
    "output.eval_images": _at_least(1),
    "output.noise_every": _at_least(0),
    "reward": (lambda v: len(v) > 0, "a non-empty mapping name -> weight or {weight, options}"),
}


def _check_value(key, value, typ):
    """`value` converted to the key's type (YAML's '1e-5' string to float), or ConfigError; ranges are checked later."""
    if key in AUTO_OR_INT:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{key}: expected a positive int or 'auto', got {value!r}")
        return value
    origin = typing.get_origin(typ)
    if typ is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads '1e-5' as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _relation_errors(cfg):
    """One line per key whose value the other keys rule out (each value already in its own range)."""
    t, d, errors = cfg.train, cfg.ddpo, []
    s = cfg.sampler
    if s.sde_start + s.sde_steps > s.num_steps or (s.sde_steps == 0 and s.sde_start > 0):
        errors.append(
            f"sampler.sde_start: expected the SDE window [sde_start, sde_start + sde_steps) inside the "
            f"{s.num_steps} steps (sde_steps 0 takes every step and needs sde_start 0), got sde_start {s.sde_start} "
            f"with sde_steps {s.sde_steps}"
        )
    if cfg.algo.name in ("prdp", "grpo") and t.images_per_prompt == 1:
        why = "its loss compares pairs of" if cfg.algo.name == "prdp" else "its advantages standardize within"
        errors.append(
            f"train.images_per_prompt: expected at least 2 with algo.name {cfg.algo.name!r} ({why} "
            "a prompt's images), got 1"
        )
    if cfg.algo.name in ("grpo", "dpok") and not cfg.algo.online:
        errors.append(
            f"algo.online: expected true with algo.name {cfg.algo.name!r} (its ratio is to the sampling policy: on "
            "fixed reference rollouts the clip would zero its gradient once the policy moves), got False"
        )
    if d.buffer_size >= 1 and d.min_count > d.buffer_size:
        errors.append(f"ddpo.min_count: expected at most ddpo.buffer_size = {d.buffer_size}, got {d.min_count}")
    if cfg.algo.name == "ddpo" and d.per_prompt_norm and t.images_per_prompt == 1 and d.min_count == 1:
        errors.append(
            "ddpo.min_count: expected at least 2 with train.images_per_prompt 1 and ddpo.per_prompt_norm (a prompt's "
            "first reward, alone in its history, would be standardized by itself to advantage 0), got 1"
        )
    if cfg.output.sample_every > 0 and not cfg.output.eval_prompts:
        errors.append("output.eval_prompts: expected at least one prompt while output.sample_every > 0, got []")
    return errors


def sde_window(s):
    """(start, stop): the stochastic steps of each trajectory, the ones the rollout records and the losses train.
    s: the sampler section, or anything with its num_steps, sde_steps and sde_start (prdp_ds.evaluate's arguments)."""
    return (s.sde_start, s.sde_start + s.sde_steps) if s.sde_steps else (0, s.num_steps)


def recorded_steps(cfg):
    """T_sde: the steps in the SDE window (sde_window); T when every step is stochastic."""
    start, stop = sde_window(cfg.sampler)
    return stop - start


# sampler keys added after offline datasets and evaluations were first recorded (meta.json, settings.json): recorded
# only when not at their default, so that the records made before them still match
LATER_SAMPLER_KEYS = ("noise_level", "sde_steps", "sde_start")


def later_sampler_settings(values):
    """{name: value} of LATER_SAMPLER_KEYS in `values` (a mapping) that differ from SamplerConfig's defaults."""
    default = SamplerConfig()
    return {k: values[k] for k in LATER_SAMPLER_KEYS if values[k] != getattr(default, k)}


def trained_steps(cfg):
    """Denoising steps of each trajectory that one optimizer step trains: T_sde (recorded_steps), or with algo.name
    'grpo' max(1, int(grpo.step_fraction * T_sde)) (DanceGRPO's int(T * timestep_fraction), at least one)."""
    T = recorded_steps(cfg)
    return max(1, int(cfg.grpo.step_fraction * T)) if cfg.algo.name == "grpo" else T


def _value_errors(cfg):
    """One line per value of a type-checked Config outside its key's choices or range, then per broken relation."""
    errors = []
    for key in valid_keys():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if key in CHOICES and value not in CHOICES[key]:
            errors.append(f"{key}: expected one of {CHOICES[key]}, got {value!r}")
        elif key in RANGES and not RANGES[key][0](value):
            errors.append(f"{key}: expected {RANGES[key][1]}, got {value!r}")
    return errors + _relation_errors(cfg)


def valid_keys(cls=Config, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default):
            keys += valid_keys(f.default_factory().__class__, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _apply(obj, data, errors, prefix=""):
    """Set the keys of mapping `data` on dataclass `obj`, type-checked; one line per bad key is appended to `errors`
    (that key keeps its value)."""
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            errors.append(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
            continue
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                _apply(current, value, errors, key + ".")
            else:
                errors.append(f"{key}: expected a mapping of {key}.* keys, got {value!r}")
            continue
        try:
            setattr(obj, name, _check_value(key, value, hints[name]))
        except ConfigError as err:
            errors.append(str(err))


def _build(layers, errors=()):
    """The dataclass defaults with each mapping of `layers` applied in order, then every value checked (ranges,
    choices, relations). Raises ConfigError with one line per problem, `errors` (found earlier) first."""
    cfg, errors = Config(), list(errors)
    for data in layers:
        _apply(cfg, data, errors)
    errors += _value_errors(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def parse_override(text):
    """'a.b=v' -> {'a': {'b': v}}, v parsed as YAML (so 1e-5, true, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    value = yaml.safe_load(raw) if raw else ""
    node = {}
    out = node
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def preset_names():
    return sorted(p.name[:-5] for p in resources.files("prdp_ds.presets").iterdir() if p.name.endswith(".yaml"))


def load_yaml(path):
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read training config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path}: expected a mapping at the top level")
    return data


def resolve(preset=None, config_file=None, overrides=()):
    """Build a Config from defaults, a preset name or YAML file, and --set overrides. Every value is checked
    (type, range, choices, relations) before it returns: ConfigError with one line per problem, all of them."""
    if preset and config_file:
        raise ConfigError("give --preset or --train-config, not both")
    layers, errors = [], []
    if preset:
        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")
        layers.append(load_yaml(resources.files("prdp_ds.presets") / f"{preset}.yaml"))
    elif config_file:
        layers.append(load_yaml(config_file))
    for text in overrides:
        try:
            layers.append(parse_override(text))
        except ConfigError as err:
            errors.append(str(err))
    return _build(layers, errors)


# Keys a resume may change: they set how fast, how long or how visibly a run computes, not what it computes (the
# learning rate, the epoch count, the tolerance for bad steps, memory and speed options, logging and checkpoint
# cadence). They take effect from the resumed epoch and the run's config_history.jsonl records it (prdp_ds.rundir). A
# name ending in '.' covers its section. A resume that changes any other key is refused: those keys define the
# trajectories' distribution (model, sampler), the data (prompts, seeds, image counts) or the objective (loss, algo).
RESUME_CHANGEABLE = (
    "train.lr",
    "train.epochs",
    "train.max_bad_steps",
    "train.images_per_chunk",
    "train.steps_per_chunk",
    "train.memory_margin",
    "sampler.batch_size",
    "sampler.ref_batch_size",
    "loss.impl",
    "model.gradient_checkpointing",
    "model.channels_last",
    "model.compile",
    "output.",
)


def flat(cfg):
    """{'section.key': value} of every key of a Config ('reward' is one key: its whole mapping)."""
    out = {}
    for key in valid_keys():
        section, _, name = key.rpartition(".")
        out[key] = getattr(getattr(cfg, section) if section else cfg, name)
    return out


def resume_changes(saved, new):
    """The keys whose values differ between a checkpoint's config (`saved`) and this run's (`new`) ->
    (refused, changed), each {key: (saved value, new value)}: `changed` holds the RESUME_CHANGEABLE keys, `refused`
    the rest. A chunk size of 'auto' in `new` is no change: the resume takes the checkpoint's (prdp_ds.chunking)."""
    old, now = flat(saved), flat(new)
    refused, changed = {}, {}
    for key in valid_keys():
        if old[key] == now[key] or (key in AUTO_OR_INT and now[key] == "auto"):
            continue
        can = any(key == c or (c.endswith(".") and key.startswith(c)) for c in RESUME_CHANGEABLE)
        (changed if can else refused)[key] = (old[key], now[key])
    return refused, changed


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(data):
    """A Config from a (saved) config mapping, checked as `resolve` checks one."""
    return _build([data])


def dump(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
