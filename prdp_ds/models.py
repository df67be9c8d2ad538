"""Models: Stable Diffusion parts from a local diffusers folder (or the hub when online), or a
`tiny` family built from small configs with seeded random weights for tests and the CPU demo.

Frozen parts (reference UNet, VAE, text encoder) carry no grad; the policy UNet is trainable.
With LoRA (`Models.add_lora`, prdp_ds/lora.py) only the adapters are trainable and the reference
is a view of the policy UNet with its adapters disabled, not a second copy.
Weights load through safetensors only (`use_safetensors=True`): never an arbitrary pickle.
"""

import copy
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD14_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
)

# Model families built in other modules: model.pretrained name -> "module:builder", imported only when
# asked for; builder(weights, reference=...) with weights None (its default) or the part after "name:".
MODEL_FAMILIES = {
    "world": "prdp_ds.world.model:build_world_models",
    "world_flow": "prdp_ds.world.model:build_world_flow_models",
}
# Flow-matching families (prdp_ds.flow_models): a tiny source name -> its builder(seed, reference); a local folder's
# model_index.json _class_name -> its loader(folder, reference).
FLOW_TINY = {"tiny_sd3": "build_tiny_sd3", "tiny_flux": "build_tiny_flux"}
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "load_sd3", "FluxPipeline": "load_flux"}


class ModelLoadError(RuntimeError):
    """Model weights could not be found or loaded."""


class OpenClipTokenizer:
    """CLIP BPE tokenizer shipped with open_clip (works offline): prompts -> (n, context) ids."""

    def __init__(self, context_length):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, prompts):
        return self._tok(list(prompts), context_length=self.context_length)

    def lengths(self, prompts):
        """Untruncated token counts, start and end tokens included."""
        return [len(self._tok.encode(p)) + 2 for p in prompts]


