"""Flow-matching transformers (SD3 / SD3.5, FLUX.1-dev) behind the trainer's policy contract (docs/flow.md).

    out = policy(x, t, emb).sample               # SD3
    out = policy(x, t, emb, guidance=g).sample   # FLUX (guidance-distilled: g is an input embedding, not a CFG pair)

x (n, C, h, w) latents at noise level sigma (rectified flow: x = (1 - sigma) x0 + sigma eps); t (n,) the model
time sigma * 1000 in [0, 1000]; g (n,) the distilled guidance value (e.g. 3.5); out (n, C, h, w) the predicted
velocity v = eps - x0 (diffusers' convention).

emb (n, 1 + L, D) packs the text conditioning into one tensor: row 0 holds the pooled embedding in its first
P = pooled_projection_dim entries (zeros after), rows 1.. the text sequence of width D = joint_attention_dim.
SD3: pooled = [CLIP-L text_embeds, CLIP-G text_embeds]; sequence = [CLIP-L, CLIP-G penultimate hidden states]
zero-padded to D, then T5's last hidden state, along the sequence (StableDiffusion3Pipeline.encode_prompt).
FLUX: pooled = CLIP-L pooler_output; sequence = T5's last hidden state (FluxPipeline.encode_prompt).

SD3Policy passes t as is. FluxPolicy packs the latents' 2x2 patches into tokens, (n, 16, h, w) ->
(n, h/2 * w/2, 64) with channel order (c, dy, dx) (FluxPipeline._pack_latents), gives each patch the position id
(0, row, col) and each text token (0, 0, 0), passes t / 1000 and g (the transformer scales both by 1000, as in
FluxPipeline) and unpacks the output. Its latent side is not in diffusers' config: the builder / loader sets
`latent_side` (load_flux: the VAE's sample size over its downscale).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from prdp_ds.models import HFTokenizer, ModelLoadError, Models, OpenClipTokenizer, _freeze, reference_copy

SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3_T5_LENGTH, FLUX_T5_LENGTH = 256, 512  # the pipelines' default max_sequence_length
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)  # FLUX.1-dev's
SD3_LAYOUT = "transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3"
FLUX_LAYOUT = "transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2"
# Scheduler options the trainer's sigmas (from shift and num_train_timesteps alone) cannot express.
UNSUPPORTED_SCHEDULER = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)
# Tiny models: 32x32 images, 16x8x8 latents, CLIP context 16 tokens, T5 context 12 (T5 shares CLIP's BPE vocabulary).
TINY_FLOW = dict(resolution=32, latent_side=8, clip_length=16, t5_length=12)
TINY_SD3 = dict(  # SD3.5-shaped (RMS q/k norms, dual_attention_layers)
    num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, qk_norm="rms_norm"
)
TINY_FLUX = dict(
    num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6)
)
TINY_CLIP = dict(
    vocab_size=49408, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_FLOW["clip_length"]
)


def pack_text(pooled, sequence):
    """(n, P) pooled, (n, L, D) sequence -> (n, 1 + L, D) emb; row 0 is the pooled embedding zero-padded to D."""
    return torch.cat([F.pad(pooled, (0, sequence.shape[-1] - pooled.shape[-1]))[:, None], sequence], dim=1)


class SD3Policy(SD3Transformer2DModel):
    """SD3Transformer2DModel called as policy(x, t, emb): the model time t goes in as is."""

    guidance_distilled = False

    def forward(self, sample, timestep, encoder_hidden_states, guidance=None):
        if guidance is not None:
            raise ValueError("SD3Policy: SD3 is not guidance-distilled, call it without guidance=")
        return super().forward(
            hidden_states=sample,  # (n, C, h, w)
            encoder_hidden_states=encoder_hidden_states[:, 1:],  # (n, L, D)
            pooled_projections=encoder_hidden_states[:, 0, : self.config.pooled_projection_dim],  # (n, P)
            timestep=timestep,  # (n,)
        )


def pack_latents(x):
    """(n, C, h, w) -> (n, h/2 * w/2, 4C): 2x2 patches as tokens, channels (c, dy, dx) (FluxPipeline._pack_latents)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, h, w):
    """(n, h/2 * w/2, 4C) -> (n, C, h, w), the inverse of pack_latents (FluxPipeline._unpack_latents)."""
    n, _, c4 = tokens.shape
    return tokens.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def patch_ids(h, w, device, dtype):
    """(h/2 * w/2, 3) position ids (0, row, col) of the 2x2 patches (FluxPipeline._prepare_latent_image_ids)."""
    rows_cols = torch.cartesian_prod(torch.arange(h // 2), torch.arange(w // 2))  # row-major, (h/2 * w/2, 2)
    return F.pad(rows_cols, (1, 0)).to(device=device, dtype=dtype)


class FluxPolicy(FluxTransformer2DModel):
    """FluxTransformer2DModel called as policy(x, t, emb, guidance=g) on unpacked (n, 16, h, w) latents."""

    guidance_distilled = True

    latent_side = None  # h = w of the unpacked latents, set by the builder / loader (not in diffusers' config)

    @property
    def latent_shape(self):
        """(C, h, w) of one unpacked latent."""
        if self.latent_side is None:
            raise ValueError("FluxPolicy: latent_side is unset (build_tiny_flux / load_flux set it)")
        return (self.config.in_channels // 4, self.latent_side, self.latent_side)

    def forward(self, sample, timestep, encoder_hidden_states, guidance=None):
        if (guidance is not None) != self.config.guidance_embeds:
            raise ValueError(f"FluxPolicy: pass guidance= iff config.guidance_embeds (= {self.config.guidance_embeds})")
        _, _, h, w = sample.shape
        text = encoder_hidden_states[:, 1:]  # (n, L, D)
        tokens = super().forward(
            hidden_states=pack_latents(sample),  # (n, h/2 * w/2, 4C)
            encoder_hidden_states=text,
            pooled_projections=encoder_hidden_states[:, 0, : self.config.pooled_projection_dim],  # (n, P)
            timestep=timestep / 1000,  # the transformer multiplies t and guidance by 1000
            img_ids=patch_ids(h, w, sample.device, sample.dtype),
            txt_ids=text.new_zeros(text.shape[1], 3),
            guidance=guidance,
        )
        return Transformer2DModelOutput(sample=unpack_latents(tokens.sample, h, w))


class _TextEncoders(torch.nn.Module):
    """Frozen text encoders and their tokenizers (prompts -> (n, L) ids); config gives the packed widths."""

    def __init__(self, encoders, tokenizers, width, pooled_width, sequence_width):
        super().__init__()
        for name, module in encoders.items():
            setattr(self, name, module)
        self.names, self.tokenizers = tuple(encoders), tokenizers
        if max(pooled_width, sequence_width) > width:
            raise ValueError(
                f"{type(self).__name__}: pooled width {pooled_width} and CLIP sequence width {sequence_width} "
                f"must fit in the packed width {width} (T5's d_model)"
            )
        self.config = dict(joint_attention_dim=width, pooled_projection_dim=pooled_width)

    def _ids(self, prompts):
        device = next(self.parameters()).device
        return [self.tokenizers[name](prompts).to(device) for name in self.names]


class SD3TextEncoders(_TextEncoders):
    """CLIP-L and CLIP-G (CLIPTextModelWithProjection) and T5."""

    def __init__(self, clip_l, clip_g, t5, tokenizers):
        widths = (clip_l.config.hidden_size + clip_g.config.hidden_size, t5.config.d_model)
        pooled = clip_l.config.projection_dim + clip_g.config.projection_dim
        encoders = dict(clip_l=clip_l, clip_g=clip_g, t5=t5)
        super().__init__(encoders, tokenizers, widths[1], pooled, widths[0])

    def encode(self, prompts):
        """list of n prompts -> (n, 1 + L_clip + L_t5, D), packed as the module docstring says."""
        l_ids, g_ids, t5_ids = self._ids(list(prompts))
        clips = [self.clip_l(l_ids, output_hidden_states=True), self.clip_g(g_ids, output_hidden_states=True)]
        t5 = self.t5(t5_ids)[0]  # (n, L_t5, D)
        clip = torch.cat([c.hidden_states[-2] for c in clips], dim=-1)  # (n, L_clip, W_l + W_g)
        sequence = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        return pack_text(torch.cat([c.text_embeds for c in clips], dim=-1), sequence)


class FluxTextEncoders(_TextEncoders):
    """CLIP-L (CLIPTextModel, pooled output) and T5."""

    def __init__(self, clip_l, t5, tokenizers):
        super().__init__(dict(clip_l=clip_l, t5=t5), tokenizers, t5.config.d_model, clip_l.config.hidden_size, 0)

    def encode(self, prompts):
        """list of n prompts -> (n, 1 + L_t5, D), packed as the module docstring says."""
        clip_ids, t5_ids = self._ids(list(prompts))
        return pack_text(self.clip_l(clip_ids).pooler_output, self.t5(t5_ids)[0])


class FlowModels(Models):
    """Models for a flow-matching family: `unet` is an SD3Policy / FluxPolicy, `text_encoder` an SD3TextEncoders /
    FluxTextEncoders, `tokenizer` the CLIP-L one (token counts), `scheduler` a static-shift
    FlowMatchEulerDiscreteScheduler (the trainer's sigmas come from config.shift and config.num_train_timesteps)."""

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """list of n prompts -> (n, 1 + L, D) packed embeddings in the text encoders' dtype."""
        return self.text_encoder.encode(list(prompts))

    @torch.no_grad()
    def decode(self, latents):
        """(n, C, h, w) latents -> (n, 3, H, W) fp32 images in [0, 1]."""
        cfg = self.vae.config
        z = latents.to(next(self.vae.parameters()).dtype) / cfg.scaling_factor + cfg.shift_factor
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)


def static_scheduler(config, image_seq_len=None):
    """A FlowMatchEulerDiscreteScheduler with a static shift from a scheduler config. A dynamic one (FLUX) gets
    mu = calculate_shift(image_seq_len, ...) as FluxPipeline computes it and shift = e^mu: the exponential time
    shift with exponent 1, e^mu / (e^mu + 1/s - 1), is the static shift * s / (1 + (shift - 1) * s) at shift = e^mu."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = dict(config)
    bad = {k: cfg[k] for k in UNSUPPORTED_SCHEDULER if cfg.get(k)}
    if cfg.get("use_dynamic_shifting") and cfg.get("time_shift_type", "exponential") != "exponential":
        bad["time_shift_type"] = cfg["time_shift_type"]
    if bad:
        raise ModelLoadError(f"scheduler config: {bad} unsupported (the trainer's sigmas use shift alone)")
    if cfg.get("use_dynamic_shifting"):
        defaults = FlowMatchEulerDiscreteScheduler().config
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        mu = calculate_shift(image_seq_len, *(cfg.get(k, defaults[k]) for k in keys))
        cfg.update(shift=math.exp(mu), use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler.from_config(cfg)


def _assemble(policy, vae, text, scheduler, reference):
    return FlowModels(
        unet=policy,
        ref_unet=reference_copy(policy, reference),
        vae=_freeze(vae),
        text_encoder=_freeze(text),
        tokenizer=text.tokenizers["clip_l"],
        scheduler=scheduler,
    )


def _tiny_vae(factors):
    """16 latent channels, downscale 4: 32x32 images <-> 8x8 latents."""
    return AutoencoderKL(
        latent_channels=16,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_FLOW["resolution"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    )


def _tiny_clip(cls, width):
    return cls(CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, projection_dim=width, **TINY_CLIP))


def _tiny_t5(width):
    config = T5Config(vocab_size=49408, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2)
    return T5EncoderModel(config)


def _tiny_tokenizers(names):
    """Offline CLIP BPE tokenizers (the tiny T5 shares CLIP's vocabulary)."""
    clip, t5 = OpenClipTokenizer(TINY_FLOW["clip_length"]), OpenClipTokenizer(TINY_FLOW["t5_length"])
    return {name: t5 if name == "t5" else clip for name in names}


def build_tiny_sd3(seed=0, reference=True):
    """Tiny SD3.5-shaped models with seeded random weights: 32x32 images, 16x8x8 latents, emb (n, 29, 48)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        side = TINY_FLOW["latent_side"]
        policy = SD3Policy(
            sample_size=side,
            pos_embed_max_size=side,
            joint_attention_dim=48,
            pooled_projection_dim=40,
            dual_attention_layers=(0,),
            **TINY_SD3,
        )
        clip_l, clip_g = _tiny_clip(CLIPTextModelWithProjection, 16), _tiny_clip(CLIPTextModelWithProjection, 24)
        text = SD3TextEncoders(clip_l, clip_g, _tiny_t5(48), _tiny_tokenizers(("clip_l", "clip_g", "t5")))
        vae = _tiny_vae(SD3_VAE)
    return _assemble(policy, vae, text, static_scheduler(dict(shift=3.0)), reference)


def build_tiny_flux(seed=0, reference=True):
    """Tiny FLUX.1-dev-shaped models with seeded random weights: 32x32 images, 16x8x8 latents, emb (n, 13, 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = FluxPolicy(
            in_channels=64, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, **TINY_FLUX
        )
        policy.latent_side = TINY_FLOW["latent_side"]
        text = FluxTextEncoders(_tiny_clip(CLIPTextModel, 16), _tiny_t5(32), _tiny_tokenizers(("clip_l", "t5")))
        vae = _tiny_vae(FLUX_VAE)
    scheduler = static_scheduler(FLUX_SCHEDULER, (TINY_FLOW["latent_side"] // 2) ** 2)
    return _assemble(policy, vae, text, scheduler, reference)


@contextlib.contextmanager
def _load_errors(folder, pipeline, layout):
    try:
        yield
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(
            f"cannot load {pipeline} from model.pretrained={folder!r}: {err}\nExpected a local diffusers folder "
            f"(model_index.json _class_name {pipeline}) holding {layout} and scheduler, with .safetensors weights."
        ) from err


def _tokenizer(folder, subfolder, max_length=None):
    """An HFTokenizer padding to the tokenizer's max length, capped at `max_length` (the T5 sequence length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    if max_length:
        tok.model_max_length = min(tok.model_max_length, max_length)
    return HFTokenizer(tok)


def _weights(cls, folder, subfolder):
    return cls.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)


def load_sd3(folder, reference=True):
    """SD3 / SD3.5 from a local diffusers folder (StableDiffusion3Pipeline layout)."""
    folder = str(folder)
    with _load_errors(folder, "StableDiffusion3Pipeline", SD3_LAYOUT):
        policy, vae = _weights(SD3Policy, folder, "transformer"), _weights(AutoencoderKL, folder, "vae")
        clip_l = _weights(CLIPTextModelWithProjection, folder, "text_encoder")
        clip_g = _weights(CLIPTextModelWithProjection, folder, "text_encoder_2")
        t5 = _weights(T5EncoderModel, folder, "text_encoder_3")
        tokenizers = dict(
            clip_l=_tokenizer(folder, "tokenizer"),
            clip_g=_tokenizer(folder, "tokenizer_2"),
            t5=_tokenizer(folder, "tokenizer_3", SD3_T5_LENGTH),
        )
        config = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
    return _assemble(policy, vae, SD3TextEncoders(clip_l, clip_g, t5, tokenizers), static_scheduler(config), reference)


def load_flux(folder, reference=True):
    """FLUX.1 from a local diffusers folder (FluxPipeline layout). The latent side is the VAE's sample size over its
    downscale (128 for FLUX.1-dev: 1024-pixel images)."""
    folder = str(folder)
    with _load_errors(folder, "FluxPipeline", FLUX_LAYOUT):
        policy, vae = _weights(FluxPolicy, folder, "transformer"), _weights(AutoencoderKL, folder, "vae")
        clip_l, t5 = _weights(CLIPTextModel, folder, "text_encoder"), _weights(T5EncoderModel, folder, "text_encoder_2")
        tokenizers = dict(clip_l=_tokenizer(folder, "tokenizer"), t5=_tokenizer(folder, "tokenizer_2", FLUX_T5_LENGTH))
        config = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
    policy.latent_side = vae.config.sample_size // _downscale(vae.config)
    scheduler = static_scheduler(config, (policy.latent_side // 2) ** 2)
    return _assemble(policy, vae, FluxTextEncoders(clip_l, t5, tokenizers), scheduler, reference)


def _downscale(vae_config):
    return 2 ** (len(vae_config.block_out_channels) - 1)


def check_flow_parts(models, where):
    """Whether a flow policy fits its VAE and text encoders: channels in = out, latent channels = the VAE's, latent
    side x the VAE's downscale = the VAE's sample size, joint_attention_dim and pooled_projection_dim = the text
    encoders' packed widths. ModelLoadError naming `where` and every mismatch."""
    policy, vae, text = models.unet.config, models.vae.config, models.text_encoder.config
    channels, side, _ = models.latent_shape
    problems = []
    if (policy.out_channels or policy.in_channels) != policy.in_channels:
        problems.append(f"the transformer takes {policy.in_channels} and gives {policy.out_channels} channels")
    if channels != vae.latent_channels:
        problems.append(f"the transformer's latents have {channels} channels, the VAE's {vae.latent_channels}")
    if side * _downscale(vae) != vae.sample_size:
        problems.append(
            f"the transformer's {side}-latent samples decode to {side * _downscale(vae)} pixels "
            f"(VAE downscale {_downscale(vae)}), the VAE's sample_size is {vae.sample_size}"
        )
    for key in ("joint_attention_dim", "pooled_projection_dim"):
        if policy.get(key) != text[key]:
            problems.append(f"the transformer's {key} is {policy.get(key)}, the text encoders give {text[key]}")
    if problems:
        raise ModelLoadError(f"{where}: the model's parts do not fit together: " + "; ".join(problems))
