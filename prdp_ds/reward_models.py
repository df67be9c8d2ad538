"""Pretrained human-preference rewards: HPSv2, PickScore, LAION aesthetic (docs/design.md §12).

Each is registered in the reward registry (`prdp_ds.rewards`) under its name; its options become
config keys (`reward: {hpsv2: {weight: 2.0, checkpoint: PATH}}`; all keys and files: docs/rewards.md).

Scores and scales (they fix the meaning of beta):
- hpsv2: cosine(image, text) of OpenCLIP ViT-H-14 with the HPSv2 checkpoint (SD1.4 ~ 0.27).
- pickscore: logit_scale * cosine / 100 of the PickScore_v1 CLIP ViT-H-14, i.e. ~ the cosine (SD1.4 ~ 0.21).
- aesthetic: LAION improved-aesthetic-predictor MLP on the L2-normalized CLIP ViT-L/14 image
  embedding, 0-10 scale (SD1.4 ~ 5.5).

Nothing is downloaded: paths are local (or found in the local hub cache); weights load with safetensors
or torch.load(weights_only=True); a missing or wrong file fails at construction with a RewardError naming
the config key. Images are preprocessed batched as tensors on the reward's device, reproducing each
model's own PIL preprocessing; the models run without grad (bf16 autocast on CUDA), are loaded once per
process (`_MODELS`), and each rank scores its own images.
"""

import copy
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prdp_ds.rewards import RewardError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Where the public weights come from (used in error messages and the README).
HPSV2_REPO, HPSV2_FILES = "xswu/HPSv2", ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_SOURCE = f"https://github.com/christophschuhmann/improved-aesthetic-predictor (file {AESTHETIC_MLP_FILE})"
AESTHETIC_CLIP_REPO = "openai/clip-vit-large-patch14"

# Hugging Face hub cache folder consulted for defaults; None = huggingface_hub's default
# ($HF_HUB_CACHE / $HF_HOME/hub / ~/.cache/huggingface/hub). Never downloads.
HF_CACHE_DIR = None

_MODELS = {}
_LOCK = threading.Lock()
LOAD_COUNTS = Counter()  # reward name -> number of times weights were actually read (tests, benchmarks)


def clear_cache():
    """Forget every loaded reward model (the next factory call reloads)."""
    with _LOCK:
        _MODELS.clear()


# ---------------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------------


def _hub_file(repo_id, filename):
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, cache_dir=HF_CACHE_DIR, local_files_only=True)
    except Exception:  # not cached (or hub client unavailable): the caller reports
        return None


def _hub_folder(repo_id):
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, cache_dir=HF_CACHE_DIR, local_files_only=True)
    except Exception:
        return None


def _looks_like_repo_id(value):
    parts = str(value).split("/")
    return len(parts) == 2 and all(parts) and not str(value).startswith((".", "~")) and not os.path.isabs(str(value))


def _resolve_file(key, value, hub_candidates, hint):
    """A local file for config key `key`: the given path, or (value None) the first hub-cached candidate."""
    if value is None:
        for repo_id, filename in hub_candidates:
            found = _hub_file(repo_id, filename)
            if found:
                return Path(found)
        raise RewardError(
            f"{key}: no path given and the public weights are not in the local Hugging Face "
            f"cache; set {key} to the local file. {hint}"
        )
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        what = "is a folder, expected a file" if path.is_dir() else "file not found"
        raise RewardError(f"{key}: {what}: {str(path)!r}. {hint}")
    return path


def _resolve_folder(key, value, default_repo, hint):
    """A local folder for `key`: the given path, a hub repo id found in the cache, or (None) `default_repo`."""
    if value is None:
        found = _hub_folder(default_repo) if default_repo else None
        if found:
            return Path(found)
        raise RewardError(
            f"{key}: no path given and {default_repo or 'the public weights'} is not in the local "
            f"Hugging Face cache; set {key} to the local folder. {hint}"
        )
    path = Path(os.path.expanduser(str(value)))
    if path.is_dir():
        return path
    if path.is_file():
        raise RewardError(f"{key}: {str(path)!r} is a file, expected a folder (config.json, weights...). {hint}")
    if _looks_like_repo_id(value):
        found = _hub_folder(str(value))
        if found:
            return Path(found)
        raise RewardError(
            f"{key}: {str(value)!r} is neither a local folder nor a repository in the local "
            f"Hugging Face cache (nothing is downloaded). {hint}"
        )
    raise RewardError(f"{key}: folder not found: {str(path)!r}. {hint}")