class HFTokenizer:
    """A transformers CLIPTokenizer padded to its max length: prompts -> (n, 77) ids."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @property
    def context_length(self):
        return self._tok.model_max_length

    def __call__(self, prompts):
        return self._tok(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self._tok.model_max_length,
            return_tensors="pt",
        ).input_ids

    def lengths(self, prompts):
        """Untruncated token counts, start and end tokens included."""
        return [len(ids) for ids in self._tok(list(prompts)).input_ids]


@dataclass
class Models:
    unet: torch.nn.Module  # the policy, trainable
    ref_unet: torch.nn.Module  # frozen copy of the initial UNet (pi_ref), with LoRA an AdaptersDisabled view,
    # None when loaded with reference=False (evaluation samples without it)
    vae: torch.nn.Module  # frozen
    text_encoder: torch.nn.Module  # frozen
    tokenizer: object  # prompts -> (n, L) token ids
    scheduler: DDIMScheduler

    @property
    def latent_shape(self):
        """(C, h, w) of one latent: the policy's own `latent_shape` when it declares one (a packed-latent
        transformer), else (in_channels, sample_size, sample_size) from its config."""
        unet = getattr(self.unet, "module", self.unet)  # a DeepSpeed engine wraps the policy
        if hasattr(unet, "latent_shape"):
            return tuple(unet.latent_shape)
        cfg = unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """list of n prompts -> (n, L, dim) text embeddings in the text encoder's dtype."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))[0]

    @torch.no_grad()
    def decode(self, latents):
        """(n, C, h, w) latents -> (n, 3, H, W) fp32 images in [0, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def to(self, device, frozen_dtype=None):
        """Move everything to `device`; frozen parts optionally cast to `frozen_dtype` (bf16 on GPU).
        A LoRA reference view is the policy UNet itself: it moves with it and is never cast here
        (the policy's dtype, frozen base weights included, is DeepSpeed's business)."""
        from prdp_ds.lora import AdaptersDisabled

        self.unet.to(device)
        for m in (self.ref_unet, self.vae, self.text_encoder):
            if m is not None and not isinstance(m, AdaptersDisabled):
                m.to(device=device, dtype=frozen_dtype or next(m.parameters()).dtype)
        return self

    def apply_options(self, channels_last=False, compile=False):
        """model.channels_last / model.compile, after `to` and before the policy is wrapped in a DeepSpeed engine.

        channels_last: the frozen reference UNet in channels_last memory format (NHWC convolutions; on any
        device). The policy keeps its contiguous layout: DeepSpeed broadcasts and flattens the engine's
        parameters through byte views that need it (`deepspeed.initialize` fails on channels_last weights).
        compile: the reference UNet's forward goes through
        torch.compile (the reference pass); the policy's module is left as it is, since the engine runs its
        forward with grad in the training passes. A LoRA reference is the policy itself: neither is applied to it.
        """
        from prdp_ds.lora import AdaptersDisabled

        if hasattr(self.unet, "module"):
            raise RuntimeError("Models.apply_options must be called before the UNet is wrapped in a DeepSpeed engine")
        own_ref = self.ref_unet is not None and not isinstance(self.ref_unet, AdaptersDisabled)
        if channels_last and own_ref:
            self.ref_unet.to(memory_format=torch.channels_last)
        if compile and own_ref:
            self.ref_unet.forward = torch.compile(self.ref_unet.forward)
        return self

    @property
    def uses_lora(self):
        from prdp_ds.lora import has_lora

        return has_lora(self.unet)

    def add_lora(self, rank, alpha=0.0):
        """Train LoRA adapters instead of the UNet (model.lora_rank / model.lora_alpha): adds them to the
        policy, freezes its base weights and makes the reference the same UNet with adapters disabled
        (the reference copy is dropped). Call before the UNet is wrapped in a DeepSpeed engine."""
        from prdp_ds.lora import AdaptersDisabled, add_lora

        if hasattr(self.unet, "module"):
            raise RuntimeError("Models.add_lora must be called before the UNet is wrapped in a DeepSpeed engine")
        add_lora(self.unet, rank, alpha)
        self.ref_unet = AdaptersDisabled(self.unet)
        return self


def _freeze(module):
    module.requires_grad_(False)
    return module.eval()


def reference_copy(unet, reference=True):
    """The frozen reference UNet (a copy of the initial policy), or None when reference=False."""
    return _freeze(copy.deepcopy(unet)) if reference else None


def make_scheduler(config=None):
    """A DDIM scheduler (SD v1.4's schedule unless `config` is given), refusing what docs/design.md §3
    cannot express: x0 clipping, thresholding and non-epsilon predictions."""
    scheduler = DDIMScheduler.from_config(dict(config or SD14_SCHEDULER))
    cfg = scheduler.config
    if cfg.clip_sample or cfg.thresholding or cfg.prediction_type != "epsilon":
        raise ModelLoadError(
            "the PRDP sampler needs clip_sample=False, thresholding=False and "
            f"prediction_type='epsilon'; the scheduler config has clip_sample={cfg.clip_sample}, "
            f"thresholding={cfg.thresholding}, prediction_type={cfg.prediction_type!r}"
        )
    return scheduler


TINY = dict(resolution=32, latent_channels=4, text_dim=32, context_length=16)


def build_tiny(seed=0, reference=True):
    """Tiny SD-shaped models with seeded random weights: 32x32 images, 4x8x8 latents."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY["text_dim"],
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=TINY["text_dim"],
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY["context_length"],
            )
        )
    return Models(
        unet=unet,
        ref_unet=reference_copy(unet, reference),
        vae=_freeze(vae),
        text_encoder=_freeze(text_encoder),
        tokenizer=OpenClipTokenizer(TINY["context_length"]),
        scheduler=make_scheduler(),
    )


