"""Rewards: black-box scorers of images, a registry by name, and weighted sums (docs/design.md §12).

A reward is a callable (images, prompts) -> scores: images (n, 3, H, W) float in [0, 1], prompts a
list of n strings, scores (n,) float. It runs without grad. A reward is made by a factory
registered under a name; `build_reward` turns a config such as

    {jpeg_compressibility: 1.0, brightness: {weight: 0.5}, "my_pkg.scores:sharpness": 2.0}

into a `CombinedReward`, whose call returns the weighted total and each component's scores.
A key holding ':' names a user's callable "module:function" with the same signature (given
options, the function is a factory called with them that returns the callable); it is checked when
built (importable, callable, takes (images, prompts)). Every call's scores are checked (`check_scores`):
(n,) finite numbers. Named combinations (COMBINATIONS) expand to their components.
"""

from __future__ import annotations

import importlib
import inspect
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

_REGISTRY = {}  # name -> factory(device, **options) -> reward callable

# Rewards defined in other modules: name -> "module:factory", imported the first time the name is used
# (this module imports none of them).
BUILTIN_REWARDS = {
    "hpsv2": "prdp_ds.reward_models:hpsv2",
    "pickscore": "prdp_ds.reward_models:pickscore",
    "aesthetic": "prdp_ds.reward_models:aesthetic",
    "world_aesthetic": "prdp_ds.world.rewards:world_aesthetic",
    "world_alignment": "prdp_ds.world.rewards:world_alignment",
    "world_judge": "prdp_ds.world.rewards:world_judge",
}

# The paper's multi-reward run (Table 3): 10 PickScore + 2 HPSv2 + 0.05 Aesthetic.
COMBINATIONS = {"multi_reward": {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}}


class RewardError(ValueError):
    """A reward is misconfigured or returned unusable scores."""


class NonFiniteRewardError(RewardError):
    """A reward returned NaN or inf; `prompts` lists the prompts of the offending images."""

    def __init__(self, message, prompts):
        super().__init__(message)
        self.prompts = prompts


def register_reward(name):
    """Decorator: register `factory(device, **options) -> reward callable` under `name`."""

    def wrap(factory):
        if name in _REGISTRY or name in BUILTIN_REWARDS:
            raise RewardError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards():
    return sorted(_REGISTRY.keys() | BUILTIN_REWARDS.keys()) + sorted(COMBINATIONS)


def _resolve(path):
    """'package.module:attribute' -> that attribute, importing the module."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _factory(name):
    """The factory registered as `name` (a built-in's module is imported on first use), or None."""
    if name not in _REGISTRY and name in BUILTIN_REWARDS:
        _REGISTRY[name] = _resolve(BUILTIN_REWARDS[name])
    return _REGISTRY.get(name)


def _describe(value, limit=60):
    """'TYPE REPR' of a value for an error message, the repr cut to `limit` characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[: limit - 3] + '...'}"


def _import_callable(path):
    """The callable a custom reward key 'module:NAME' names, or RewardError saying what is wrong with it."""
    module_name, _, attr = path.partition(":")
    try:
        fn = _resolve(path)
    except Exception as err:  # the user's module may raise anything while it is imported
        raise RewardError(
            f"custom reward {path!r}: cannot import {attr!r} from {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    if not callable(fn):
        raise RewardError(f"custom reward {path!r}: {attr!r} is not callable (it is {_describe(fn)})")
    return fn


def _check_signature(path, fn, expected, /, *args, **kwargs):
    """RewardError unless `fn` can be called with these arguments (a callable whose signature is unknown passes)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise RewardError(f"custom reward {path!r}: expected {expected} ({err})") from None


def _make_custom(path, options):
    """A custom reward 'module:NAME': NAME itself (no options) or what NAME(**options) returns, checked to be a
    callable that takes (images, prompts)."""
    fn = _import_callable(path)
    if options:
        _check_signature(path, fn, f"a factory taking the options {sorted(options)}", **options)
        fn = fn(**options)
        if not callable(fn):
            raise RewardError(f"custom reward {path!r}: the factory returned {_describe(fn)}, expected a callable")
    _check_signature(path, fn, "a reward callable as fn(images, prompts)", None, None)
    return fn


def _make_one(name, options, device):
    if ":" in name:
        return _make_custom(name, options)
    factory = _factory(name)
    if factory is None:
        raise RewardError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())} or a 'module:function' path"
        )
    params = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(params) - {"device"})
    if unknown:
        valid = sorted(p for p in params if p != "device")
        raise RewardError(f"reward {name!r}: unknown option(s) {unknown}; valid options: {valid}")
    return factory(device=device, **options)