def _brief(err, limit=300):
    """An exception as one short line, for error messages."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _identity(path):
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size


def _cached(key, name, build):
    """Return the model bundle for `key`, building it (once per process) with `build()`."""
    with _LOCK:
        bundle = _MODELS.get(key)
        if bundle is None:
            bundle = build()
            LOAD_COUNTS[name] += 1
            _MODELS[key] = bundle
        return bundle


def _read_state_dict(key, path, hint):
    """Tensors from a safetensors file or a torch checkpoint loaded with weights_only=True.

    A checkpoint dict holding 'state_dict' (the HPSv2 format) is unwrapped; a 'module.' prefix
    (DataParallel/DDP) is stripped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, arbitrary pickle refused by weights_only, ...
        raise RewardError(
            f"{key}: cannot read {str(path)!r} as weights (safetensors or a torch checkpoint of "
            f"plain tensors; arbitrary pickles are refused): {_brief(err)}. {hint}"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardError(f"{key}: {str(path)!r} holds no state dict of tensors (got {type(obj).__name__}). {hint}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_strict(key, module, state_dict, path, hint):
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0] if lines else ""
        if len(detail) > 600:
            detail = detail[:600] + "..."
        raise RewardError(f"{key}: {str(path)!r} does not fit the expected architecture ({detail}). {hint}") from err


# ---------------------------------------------------------------------------------------------
# Tensor preprocessing reproducing the models' PIL pipelines
# ---------------------------------------------------------------------------------------------


def _quantize(x):
    """Round to the uint8 grid, as converting to a PIL image (and PIL's resize passes) does."""
    return (x.clamp(0.0, 1.0) * 255.0).round_().div_(255.0)


@dataclass(frozen=True)
class ImagePreprocess:
    """Batched tensor version of a CLIP model's PIL preprocessing.

    resize_mode 'shortest': scale the shorter side to `size` (long side truncated, as torchvision's
    Resize(int) and transformers do), then center crop `crop` (crop_rounding 'round' =
    torchvision's int(round(d/2)), 'floor' = transformers' d//2). resize_mode 'longest' (HPSv2's
    ResizeMaxSize, open_clip resize_mode='longest'): scale the longer side to `size` (round), then
    pad to `crop` with black (left/top get the floor half). Then normalize with mean/std.
    """

    size: int
    crop: int
    mean: tuple
    std: tuple
    resize_mode: str = "shortest"
    crop_rounding: str = "round"
    interpolation: str = "bicubic"

    def output_hw(self, h, w):
        if self.resize_mode == "shortest":
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        if self.resize_mode == "longest":
            scale = self.size / float(max(h, w))
            if scale == 1.0:
                return h, w
            return round(h * scale), round(w * scale)
        raise ValueError(f"unknown resize_mode {self.resize_mode!r}")

    def _resize(self, x, hw):
        # PIL resamples horizontally then vertically, rounding to uint8 after each pass; torch's
        # antialiased bicubic uses PIL's kernel (a = -0.5) and support, so two 1-D passes with the
        # same rounding reproduce PIL to within one uint8 step at rounding ties.
        h, w = x.shape[-2:]
        if hw[1] != w:
            x = _quantize(
                F.interpolate(x, size=(h, hw[1]), mode=self.interpolation, antialias=True, align_corners=False)
            )
        if hw[0] != h:
            x = _quantize(F.interpolate(x, size=hw, mode=self.interpolation, antialias=True, align_corners=False))
        return x

    def __call__(self, images):
        """(n, 3, H, W) float in [0, 1] (any device) -> (n, 3, crop, crop) float32, normalized."""
        x = _quantize(images.detach().float())
        h, w = x.shape[-2:]
        nh, nw = self.output_hw(h, w)
        if (nh, nw) != (h, w):
            x = self._resize(x, (nh, nw))
        c = self.crop
        if nh < c or nw < c:  # pad with black (PIL fill 0), floor half left/top
            ph, pw = max(c - nh, 0), max(c - nw, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
            nh, nw = x.shape[-2:]
        if (nh, nw) != (c, c):
            if self.crop_rounding == "round":
                top, left = int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0))
            else:
                top, left = (nh - c) // 2, (nw - c) // 2
            x = x[..., top : top + c, left : left + c]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _hw_value(size, *keys):
    if size is None:
        return None
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    for k in keys:
        v = get(k)
        if v is not None:
            return v
    return None


