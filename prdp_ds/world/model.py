"""The world's base text-to-image model: a tiny UNet2DConditionModel on 3x16x16 latents, a tiny
CLIPTextModel, the offline CLIP BPE tokenizer and a DDIM scheduler, packaged as prdp_ds.models.Models.

The latent space is fixed, not learned (`PooledVAE`): a latent is the 32x32 scene in [-1, 1]
average-pooled 2x2 (3x16x16), and decoding upsamples it bilinearly back to 32x32 (Models.decode then
maps [-1, 1] to [0, 1] as for Stable Diffusion). The classifier reads such round trips of fresh scenes
as well as the renders (tests/test_world.py asserts > 0.98 on every attribute). Why a latent space at
all: a trajectory's log-probability is a sum over its latent dimensions, so the policy-gradient noise
per image grows with them, while what the rewards see (colour, shape, size, position) fits in 16x16;
the UNet is also 4x cheaper per call there.

Weights (from `python -m prdp_ds.world.pretrain`) live in prdp_ds/world/weights as safetensors
(stored in fp16 to keep the folder small, loaded as fp32); `build_world_models()` loads them when
present, `build_world_models(weights=False)` gives seeded random weights.

The flow-matching world (`world_flow`, `build_world_flow_models`): the same UNet, text encoder and latent space
trained as a rectified flow (`pretrain --objective flow`: x_sigma = (1 - sigma) x0 + sigma eps, the UNet predicts
v = eps - x0 at time sigma * 1000), with a FlowMatchEulerDiscreteScheduler (shift 1): the sampler's flow SDE policy
(Flow-GRPO) instead of DDIM. Its weights live in prdp_ds/world/weights_flow.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from prdp_ds.models import (
    SD14_SCHEDULER,
    ModelLoadError,
    Models,
    OpenClipTokenizer,
    _freeze,
    make_scheduler,
    reference_copy,
)
from prdp_ds.world.scenes import RES

WEIGHTS_DIR = Path(__file__).parent / "weights"
FLOW_WEIGHTS_DIR = Path(__file__).parent / "weights_flow"
FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)  # 16x16 latents: no resolution shift
CONTEXT_LENGTH = 24
TEXT_DIM = 32
# DDPM's linear schedule (beta 1e-4 .. 0.02, the usual one for 32x32 pixel diffusion): its last
# step has alpha_bar ~ 4e-5, where SD v1.4's scaled-linear schedule (made for 64x64 latents) keeps
# alpha_bar = 0.0047 and so leaks the image's mean colour into x_T. The DDIM/PRDP settings are SD's.
SCHEDULER = {**SD14_SCHEDULER, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
LATENT_FACTOR = 2  # pixels per latent cell along each side
UNET = dict(
    sample_size=RES // LATENT_FACTOR,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    # cross-attention (text) at 4x4 (the 16x16 latent halved twice) and in the mid block only
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=TEXT_DIM,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=CONTEXT_LENGTH,
)


class PooledVAE(torch.nn.Module):
    """The world's fixed autoencoder: encode = 2x2 average pooling of the image in [-1, 1], decode =
    bilinear 2x upsampling (decode(z).sample, as diffusers' AutoencoderKL). Holds one frozen dummy
    parameter so that next(vae.parameters()) gives a device and dtype."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=1.0, latent_channels=3, downscale=LATENT_FACTOR, sample_size=RES)

    def decode(self, z):
        """(n, 3, 16, 16) latents -> (n, 3, 32, 32) images in [-1, 1] (not clamped)."""
        return SimpleNamespace(
            sample=F.interpolate(z, scale_factor=LATENT_FACTOR, mode="bilinear", align_corners=False)
        )

    @staticmethod
    def encode(images):
        """(n, 3, 32, 32) images in [0, 1] -> (n, 3, 16, 16) latents in [-1, 1]."""
        return F.avg_pool2d(images * 2 - 1, LATENT_FACTOR)


def new_unet(**overrides):
    return UNet2DConditionModel(**{**UNET, **overrides})


def new_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT))


def new_parts(seed=0, unet_overrides=None):
    """(unet, text_encoder) with seeded random weights (unet_overrides: UNet config changes, for tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_unet(**(unet_overrides or {})), new_text_encoder()


def save_parts(out, unet, text_encoder):
    """Write unet.safetensors and text_encoder.safetensors (fp16) into `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        state = {
            k: v.detach().to("cpu", torch.float16).contiguous()
            for k, v in module.state_dict().items()
            if v.is_floating_point()
        }
        save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt", "stored_dtype": "float16"})


def load_parts(weights):
    """(unet, text_encoder) fp32 from a weights folder (safetensors only)."""
    from safetensors.torch import load_file

    weights = Path(weights)
    unet, text_encoder = new_parts(0)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        path = weights / f"{name}.safetensors"
        if not path.is_file():
            raise ModelLoadError(
                f"world model: {path} not found; train it with `python -m prdp_ds.world.pretrain --out {weights}`"
            )
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise ModelLoadError(
                f"world model: {path} does not match the model config "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    return unet, text_encoder


def world_scheduler(flow=False):
    """The world's DDIM scheduler (SCHEDULER), or with flow=True its rectified-flow one (FLOW_SCHEDULER)."""
    if flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)
    return make_scheduler(SCHEDULER)


def build_world_models(weights=None, seed=0, reference=True, flow=False):
    """prdp_ds.models.Models for the world (flow=True: the flow-matching world).

    weights: a folder with unet/text_encoder safetensors; None -> the shipped prdp_ds/world/weights (weights_flow);
    False -> seeded random weights (seed). reference=False: no reference UNet (ref_unet None)."""
    if weights is False:
        unet, text_encoder = new_parts(seed)
    else:
        unet, text_encoder = load_parts((FLOW_WEIGHTS_DIR if flow else WEIGHTS_DIR) if weights is None else weights)
    unet.train()
    return Models(
        unet=unet,
        ref_unet=reference_copy(unet, reference),
        vae=_freeze(PooledVAE()),
        text_encoder=_freeze(text_encoder),
        tokenizer=OpenClipTokenizer(CONTEXT_LENGTH),
        scheduler=world_scheduler(flow),
    )


def build_world_flow_models(weights=None, seed=0, reference=True):
    """The flow-matching world (model.pretrained 'world_flow'): build_world_models with flow=True."""
    return build_world_models(weights, seed, reference, flow=True)


def config_dict(flow=False):
    scheduler = FLOW_SCHEDULER if flow else SCHEDULER
    return {"unet": UNET, "text_encoder": TEXT, "context_length": CONTEXT_LENGTH, "scheduler": scheduler}


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    u, t = new_parts()
    print(json.dumps({"unet_params": count_params(u), "text_params": count_params(t)}))
