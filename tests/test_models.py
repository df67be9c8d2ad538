import json

import pytest
import torch

from prdp_ds.models import ModelLoadError, OpenClipTokenizer, build_tiny, load_models, load_pretrained, make_scheduler


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


def _save_as_sd_folder(models, root):
    """Write tiny models in the diffusers Stable Diffusion layout, tokenizer files included."""
    models.unet.save_pretrained(root / "unet")
    models.vae.save_pretrained(root / "vae")
    models.text_encoder.save_pretrained(root / "text_encoder")
    models.scheduler.save_pretrained(root / "scheduler")
    bpe = OpenClipTokenizer(16)._tok
    (root / "tokenizer").mkdir()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF spelling
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({specials.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 16, "pad_token": "!"})
    )  # id 0, as open_clip pads


def test_load_pretrained_round_trip(tmp_path):
    tiny = build_tiny(3)
    _save_as_sd_folder(tiny, tmp_path)
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
        _save_as_sd_folder(build_tiny(3), tmp_path)
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
