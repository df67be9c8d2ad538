import pytest
import torch
from helpers import _cfg, save_sd_folder

from prdp_ds.engine import build_ds_config, make_engine
from prdp_ds.models import ModelLoadError, build_tiny, check_parts, load_models, load_pretrained, make_scheduler


def test_tiny_is_seeded_and_ref_is_a_frozen_copy():
    m1, m2, m3 = build_tiny(0), build_tiny(0), build_tiny(1)
    p1, p2, p3 = (next(m.unet.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert all(not p.requires_grad for p in m1.ref_unet.parameters())
    assert all(p.requires_grad for p in m1.unet.parameters())
    with torch.no_grad():
        p1.add_(1.0)
    assert not torch.equal(p1, next(m1.ref_unet.parameters()))


def test_tiny_tokenizer_encoder_and_decoder():
    m = build_tiny(0)
    ids = m.tokenizer(["a painting of a cat", ""])
    assert ids.shape == (2, 16) and ids[0, 0] == 49406
    emb = m.encode_prompts(["a cat", "a dog", "a cat"])
    assert emb.shape == (3, 16, 32)
    torch.testing.assert_close(emb[0], emb[2])
    images = m.decode(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_load_pretrained_round_trip(tmp_path):
    tiny = build_tiny(3)
    save_sd_folder(tiny, tmp_path)
    loaded = load_models(str(tmp_path))
    for a, b in zip(tiny.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.scheduler.config.steps_offset == 1
    prompts = ["a painting of a fox", ""]
    torch.testing.assert_close(loaded.tokenizer(prompts), tiny.tokenizer(prompts))
    torch.testing.assert_close(loaded.encode_prompts(prompts), tiny.encode_prompts(prompts))


@pytest.mark.parametrize("source", ["tiny", "world", "sd_folder"])
def test_reference_false_makes_no_copy(tmp_path, monkeypatch, source):
    """Evaluation loads with reference=False: no reference UNet, and no deep copy of the UNet is made
    (at SD size 860 M fp32 parameters: 3.4 GB of host memory)."""
    if source == "sd_folder":
        save_sd_folder(build_tiny(3), tmp_path)
        source = str(tmp_path)
    import copy

    from diffusers import UNet2DConditionModel

    real = copy.deepcopy

    def no_unet_copies(obj, *args, **kwargs):
        assert not isinstance(obj, UNet2DConditionModel), "the UNet was copied"
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_unet_copies)
    m = load_models(source, reference=False)
    assert m.ref_unet is None
    m.to("cpu", frozen_dtype=torch.bfloat16)  # moving skips the missing reference
    assert next(m.vae.parameters()).dtype == torch.bfloat16
    assert next(m.unet.parameters()).dtype == torch.float32


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(ModelLoadError, match=r"(?s)model.pretrained=.*unet, vae, text_encoder, tokenizer, scheduler"):
        load_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("bad", [{"clip_sample": True}, {"thresholding": True}, {"prediction_type": "v_prediction"}])
def test_scheduler_options_the_sampler_cannot_express_are_refused(bad):
    from prdp_ds.models import SD14_SCHEDULER

    with pytest.raises(ModelLoadError, match="clip_sample=False"):
        make_scheduler({**SD14_SCHEDULER, **bad})


@pytest.mark.parametrize("rows", [1, 5])
def test_channels_last_gives_the_contiguous_eps_within_rounding_of_fp64(rows):
    import copy

    from prdp_ds.sampler import cfg_predict

    m = build_tiny(0)
    fp64 = copy.deepcopy(m.unet).double()
    m.apply_options(channels_last=True)
    assert m.ref_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not m.ref_unet.conv_in.weight.is_contiguous() and m.unet.conv_in.weight.is_contiguous()
    plain = build_tiny(0).unet
    gen = torch.Generator().manual_seed(rows)
    x, cond, uncond = (torch.randn(shape, generator=gen) for shape in ((rows, 4, 8, 8), (rows, 16, 32), (rows, 16, 32)))
    t = torch.randint(0, 1000, (rows,), generator=gen)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = cfg_predict(fp64, x.double(), t, cond.double(), uncond.double())
        for got, want, ref in zip(
            cfg_predict(m.ref_unet, x_cl, t, cond, uncond), cfg_predict(plain, x, t, cond, uncond), exact
        ):
            err, plain_err = (got.double() - ref).abs().max(), (want.double() - ref).abs().max()
            assert err <= 2 * plain_err + 1e-6, (err, plain_err)


def test_channels_last_leaves_a_policy_deepspeed_can_wrap():
    """deepspeed.initialize broadcasts parameters through byte views: channels_last weights made it fail."""
    m = build_tiny(0).apply_options(channels_last=True)
    engine = make_engine(
        m.unet,
        build_ds_config({"zero_allow_untested_optimizer": True}, _cfg(1, 2, 1e-3), 1),
        torch.optim.SGD(m.unet.parameters(), lr=0.0),
    )
    assert engine.module is m.unet


def test_compile_option_compiles_the_reference_forward_only(monkeypatch):
    """torch.compile of the tiny UNet takes minutes on 2 CPU cores: the test checks the wiring, not the compiler."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    m = build_tiny(0)
    unet_forward = m.unet.forward
    m.apply_options(compile=True)
    assert len(compiled) == 1 and compiled[0].__self__ is m.ref_unet and "forward" in vars(m.ref_unet)
    assert m.unet.forward == unet_forward and "forward" not in vars(m.unet)
    lora = build_tiny(0).add_lora(2)
    lora.apply_options(channels_last=True, compile=True)  # the reference is the policy itself: left alone
    assert len(compiled) == 1 and lora.unet.conv_in.weight.is_contiguous()
    wrapped = build_tiny(0)
    wrapped.unet.module = wrapped.unet  # stands in for a DeepSpeed engine
    with pytest.raises(RuntimeError, match="before the UNet is wrapped"):
        wrapped.apply_options(channels_last=True)


def test_model_options_are_config_keys_checked_at_resolution():
    from prdp_ds.config import ConfigError, resolve

    cfg = resolve("tiny_demo", overrides=["model.channels_last=true", "model.compile=true"])
    assert cfg.model.channels_last is True and cfg.model.compile is True
    assert resolve().model.channels_last is False and resolve().model.compile is False
    with pytest.raises(ConfigError, match="model.compile: expected bool"):
        resolve("tiny_demo", overrides=["model.compile=1"])
    with pytest.raises(ConfigError, match="sampler.ref_batch_size: expected at least 1, got 0"):
        resolve("tiny_demo", overrides=["sampler.ref_batch_size=0"])


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"in_channels": 8}, "the UNet takes 8 and gives 4 latent channels, the VAE's latents have 4"),
        ({"out_channels": 3}, "the UNet takes 4 and gives 3 latent channels"),
        (
            {"sample_size": 16},
            "the UNet's 16-latent samples decode to 64 pixels (VAE downscale 4), the VAE's sample_size is 32",
        ),
        ({"cross_attention_dim": 64}, "the UNet's cross-attention width is 64, the text encoder's hidden size 32"),
    ],
)
def test_check_parts_names_the_model_and_each_mismatch(change, problem):
    m = build_tiny(0)
    check_parts(m.unet.config, m.vae.config, m.text_encoder.config, "model.pretrained='tiny'")
    with pytest.raises(ModelLoadError) as err:
        check_parts({**m.unet.config, **change}, m.vae.config, m.text_encoder.config, "model.pretrained='/sd'")
    assert str(err.value).startswith("model.pretrained='/sd': the model's parts do not fit together: ")
    assert problem in str(err.value)


def test_the_world_models_parts_fit():
    m = load_models("world", reference=False)
    check_parts(m.unet.config, m.vae.config, m.text_encoder.config, "model.pretrained='world'")
    with pytest.raises(ModelLoadError, match="the VAE's latents have 3"):
        check_parts({**m.unet.config, "in_channels": 4}, m.vae.config, m.text_encoder.config, "world")
