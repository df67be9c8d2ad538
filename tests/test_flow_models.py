import copy
import json
import math

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTokenizer

from prdp_ds.flow_models import (
    FLUX_SCHEDULER,
    FluxPolicy,
    SD3Policy,
    build_tiny_flux,
    build_tiny_sd3,
    check_flow_parts,
    static_scheduler,
)
from prdp_ds.lora import add_lora
from prdp_ds.models import ModelLoadError, OpenClipTokenizer, load_models

FAMILIES = ["sd3", "flux"]
BUILD = {"sd3": build_tiny_sd3, "flux": build_tiny_flux}
PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
PROMPTS = ["a painting of a fox in the snow", "", "a red cube"]


def inputs(models, n=3, seed=0):
    """Fresh random (x, t, emb, kwargs) for n rows; FLUX rows get distinct guidance values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *models.latent_shape, generator=gen)
    t = torch.rand(n, generator=gen) * 1000
    emb = torch.randn(n, *models.encode_prompts(PROMPTS[:1]).shape[1:], generator=gen)
    kwargs = {"guidance": 1 + 6 * torch.rand(n, generator=gen)} if models.unet.guidance_distilled else {}
    return x, t, emb, kwargs


def rows(kwargs, i):
    return {k: v[i : i + 1] for k, v in kwargs.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, BUILD[request.param](0)


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_sources_are_seeded_with_a_frozen_reference(name):
    m1, m2, m3 = (load_models(f"tiny_{name}", seed=s) for s in (0, 0, 1))
    p1, p2, p3 = (next(m.unet.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert all(p.requires_grad for p in m1.unet.parameters())
    for frozen in (m1.ref_unet, m1.vae, m1.text_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert load_models(f"tiny_{name}", reference=False).ref_unet is None


def test_policy_output_shape_and_a_row_alone_is_the_row_in_a_batch_within_fp64_rounding(family):
    _, m = family
    x, t, emb, kw = inputs(m)
    fp64 = copy.deepcopy(m.unet).double()
    with torch.no_grad():
        batch = m.unet(x, t, emb, **kw).sample
        alone = torch.cat([m.unet(x[i : i + 1], t[i : i + 1], emb[i : i + 1], **rows(kw, i)).sample for i in range(3)])
        exact = fp64(x.double(), t.double(), emb.double(), **{k: v.double() for k, v in kw.items()}).sample
    assert batch.shape == x.shape == (3, *m.latent_shape)
    err, batch_err = (alone.double() - exact).abs().max(), (batch.double() - exact).abs().max()
    assert err <= 2 * batch_err + 1e-6 * exact.abs().max(), (err, batch_err)


def test_sd3_policy_is_the_transformer_on_the_unpacked_conditioning():
    m = build_tiny_sd3(0)
    x, t, emb, _ = inputs(m)
    pooled, sequence = emb[:, 0, : m.unet.config.pooled_projection_dim], emb[:, 1:]
    with torch.no_grad():
        want = SD3Transformer2DModel.forward(
            m.unet, hidden_states=x, encoder_hidden_states=sequence, pooled_projections=pooled, timestep=t
        ).sample
        assert torch.equal(m.unet(x, t, emb).sample, want)
    with pytest.raises(ValueError, match="not guidance-distilled"):
        m.unet(x, t, emb, guidance=torch.ones(3))


def test_flux_policy_is_the_transformer_on_pipeline_packed_latents_and_ids():
    m = build_tiny_flux(0)
    x, t, emb, kw = inputs(m)
    n, c, h, w = x.shape
    vae_scale = 2 ** (len(m.vae.config.block_out_channels) - 1)
    with torch.no_grad():
        tokens = FluxTransformer2DModel.forward(
            m.unet,
            hidden_states=FluxPipeline._pack_latents(x, n, c, h, w),
            encoder_hidden_states=emb[:, 1:],
            pooled_projections=emb[:, 0, : m.unet.config.pooled_projection_dim],
            timestep=t / 1000,
            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype),
            txt_ids=torch.zeros(emb.shape[1] - 1, 3),
            guidance=kw["guidance"],
        ).sample
        want = FluxPipeline._unpack_latents(tokens, h * vae_scale, w * vae_scale, vae_scale)
        got = m.unet(x, t, emb, **kw).sample
        assert torch.equal(got, want)
        assert not torch.allclose(got, m.unet(x, t, emb, guidance=kw["guidance"] + 1).sample)
    with pytest.raises(ValueError, match="guidance"):
        m.unet(x, t, emb)


def test_encode_prompts_packs_the_pooled_row_and_the_sequence(family):
    name, m = family
    te, cfg = m.text_encoder, m.unet.config
    emb = m.encode_prompts(PROMPTS)
    length = te.tokenizers["t5"].context_length + (te.tokenizers["clip_l"].context_length if name == "sd3" else 0)
    assert emb.shape == (3, 1 + length, cfg.joint_attention_dim) and torch.isfinite(emb).all()
    ids = {k: te.tokenizers[k](PROMPTS) for k in te.names}
    if name == "sd3":
        pooled = torch.cat([te.clip_l(ids["clip_l"]).text_embeds, te.clip_g(ids["clip_g"]).text_embeds], dim=-1)
    else:
        pooled = te.clip_l(ids["clip_l"]).pooler_output
    P = cfg.pooled_projection_dim
    assert torch.equal(emb[:, 0, :P], pooled) and not emb[:, 0, P:].any()
    assert torch.equal(emb[:, -ids["t5"].shape[1] :], te.t5(ids["t5"])[0])
    torch.testing.assert_close(m.encode_prompts(PROMPTS[1:2])[0], emb[1])  # the empty prompt, alone or in a batch


def test_decode_undoes_scaling_and_shift_factors(family):
    _, m = family
    z = torch.randn(3, *m.latent_shape)
    cfg = m.vae.config
    images = m.decode(z)
    want = (m.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (3, 3, cfg.sample_size, cfg.sample_size) and images.dtype == torch.float32
    assert torch.equal(images, want) and images.min() >= 0 and images.max() <= 1
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1


def test_schedulers_have_a_static_shift_and_flux_takes_e_to_the_mu():
    sd3, flux = build_tiny_sd3(0).scheduler.config, build_tiny_flux(0).scheduler.config
    assert not sd3.use_dynamic_shifting and sd3.shift == 3.0 and sd3.num_train_timesteps == 1000
    mu = calculate_shift((8 // 2) ** 2, 256, 4096, 0.5, 1.15)  # 16 image tokens, FLUX.1-dev's scheduler config
    assert not flux.use_dynamic_shifting and flux.shift == math.exp(mu)


def test_the_dynamic_exponential_time_shift_is_the_static_shift_at_e_to_the_mu():
    dynamic = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    s = torch.linspace(1, 1 / 50, 50, dtype=torch.float64)
    for seq_len in (16, 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        shift = static_scheduler(FLUX_SCHEDULER, seq_len).config.shift
        torch.testing.assert_close(
            dynamic.time_shift(mu, 1.0, s), shift * s / (1 + (shift - 1) * s), rtol=1e-15, atol=0
        )
        static = static_scheduler(FLUX_SCHEDULER, seq_len)
        dynamic.set_timesteps(sigmas=s.numpy(), mu=mu)
        static.set_timesteps(sigmas=s.numpy())
        # set_timesteps rounds its sigmas to fp32 first and evaluates the two formulas in fp32: an ulp or two apart
        torch.testing.assert_close(dynamic.sigmas, static.sigmas, rtol=2 * 2**-23, atol=0)


@pytest.mark.parametrize("bad", [dict(shift_terminal=0.1), dict(use_karras_sigmas=True), dict(invert_sigmas=True)])
def test_static_scheduler_refuses_what_the_trainer_cannot_express(bad):
    with pytest.raises(ModelLoadError, match=next(iter(bad))):
        static_scheduler({**FLUX_SCHEDULER, **bad}, 16)
    with pytest.raises(ModelLoadError, match="time_shift_type"):
        static_scheduler({**FLUX_SCHEDULER, "time_shift_type": "linear"}, 16)


def save_clip_tokenizer(folder, length):
    """A transformers CLIPTokenizer from open_clip's BPE (offline), padding with '!' (id 0) as open_clip does."""
    bpe = OpenClipTokenizer(length)._tok
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF spelling
    vocab = {specials.get(k, k): v for k, v in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=length).save_pretrained(folder)


