"""LoRA finetuning: train low-rank adapters on the UNet's attention projections, not the UNet.

With `model.lora_rank > 0` the policy is the base UNet plus peft LoRA adapters on every attention
projection (to_q, to_k, to_v, to_out.0); the base weights are frozen, so the optimizer (and its
ZeRO partitions) holds only the adapters. The adapter's B matrix starts at zero, so at
initialisation the adapted UNet computes exactly what the base UNet computes.

The reference policy pi_ref is the base UNet, i.e. the very same module with its adapters
switched off for the duration of a call (`AdaptersDisabled`). No second UNet is kept in memory.
The view holds the UNet module itself (a DeepSpeed engine is unwrapped through `.module`), so it
keeps working after the trainer wraps the UNet in an engine; it is not an nn.Module and owns no
parameters, so nothing that moves or casts the frozen models reaches the policy through it.
Switching peft adapters off and on again resets their `requires_grad` flags; the view restores
the flags it found, so the trainable set DeepSpeed was built with never changes.

Adapters are saved in the diffusers LoRA format (`pytorch_lora_weights.safetensors` with the
LoraConfig as metadata, so a rank/alpha pair other than alpha = rank survives the trip), which a
diffusers user loads with `StableDiffusionPipeline.load_lora_weights(directory)`. `merged_unet`
returns a plain UNet2DConditionModel with the adapters folded into the base weights.
"""

import torch

ADAPTER_NAME = "prdp"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _unwrap(unet):
    """The UNet module behind a DeepSpeed engine (or the module itself)."""
    return getattr(unet, "module", unet)


def has_lora(unet):
    """Whether the UNet (or the engine around it) carries peft adapters."""
    return bool(getattr(_unwrap(unet), "peft_config", None))


def add_lora(unet, rank, alpha=0.0, adapter_name=ADAPTER_NAME):
    """Attach LoRA adapters of `rank` to the attention projections and freeze everything else.

    alpha: LoRA scale numerator (scale = alpha / rank); 0 means alpha = rank (scale 1). Returns `unet`,
    modified in place: only the adapters' parameters require grad, and lora_B is zero so the adapted
    UNet equals the base UNet exactly until the first optimizer step."""
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"model.lora_rank must be a positive integer to add LoRA adapters, got {rank!r}")
    if alpha < 0:
        raise ValueError(f"model.lora_alpha must be >= 0 (0 means alpha = rank), got {alpha!r}")
    if has_lora(unet):
        raise ValueError("the UNet already carries LoRA adapters")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=float(alpha or rank), init_lora_weights=True, target_modules=list(TARGET_MODULES)
        ),
        adapter_name=adapter_name,
    )
    for name, p in unet.named_parameters():  # add_adapter marks the adapter trainable; make sure of the rest
        p.requires_grad_(".lora_" in name)
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"no LoRA target ({', '.join(TARGET_MODULES)}) found in {type(unet).__name__}")
    return unet


def lora_parameters(unet):
    """The trainable adapter parameters (what the optimizer and the DeepSpeed engine should get)."""
    return [p for p in _unwrap(unet).parameters() if p.requires_grad]