def _as_scores(scores):
    """A reward's output as a tensor: a real or bool torch tensor, numpy array, or list/tuple of numbers; else None."""
    if isinstance(scores, torch.Tensor):
        return None if scores.is_complex() else scores
    if isinstance(scores, (np.ndarray, list, tuple)):
        try:
            arr = np.asarray(scores)
        except ValueError:  # ragged
            return None
        return torch.as_tensor(arr) if arr.dtype.kind in "biuf" else None
    return None


def check_scores(name, scores, prompts):
    """Validate a reward's output for n prompts: (n,) numbers (tensor, array or list), all finite. Returns them as
    an fp32 tensor; RewardError naming the reward and what it returned, NonFiniteRewardError for NaN or inf."""
    n = len(prompts)
    tensor = _as_scores(scores)
    if tensor is None:
        raise RewardError(
            f"reward {name!r} returned {_describe(scores)}, expected a tensor, array or list of {n} numbers"
        )
    if tensor.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {tuple(tensor.shape)}, expected ({n},)")
    scores = tensor.float()
    bad = ~torch.isfinite(scores)
    if bad.any():
        offending = [p for p, b in zip(prompts, bad.tolist()) if b]
        raise NonFiniteRewardError(f"reward {name!r} returned non-finite scores for prompts {offending}", offending)
    return scores


class CombinedReward:
    """Weighted sum of rewards. Call -> (total (n,), {component name: scores (n,)})."""

    def __init__(self, spec, device="cpu"):
        if not isinstance(spec, dict) or not spec:
            raise RewardError(f"reward config must be a non-empty mapping name -> weight, got {spec!r}")
        self.components = {}
        for name, value in self._expand(spec).items():
            options = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = options.pop("weight", 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise RewardError(f"reward {name!r}: weight must be a number, got {weight!r}")
            self.components[name] = (float(weight), _make_one(name, options, device))

    @staticmethod
    def _expand(spec):
        out = {}
        for name, value in spec.items():
            if name in COMBINATIONS:
                scale = value if isinstance(value, (int, float)) else 1.0
                out.update({k: w * scale for k, w in COMBINATIONS[name].items()})
            else:
                out[name] = value
        return out

    @torch.no_grad()
    def __call__(self, images, prompts):
        prompts = list(prompts)
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise RewardError(
                f"rewards take images (n, 3, H, W) with n = len(prompts) = {len(prompts)}, got {tuple(images.shape)}"
            )
        parts = {
            name: check_scores(name, fn(images, prompts), prompts).to(images.device)
            for name, (_, fn) in self.components.items()
        }
        total = sum(self.components[name][0] * s for name, s in parts.items())
        return total, parts


def build_reward(spec: dict[str, Any], device: str | torch.device = "cpu") -> CombinedReward:
    """A config's reward mapping (name -> weight or {weight, options}) -> CombinedReward, whose call
    takes images (n, 3, H, W) in [0, 1] and n prompts and returns (total (n,), {name: scores (n,)})."""
    return CombinedReward(spec, device)


def _to_uint8(images):
    """(n, 3, H, W) in [0, 1] -> list of (H, W, 3) uint8 arrays."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


def _jpeg_kb(images, quality):
    sizes = []
    for arr in _to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(device="cpu", quality=95):
    """Minus the JPEG size in kB (DDPO's compressibility reward): smaller files score higher."""
    return lambda images, prompts: -_jpeg_kb(images, quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(device="cpu", quality=95):
    """The JPEG size in kB (DDPO's incompressibility reward): larger files score higher."""
    return lambda images, prompts: _jpeg_kb(images, quality)


@register_reward("brightness")
def brightness(device="cpu"):
    """Mean pixel value in [0, 1]."""
    return lambda images, prompts: images.float().mean(dim=(1, 2, 3))