def preprocess_from_image_processor(proc, crop_rounding="floor"):
    """ImagePreprocess equivalent to a transformers CLIPImageProcessor (its PIL backend)."""
    size = _hw_value(getattr(proc, "size", None), "shortest_edge", "height")
    crop = (
        _hw_value(getattr(proc, "crop_size", None), "height", "shortest_edge")
        if getattr(proc, "do_center_crop", True)
        else size
    )
    resample = getattr(proc, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"unsupported resample mode {resample}")
    scale = float(getattr(proc, "rescale_factor", 1 / 255) or 1 / 255) * 255.0
    mean = tuple(float(m) / scale for m in proc.image_mean)  # rescale folded into the constants
    std = tuple(float(s) / scale for s in proc.image_std)
    return ImagePreprocess(
        size=int(size),
        crop=int(crop),
        mean=mean,
        std=std,
        resize_mode="shortest",
        crop_rounding=crop_rounding,
        interpolation=_PIL_RESAMPLE[resample],
    )


# ---------------------------------------------------------------------------------------------
# The reward callable
# ---------------------------------------------------------------------------------------------


class PretrainedReward:
    """(images (n,3,H,W) in [0,1], prompts) -> (n,) fp32 scores on `device`, in chunks of batch_size."""

    def __init__(self, name, bundle, device, batch_size=32, bf16=True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"reward.{name}.batch_size: must be a positive integer, got {batch_size!r}")
        self.name, self.bundle, self.device = name, bundle, torch.device(device)
        self.batch_size = batch_size
        self.autocast = bool(bf16) and self.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, images, prompts):
        prompts = list(prompts)
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise RewardError(
                f"reward {self.name!r} takes images (n, 3, H, W) with n = len(prompts) = "
                f"{len(prompts)}, got {tuple(images.shape)}"
            )
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = images[i : i + self.batch_size].to(self.device, non_blocking=True)
            out.append(self.bundle.score(chunk, prompts[i : i + self.batch_size], self.autocast).float())
        return torch.cat(out) if out else torch.zeros(0, device=self.device)