def save_flow_folder(models, name, root):
    """Tiny models in the diffusers StableDiffusion3Pipeline / FluxPipeline layout (safetensors weights); the T5
    slot gets a CLIP BPE tokenizer (the tiny T5 shares CLIP's vocabulary), FLUX its dynamic-shift scheduler."""
    models.unet.save_pretrained(root / "transformer", safe_serialization=True)
    models.vae.save_pretrained(root / "vae", safe_serialization=True)
    te = models.text_encoder
    for i, key in enumerate(te.names):
        suffix = f"_{i + 1}" if i else ""
        getattr(te, key).save_pretrained(root / f"text_encoder{suffix}")
        save_clip_tokenizer(root / f"tokenizer{suffix}", te.tokenizers[key].context_length)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER) if name == "flux" else models.scheduler
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": PIPELINE[name]}))
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (tiny models, their folder, the models loaded back through load_models)."""
    out = {}
    for name in FAMILIES:
        tiny = BUILD[name](5)
        folder = save_flow_folder(tiny, name, tmp_path_factory.mktemp(name))
        out[name] = (tiny, folder, load_models(str(folder)))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_a_saved_folder_loads_back_through_load_models_with_identical_outputs(saved, name):
    tiny, _, loaded = saved[name]
    assert type(loaded.unet) is type(tiny.unet) and loaded.latent_shape == tiny.latent_shape
    assert loaded.scheduler.config.shift == tiny.scheduler.config.shift
    assert not loaded.scheduler.config.use_dynamic_shifting
    assert loaded.tokenizer.lengths(PROMPTS) == tiny.tokenizer.lengths(PROMPTS)
    emb = loaded.encode_prompts(PROMPTS)
    assert torch.equal(emb, tiny.encode_prompts(PROMPTS))
    x, t, _, kw = inputs(tiny)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, emb, **kw).sample, tiny.unet(x, t, emb, **kw).sample)
        assert torch.equal(loaded.ref_unet(x, t, emb, **kw).sample, tiny.unet(x, t, emb, **kw).sample)
    assert torch.equal(loaded.decode(x), tiny.decode(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_prompts_is_the_diffusers_pipelines_encode_prompt(saved, name):
    _, _, m = saved[name]
    te = m.text_encoder
    hf = {k: te.tokenizers[k]._tok for k in te.names}
    t5_length = te.tokenizers["t5"].context_length
    if name == "sd3":
        pipe = StableDiffusion3Pipeline(
            m.unet, m.scheduler, m.vae, te.clip_l, hf["clip_l"], te.clip_g, hf["clip_g"], te.t5, hf["t5"]
        )
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=t5_length
        )
    else:
        pipe = FluxPipeline(m.scheduler, m.vae, te.clip_l, hf["clip_l"], te.t5, hf["t5"], m.unet)
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=t5_length)
    emb = m.encode_prompts(PROMPTS)
    assert torch.equal(emb[:, 1:], embeds) and torch.equal(emb[:, 0, : pooled.shape[1]], pooled)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_folder_missing_the_transformer_names_the_folder_and_the_layout(saved, tmp_path, name):
    tiny, _, _ = saved[name]
    folder = save_flow_folder(tiny, name, tmp_path)
    for f in (folder / "transformer").iterdir():
        f.unlink()
    with pytest.raises(ModelLoadError, match="transformer") as err:
        load_models(str(folder))
    assert str(folder) in str(err.value) and PIPELINE[name] in str(err.value)


def test_a_malformed_model_index_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text("[]")
    with pytest.raises(ModelLoadError, match="model_index.json: expected a JSON object"):
        load_models(str(tmp_path))


def test_check_flow_parts_names_every_mismatch():
    m, other = build_tiny_flux(0), build_tiny_sd3(0)
    m.text_encoder = other.text_encoder  # 48 / 40 wide instead of 32 / 16
    m.unet.latent_side = 4  # 16 pixels, the VAE's sample_size is 32
    with pytest.raises(ModelLoadError) as err:
        check_flow_parts(m, "here")
    msg = str(err.value)
    assert msg.startswith("here:") and "joint_attention_dim is 32" in msg and "pooled_projection_dim is 16" in msg
    assert "sample_size is 32" in msg


def test_a_flux_policy_without_a_latent_side_says_so():
    with pytest.raises(ValueError, match="latent_side"):
        _ = FluxPolicy(in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=8).latent_shape


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_at_init_is_the_base_policy_exactly_and_only_adapters_train(name):
    m = BUILD[name](0)
    x, t, emb, kw = inputs(m)
    with torch.no_grad():
        base = m.unet(x, t, emb, **kw).sample
        m.add_lora(4)
        assert torch.equal(m.unet(x, t, emb, **kw).sample, base)
        assert torch.equal(m.ref_unet(x, t, emb, **kw).sample, base)
    trainable = [n for n, p in m.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="already"):
        add_lora(m.unet, 2)


def test_gradients_reach_the_policy_parameters(family):
    name, m = family
    policy = copy.deepcopy(m.unet)
    x, t, emb, kw = inputs(m)
    policy.enable_gradient_checkpointing()
    policy(x, t, emb, **kw).sample.sum().backward()
    # SD3's last block is context_pre_only: its text queries feed only the text stream, which is dropped.
    last = f"transformer_blocks.{policy.config.num_layers - 1}.attn."
    unused = {last + s for s in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")}
    unused = unused if name == "sd3" else set()
    for n, p in policy.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert (p.grad.abs().sum() > 0) == (n not in unused), n


def test_policies_subclass_the_diffusers_transformers():
    assert issubclass(SD3Policy, SD3Transformer2DModel) and issubclass(FluxPolicy, FluxTransformer2DModel)
    assert not SD3Policy.guidance_distilled and FluxPolicy.guidance_distilled