def load_pretrained(source, reference=True):
    """Stable Diffusion v1.x parts from a local diffusers folder (or a hub id, online only)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(
            f"cannot load Stable Diffusion from model.pretrained={source!r}: {err}\n"
            f"Expected a diffusers folder holding {', '.join(SD_SUBFOLDERS)} with .safetensors weights "
            "(e.g. CompVis/stable-diffusion-v1-4, downloaded where there is network). Put it on this "
            "machine and set model.pretrained=/path/to/that/folder; hub ids only work online."
        ) from err
    scheduler = make_scheduler({**SD14_SCHEDULER, **{k: v for k, v in scheduler_config.items() if k in SD14_SCHEDULER}})
    return Models(
        unet=unet,
        ref_unet=reference_copy(unet, reference),
        vae=_freeze(vae),
        text_encoder=_freeze(text_encoder),
        tokenizer=HFTokenizer(tokenizer),
        scheduler=scheduler,
    )


def _field(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def check_parts(unet_config, vae_config, text_config, where):
    """Whether a UNet fits the VAE and text encoder it runs with, from their configs (mappings or attribute
    objects): latent channels in and out = the VAE's, sample size x the VAE's downscale = the VAE's sample size,
    cross-attention width = the text encoder's hidden size. ModelLoadError naming `where` and every mismatch.
    diffusers' AutoencoderKL gives its downscale as 2^(len(block_out_channels) - 1); another VAE as `downscale`."""
    u = {k: _field(unet_config, k) for k in ("in_channels", "out_channels", "sample_size", "cross_attention_dim")}
    problems = []
    latent = _field(vae_config, "latent_channels")
    if latent is not None and not u["in_channels"] == u["out_channels"] == latent:
        problems.append(
            f"the UNet takes {u['in_channels']} and gives {u['out_channels']} latent channels, "
            f"the VAE's latents have {latent}"
        )
    blocks = _field(vae_config, "block_out_channels")
    down = _field(vae_config, "downscale") or (2 ** (len(blocks) - 1) if blocks else None)
    size = _field(vae_config, "sample_size")
    if down and size and u["sample_size"] * down != size:
        problems.append(
            f"the UNet's {u['sample_size']}-latent samples decode to {u['sample_size'] * down} pixels (VAE "
            f"downscale {down}), the VAE's sample_size is {size}"
        )
    width, hidden = u["cross_attention_dim"], _field(text_config, "hidden_size")
    if hidden is not None and set(width if isinstance(width, (list, tuple)) else [width]) != {hidden}:
        problems.append(f"the UNet's cross-attention width is {width}, the text encoder's hidden size {hidden}")
    if problems:
        raise ModelLoadError(f"{where}: the model's parts do not fit together: " + "; ".join(problems))


def _pipeline_class(source):
    """The `_class_name` of a local folder's model_index.json, or None when there is none."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{index}: expected a JSON object with a _class_name ({err})") from err


def load_models(source, seed=0, reference=True):
    """`source` is 'tiny', 'world' (or 'world:WEIGHTS_DIR'), 'tiny_sd3', 'tiny_flux', a local SD3 / FLUX diffusers
    folder (model_index.json _class_name in FLOW_PIPELINES), or a Stable Diffusion folder / hub id.
    reference=False builds no reference UNet (ref_unet None): no second copy is ever made. The parts are checked to
    fit together (check_parts, or flow_models.check_flow_parts) before anything runs."""
    family, colon, weights = source.partition(":")
    pipeline = None if source in FLOW_TINY else _pipeline_class(source)
    if source in FLOW_TINY or pipeline in FLOW_PIPELINES:  # imported only when asked for (it imports this module)
        flow_models = importlib.import_module("prdp_ds.flow_models")
        if pipeline is None:
            models = getattr(flow_models, FLOW_TINY[source])(seed, reference)
        else:
            models = getattr(flow_models, FLOW_PIPELINES[pipeline])(source, reference)
        flow_models.check_flow_parts(models, f"model.pretrained={source!r}")
        return models
    if family in MODEL_FAMILIES:  # e.g. the pretrained synthetic world (prdp_ds/world)
        module, _, attr = MODEL_FAMILIES[family].partition(":")
        build = getattr(importlib.import_module(module), attr)
        models = build(weights if colon else None, reference=reference)
    else:
        models = build_tiny(seed, reference) if source == "tiny" else load_pretrained(source, reference)
    parts = (models.unet.config, models.vae.config, models.text_encoder.config)
    check_parts(*parts, f"model.pretrained={source!r}")
    return models