def _autocast(enabled):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def _features(out):
    """transformers <5 returns the projected features; 5.x a BaseModelOutputWithPooling."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------
# HPSv2
# ---------------------------------------------------------------------------------------------

HPSV2_HINT = (
    f"Expected the HPSv2 checkpoint ({HPSV2_FILES[0]} for v2.0 or {HPSV2_FILES[1]} for v2.1, a dict "
    f"with 'state_dict') from the Hugging Face hub repo {HPSV2_REPO}, e.g. "
    f"`huggingface-cli download {HPSV2_REPO} {HPSV2_FILES[0]}`."
)


def _open_clip_config(key, clip_model):
    """(model_cfg, preprocess_cfg, tokenizer name or None) from an open_clip model name, a JSON file or a dict."""
    import open_clip

    builtin = None
    if isinstance(clip_model, dict):
        cfg = copy.deepcopy(clip_model)
    elif str(clip_model).endswith(".json") or os.path.sep in str(clip_model):
        path = Path(os.path.expanduser(str(clip_model)))
        if not path.is_file():
            raise RewardError(
                f"{key}: open_clip model config file not found: {str(path)!r} (give an open_clip "
                "model name such as 'ViT-H-14' or a JSON file with embed_dim, vision_cfg, text_cfg)"
            )
        try:
            cfg = json.loads(path.read_text())
        except ValueError as err:
            raise RewardError(f"{key}: {str(path)!r} is not valid JSON ({err})") from err
    else:
        cfg = open_clip.get_model_config(str(clip_model))
        if cfg is None:
            raise RewardError(
                f"{key}: unknown open_clip model {clip_model!r} (HPSv2 uses 'ViT-H-14'); give a "
                "name from open_clip.list_models() or a JSON model config file"
            )
        builtin = str(clip_model)
    preprocess_cfg = {}
    if isinstance(cfg, dict) and "model_cfg" in cfg:  # open_clip_config.json layout
        preprocess_cfg = cfg.get("preprocess_cfg") or {}
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise RewardError(f"{key}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    if "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"] or cfg.get("custom_text"):
        raise RewardError(
            f"{key}: HPSv2 is a plain OpenCLIP CLIP (ViT image tower, CLIP text tower); "
            "timm / Hugging Face towers are not supported"
        )
    return copy.deepcopy(cfg), preprocess_cfg, builtin


class _HPSv2Bundle:
    def __init__(self, model, tokenizer, preprocess):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess

    def score(self, images, prompts, autocast):
        device = images.device
        pixels = self.preprocess(images)
        tokens = self.tokenizer(prompts).to(device)
        with _autocast(autocast):
            img = self.model.encode_image(pixels)
            txt = self.model.encode_text(tokens)
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1)  # diag(image_features @ text_features.T), HPSv2's score


def _build_hpsv2(key_prefix, checkpoint, cfg, preprocess_cfg, builtin, device):
    import open_clip
    from open_clip.model import CLIP

    build_cfg = {k: v for k, v in copy.deepcopy(cfg).items() if k != "custom_text"}
    model = CLIP(**build_cfg)
    state = _read_state_dict(f"{key_prefix}.checkpoint", checkpoint, HPSV2_HINT)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    _load_strict(f"{key_prefix}.checkpoint", model, state, checkpoint, HPSV2_HINT)
    model = model.to(device).eval().requires_grad_(False)
    context_length = cfg["text_cfg"].get("context_length", 77)
    tokenizer = (
        open_clip.get_tokenizer(builtin)
        if builtin
        else open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    )
    image_size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise RewardError(f"{key_prefix}.clip_model: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    # HPSv2 evaluates with open_clip's image_transform(..., resize_longest_max=True): ResizeMaxSize
    # (bicubic, longest side -> image_size) then pad with black; OpenAI CLIP mean/std.
    preprocess = ImagePreprocess(
        size=int(image_size),
        crop=int(image_size),
        mean=tuple(preprocess_cfg.get("mean") or OPENAI_CLIP_MEAN),
        std=tuple(preprocess_cfg.get("std") or OPENAI_CLIP_STD),
        resize_mode="longest",
        crop_rounding="floor",
        interpolation=preprocess_cfg.get("interpolation") or "bicubic",
    )
    return _HPSv2Bundle(model, tokenizer, preprocess)


def hpsv2(device="cpu", checkpoint=None, clip_model="ViT-H-14", batch_size=32, bf16=True):
    """HPSv2: cosine(image, text) of OpenCLIP ViT-H-14 loaded with the HPSv2 checkpoint (SD1.4 ~ 0.27).

    checkpoint: local HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (None: xswu/HPSv2's
      HPS_v2_compressed.pt from the local hub cache). clip_model: the open_clip architecture, a
      model name (default 'ViT-H-14') or a JSON model config file (tests use tiny ones).
    """
    key = "reward.hpsv2"
    cfg, preprocess_cfg, builtin = _open_clip_config(f"{key}.clip_model", clip_model)
    path = _resolve_file(f"{key}.checkpoint", checkpoint, [(HPSV2_REPO, HPSV2_FILES[0])], HPSV2_HINT)
    device = torch.device(device)
    cache_key = ("hpsv2", _identity(path), json.dumps([cfg, preprocess_cfg], sort_keys=True), str(device))
    bundle = _cached(cache_key, "hpsv2", lambda: _build_hpsv2(key, path, cfg, preprocess_cfg, builtin, device))
    return PretrainedReward("hpsv2", bundle, device, batch_size, bf16)


# ---------------------------------------------------------------------------------------------
# transformers CLIP loading (PickScore, aesthetic's CLIP ViT-L/14)
# ---------------------------------------------------------------------------------------------


def _load_hf_clip(key, folder, hint):
    from transformers import CLIPModel

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RewardError(
            f"{key}: {str(folder)!r} has no config.json (expected a transformers CLIPModel folder "
            f"saved with save_pretrained). {hint}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as err:
        raise RewardError(f"{key}: {str(config_file)!r} is not valid JSON ({err}). {hint}") from err
    if model_type != "clip":
        raise RewardError(
            f"{key}: {str(folder)!r} holds a {model_type!r} model, expected a CLIP model (model_type 'clip'). {hint}"
        )
    if not any(
        (folder / f).is_file()
        for f in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    ):
        raise RewardError(f"{key}: {str(folder)!r} has no weights (model.safetensors or pytorch_model.bin). {hint}")
    try:
        # .bin files go through transformers' torch.load(weights_only=True)
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as err:
        raise RewardError(f"{key}: cannot load a CLIPModel from {str(folder)!r}: {_brief(err, 500)}. {hint}") from err
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise RewardError(
            f"{key}: weights in {str(folder)!r} do not fit its config (missing {sorted(missing)[:5]}"
            f"{'...' if len(missing) > 5 else ''}, mismatched {list(mismatched)[:5]}). {hint}"
        )
    return model


# ---------------------------------------------------------------------------------------------
# PickScore
# ---------------------------------------------------------------------------------------------

PICKSCORE_HINT = (
    f"PickScore needs the model folder of {PICKSCORE_REPO} (config.json + weights) and the "
    f"processor/tokenizer folder of {PICKSCORE_PROCESSOR_REPO} (preprocessor_config.json + tokenizer "
    f"files) from the Hugging Face hub, e.g. `huggingface-cli download {PICKSCORE_REPO}`."
)


class _PickScoreBundle:
    def __init__(self, model, tokenizer, preprocess, max_length):
        self.model, self.tokenizer, self.preprocess, self.max_length = model, tokenizer, preprocess, max_length

    def score(self, images, prompts, autocast):
        device = images.device
        pixels = self.preprocess(images)
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        with _autocast(autocast):
            img = _features(self.model.get_image_features(pixel_values=pixels))
            txt = _features(
                self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"))
            )
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1) / 100.0


def _load_processor(key, folder, hint):
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise RewardError(f"{key}: no CLIP tokenizer in {str(folder)!r} ({_brief(err)}). {hint}") from err
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        preprocess = preprocess_from_image_processor(image_processor, crop_rounding="floor")
    except Exception as err:
        raise RewardError(
            f"{key}: no usable CLIP image processor config in {str(folder)!r} ({_brief(err)}). {hint}"
        ) from err
    return tokenizer, preprocess


def _build_pickscore(key, model_dir, processor_dir, device):
    model = _load_hf_clip(f"{key}.model", model_dir, PICKSCORE_HINT).to(device).eval().requires_grad_(False)
    tokenizer, preprocess = _load_processor(f"{key}.processor", processor_dir, PICKSCORE_HINT)
    max_length = min(77, int(model.config.text_config.max_position_embeddings))
    return _PickScoreBundle(model, tokenizer, preprocess, max_length)


def pickscore(device="cpu", model=None, processor=None, batch_size=32, bf16=True):
    """PickScore: logit_scale * cosine / 100 with PickScore_v1 (SD1.4 ~ 0.21).

    model: local folder of yuvalkirstain/PickScore_v1 (transformers CLIPModel). processor: local
    folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer + preprocessor_config.json). Either
    may be None (the public repo from the local hub cache) or a hub id found in that cache.
    """
    key = "reward.pickscore"
    model_dir = _resolve_folder(f"{key}.model", model, PICKSCORE_REPO, PICKSCORE_HINT)
    processor_dir = _resolve_folder(f"{key}.processor", processor, PICKSCORE_PROCESSOR_REPO, PICKSCORE_HINT)
    device = torch.device(device)
    cache_key = ("pickscore", _identity(model_dir), _identity(processor_dir), str(device))
    bundle = _cached(cache_key, "pickscore", lambda: _build_pickscore(key, model_dir, processor_dir, device))
    return PretrainedReward("pickscore", bundle, device, batch_size, bf16)


# ---------------------------------------------------------------------------------------------
# LAION aesthetic (improved-aesthetic-predictor, linear-MSE MLP on CLIP ViT-L/14)
# ---------------------------------------------------------------------------------------------

AESTHETIC_HINT = (
    f"The aesthetic reward needs the MLP {AESTHETIC_MLP_FILE} from {AESTHETIC_MLP_SOURCE} and the "
    f"CLIP ViT-L/14 transformers folder {AESTHETIC_CLIP_REPO} from the Hugging Face hub."
)


class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (dropouts are inactive in eval); keys layers.{0,2,4,6,7}."""

    def __init__(self, input_size=768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class _AestheticBundle:
    def __init__(self, clip, mlp, preprocess):
        self.clip, self.mlp, self.preprocess = clip, mlp, preprocess

    def score(self, images, prompts, autocast):
        pixels = self.preprocess(images)
        with _autocast(autocast):
            emb = _features(self.clip.get_image_features(pixel_values=pixels))
        emb = F.normalize(emb.float(), dim=-1)  # the predictor was trained on L2-normalized embeddings
        return self.mlp(emb).squeeze(-1)  # fp32, as in the reference


def _build_aesthetic(key, mlp_path, clip_dir, device):
    state = _read_state_dict(f"{key}.mlp", mlp_path, AESTHETIC_HINT)
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise RewardError(
            f"{key}.mlp: {str(mlp_path)!r} is not an improved-aesthetic-predictor MLP state dict "
            f"(no layers.0.weight; keys {sorted(state)[:5]}). {AESTHETIC_HINT}"
        )
    clip = _load_hf_clip(f"{key}.clip_model", clip_dir, AESTHETIC_HINT)
    embed_dim = int(clip.config.projection_dim)
    if first.shape[1] != embed_dim:
        raise RewardError(
            f"{key}.mlp: the MLP takes {first.shape[1]}-dim embeddings but {key}.clip_model "
            f"({str(clip_dir)!r}) gives {embed_dim}-dim ones (the predictor is for CLIP ViT-L/14, "
            f"768). {AESTHETIC_HINT}"
        )
    mlp = AestheticMLP(embed_dim)
    _load_strict(f"{key}.mlp", mlp, state, mlp_path, AESTHETIC_HINT)
    clip = clip.to(device).eval().requires_grad_(False)
    mlp = mlp.to(device).eval().requires_grad_(False)
    vision = clip.config.vision_config
    # improved-aesthetic-predictor embeds with OpenAI CLIP's own preprocess: torchvision
    # Resize(image_size, bicubic) + CenterCrop(image_size) + OpenAI mean/std.
    preprocess = ImagePreprocess(
        size=int(vision.image_size),
        crop=int(vision.image_size),
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resize_mode="shortest",
        crop_rounding="round",
    )
    return _AestheticBundle(clip, mlp, preprocess)


def aesthetic(device="cpu", mlp=None, clip_model=None, batch_size=32, bf16=True):
    """LAION aesthetic score, 0-10 scale (SD1.4 ~ 5.5).

    mlp: local sac+logos+ava1-l14-linearMSE.pth (or .safetensors). clip_model: local transformers
    CLIPModel folder of openai/clip-vit-large-patch14 (None: from the local hub cache; or a hub id).
    """
    key = "reward.aesthetic"
    mlp_path = _resolve_file(f"{key}.mlp", mlp, [], AESTHETIC_HINT)
    clip_dir = _resolve_folder(f"{key}.clip_model", clip_model, AESTHETIC_CLIP_REPO, AESTHETIC_HINT)
    device = torch.device(device)
    cache_key = ("aesthetic", _identity(mlp_path), _identity(clip_dir), str(device))
    bundle = _cached(cache_key, "aesthetic", lambda: _build_aesthetic(key, mlp_path, clip_dir, device))
    return PretrainedReward("aesthetic", bundle, device, batch_size, bf16)