class AdaptersDisabled:
    """The reference policy: the same UNet with its adapters switched off, without grad.

    Called like the UNet (`view(sample, timestep, encoder_hidden_states).sample`); exposes `.config`,
    `.parameters()`, `.device` and `.dtype` of the underlying UNet. Accepts the UNet or the DeepSpeed
    engine around it and keeps the module, which the engine wraps without replacing."""

    def __init__(self, unet):
        if not has_lora(unet):
            raise ValueError("AdaptersDisabled needs a UNet with LoRA adapters (see add_lora)")
        self.module = _unwrap(unet)

    @property
    def config(self):
        return self.module.config

    @property
    def device(self):
        return next(self.module.parameters()).device

    @property
    def dtype(self):
        return next(self.module.parameters()).dtype

    def parameters(self, recurse=True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def _tuner_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        layers = self._tuner_layers()
        was_enabled = any(not layer.disable_adapters for layer in layers)
        flags = [(p, p.requires_grad) for p in self.module.parameters()]
        self.module.disable_adapters()
        try:
            return self.module(*args, **kwargs)
        finally:
            if was_enabled:
                self.module.enable_adapters()
            for p, flag in flags:  # peft's enable/disable rewrite requires_grad: put back what was there
                if p.requires_grad != flag:
                    p.requires_grad_(flag)

    __call__ = forward

    def __repr__(self):
        return f"AdaptersDisabled({type(self.module).__name__})"


def adapter_state_dict(unet, adapter_name=ADAPTER_NAME):
    """The adapter's tensors in diffusers' LoRA key format (no 'unet.' prefix), on CPU, contiguous."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    module = _unwrap(unet)
    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def lora_format(module):
    """(diffusers pipeline class, key prefix) whose LoRA format holds `module`'s adapters: StableDiffusionPipeline
    and 'unet' for a UNet, StableDiffusion3Pipeline / FluxPipeline and 'transformer' for their transformers."""
    import diffusers

    for base, pipeline, prefix in (
        ("SD3Transformer2DModel", "StableDiffusion3Pipeline", "transformer"),
        ("FluxTransformer2DModel", "FluxPipeline", "transformer"),
    ):
        if isinstance(module, getattr(diffusers, base)):
            return getattr(diffusers, pipeline), prefix
    return diffusers.StableDiffusionPipeline, "unet"


def save_adapter(unet, directory, adapter_name=ADAPTER_NAME):
    """Write `directory/pytorch_lora_weights.safetensors` (diffusers LoRA format, LoraConfig in the metadata)
    so that the model's pipeline (`lora_format`: StableDiffusionPipeline, StableDiffusion3Pipeline or FluxPipeline)
    loads it with `load_lora_weights(directory)`. Under ZeRO-3 call it inside deepspeed.zero.GatheredParameters (as
    checkpoint.save_checkpoint does)."""
    module = _unwrap(unet)
    if adapter_name not in getattr(module, "peft_config", {}):
        raise ValueError(f"the UNet has no adapter named {adapter_name!r}")
    pipeline, prefix = lora_format(module)
    pipeline.save_lora_weights(
        str(directory),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
        **{
            f"{prefix}_lora_layers": adapter_state_dict(module, adapter_name),
            f"{prefix}_lora_adapter_metadata": module.peft_config[adapter_name].to_dict(),
        },
    )


def load_adapter(unet, directory, adapter_name=ADAPTER_NAME):
    """Load an adapter written by `save_adapter` into a plain UNet (safetensors only); returns the UNet
    with the adapter active (frozen: this is for evaluation and sampling)."""
    from pathlib import Path

    path = Path(directory) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapter (expected {LORA_WEIGHT_NAME} written by save_adapter)")
    module = _unwrap(unet)
    module.load_lora_adapter(
        str(directory),
        prefix=lora_format(module)[1],
        weight_name=LORA_WEIGHT_NAME,
        use_safetensors=True,
        adapter_name=adapter_name,
        local_files_only=True,
    )
    module.set_adapter(adapter_name)
    module.requires_grad_(False)
    return module


@torch.no_grad()
def merged_unet(unet, adapter_name=ADAPTER_NAME):
    """A new plain UNet on CPU (same class and config, no peft layers) whose weights are the base weights
    plus the adapters' delta (scale * B @ A, summed in fp32, stored in the base dtype). The input UNet
    is not modified. Under ZeRO-3 call it inside deepspeed.zero.GatheredParameters."""
    from peft.tuners.lora import LoraLayer

    module = _unwrap(unet)
    if adapter_name not in getattr(module, "peft_config", {}):
        raise ValueError(f"the UNet has no adapter named {adapter_name!r}")
    merged = {}
    lora_layers = {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in lora_layers.items():
        base = layer.get_base_layer()
        delta = layer.get_delta_weight(adapter_name).float() if adapter_name in layer.lora_A else 0.0
        merged[f"{name}.weight"] = (base.weight.float() + delta).to(base.weight.dtype).cpu().clone()
        if base.bias is not None:
            merged[f"{name}.bias"] = base.bias.detach().cpu().clone()
    for key, value in module.state_dict().items():
        if ".lora_" not in key and ".base_layer." not in key:  # those are the LoRA layers, done above
            merged[key] = value.detach().cpu().clone()
    with torch.device("meta"):
        plain = type(module).from_config(module.config)
    plain.load_state_dict(merged, strict=True, assign=True)
    leftover = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"merged_unet: tensors left unset: {leftover[:5]}")
    return plain.requires_grad_(False).eval()
