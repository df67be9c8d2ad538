"""Pretrained preference rewards (HPSv2, PickScore, LAION aesthetic): parity on CPU (docs/design.md §12, §14).

No weights can be downloaded here, so every model is the real architecture (open_clip CLIP,
transformers CLIPModel, the aesthetic MLP) at a tiny width with random weights, saved in the
public files' format and reloaded through the factories' real loading path. References are computed
independently: each model's own PIL preprocessing (HPSv2's ResizeMaxSize transform / open_clip's
image_transform, transformers' CLIPImageProcessorPil, OpenAI CLIP's Resize+CenterCrop) and the
published score formulas.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers import CLIPConfig, CLIPModel

try:  # transformers >= 5: the PIL backend has its own class
    from transformers import CLIPImageProcessorPil
except ImportError:  # transformers 4.x: the default one is PIL-based
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

from prdp_ds import reward_models as rm
from prdp_ds.rewards import RewardError, available_rewards, build_reward

MEAN, STD = rm.OPENAI_CLIP_MEAN, rm.OPENAI_CLIP_STD
ONE_STEP = 1.0 / 255.0 / min(STD) + 1e-4  # one uint8 step after normalization (~0.0150)
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red cube on a blue sphere, trending on artstation",
    "Grace Hopper in uniform",
    "café sign at night, 35mm",
    "an extremely long prompt " * 20,
]

# (width, height): non-square, both orientations; (417, 300) puts the center crop on a rounding tie
# (311 - 224 = 87: torchvision rounds the offset 43.5 to 44, transformers floors to 43); (150, 97) is
# upscaled; (512, 512) is what SD1.x produces.
SIZES = [(417, 300), (333, 600), (150, 97), (512, 512)]


# ------------------------------------------------------------------------------------------------
# Fixtures: real images, tiny real architectures saved like the public files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo():
    """A real photograph (matplotlib's sample image) or, without it, a textured synthetic one."""
    try:
        import matplotlib.cbook as cbook

        return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    except Exception:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:600, 0:512]
        arr = np.stack([np.sin(xx / (5 + 3 * c)) * np.cos(yy / 9.0) for c in range(3)], -1) * 90 + 128
        return Image.fromarray(np.clip(arr + rng.normal(0, 25, arr.shape), 0, 255).astype(np.uint8))


def _images(photo, size, n=1, seed=0):
    """n real PIL images of (width, height) = size: different crops of the photo, resized if needed."""
    w, h = size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cw, ch = min(w, photo.width), min(h, photo.height)
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        im = photo.crop((x0, y0, x0 + cw, y0 + ch))
        out.append(im if im.size == size else im.resize(size, Image.BICUBIC))
    return out


def _to_tensor(pils):
    return torch.stack([TF.pil_to_tensor(im) for im in pils]).float() / 255.0


@pytest.fixture(autouse=True, scope="module")
def _fresh_model_cache():
    rm.clear_cache()
    yield
    rm.clear_cache()


def write_clip_tokenizer(folder):
    """CLIP's tokenizer files as the laion / openai hub folders hold them (vocab.json, merges.txt,
    tokenizer_config.json), made from the BPE file that open_clip ships."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _tiny_hf_clip(seed, projection_dim=16):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # spread the embeddings so scores differ between images and prompts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.logit_scale.fill_(4.2)  # exp = 66.7: the formula must use it, not assume 100
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_weights")
    paths = {}

    # HPSv2: an open_clip model config (JSON) and a checkpoint {'state_dict': fp16 tensors, ...} like
    # HPS_v2_compressed.pt. The model is built by open_clip's own factory from the same JSON.
    cfg_path = root / "tiny-hps-clip.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-clip", pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(
        {"state_dict": {k: v.half() for k, v in model.state_dict().items()}, "epoch": 1}, root / "HPS_v2_compressed.pt"
    )
    paths["hps_cfg"], paths["hps_ckpt"] = str(cfg_path), str(root / "HPS_v2_compressed.pt")

    # PickScore: a CLIPModel folder (like yuvalkirstain/PickScore_v1) and a processor folder holding
    # CLIP's tokenizer and the laion ViT-H-14 preprocessor_config.json (legacy int sizes, as published).
    pick = _tiny_hf_clip(1)
    pick.save_pretrained(root / "PickScore_v1")
    proc_dir = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    write_clip_tokenizer(proc_dir)
    (proc_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": 224,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": list(MEAN),
                "image_std": list(STD),
                "resample": 3,
                "size": 224,
            }
        )
    )
    paths["pick_model"], paths["pick_proc"] = str(root / "PickScore_v1"), str(proc_dir)

    # Aesthetic: a CLIP folder (like openai/clip-vit-large-patch14, tiny: 16-dim embeddings) and the
    # MLP's plain state dict saved with torch.save like sac+logos+ava1-l14-linearMSE.pth.
    _tiny_hf_clip(2).save_pretrained(root / "clip-vit-large-patch14")
    torch.manual_seed(3)
    mlp = ReferenceMLP(16)
    with torch.no_grad():  # a linear map with a published-like output range (mean ~5.5, spread ~1)
        mlp.layers[0].weight.mul_(300.0)
        mlp.layers[7].bias.fill_(5.5)
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    paths["aes_clip"], paths["aes_mlp"] = (
        str(root / "clip-vit-large-patch14"),
        str(root / "sac+logos+ava1-l14-linearMSE.pth"),
    )
    paths["root"] = root
    return paths


class ReferenceMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP as published (simple_inference.py)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024),
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


def _hps(files, **kw):
    return rm.hpsv2(checkpoint=files["hps_ckpt"], clip_model=files["hps_cfg"], **kw)


def _pick(files, **kw):
    return rm.pickscore(model=files["pick_model"], processor=files["pick_proc"], **kw)


def _aes(files, **kw):
    return rm.aesthetic(mlp=files["aes_mlp"], clip_model=files["aes_clip"], **kw)


# ------------------------------------------------------------------------------------------------
# The models' own PIL preprocessing, written independently of prdp_ds
# ------------------------------------------------------------------------------------------------


class HPSv2ResizeMaxSize(torch.nn.Module):
    """HPSv2's transform (its open_clip fork, image_transform(..., resize_longest_max=True))."""

    def __init__(self, max_size, fill=0):
        super().__init__()
        self.max_size, self.fill = max_size, fill

    def forward(self, img):
        width, height = img.size
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = self.max_size - new_size[0], self.max_size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill)
        return img


def hpsv2_pil_preprocess(size=224):
    return T.Compose([HPSv2ResizeMaxSize(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def openai_clip_pil_preprocess(size=224):
    """OpenAI CLIP's clip.load preprocess (what improved-aesthetic-predictor embeds with)."""
    return T.Compose(
        [
            T.Resize(size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def _assert_pixels_close(ours, ref):
    """Within 1e-2 per normalized pixel, except PIL's own rounding ties: one uint8 step at most, rarely."""
    assert ours.shape == ref.shape
    d = (ours - ref).abs()
    assert d.max().item() <= ONE_STEP, f"max diff {d.max().item():.4f}"
    assert (d > 1e-2).float().mean().item() < 2e-3, f"{(d > 1e-2).float().mean().item():.4%} of pixels off by > 1e-2"
    assert d.mean().item() < 1e-4, f"mean diff {d.mean().item():.2e}"


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_preprocess_matches_pil(files, photo, size):
    ours = _hps(files).bundle.preprocess
    pils = _images(photo, size, n=2)
    got = ours(_to_tensor(pils))
    ref = torch.stack([hpsv2_pil_preprocess()(im) for im in pils])
    _assert_pixels_close(got, ref)
    # current open_clip's equivalent transform agrees too
    oc = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD, resize_mode="longest")
    _assert_pixels_close(got, torch.stack([oc(im) for im in pils]))


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_preprocess_matches_clip_image_processor(files, photo, size):
    ours = _pick(files).bundle.preprocess
    pils = _images(photo, size, n=2)
    proc = CLIPImageProcessorPil.from_pretrained(files["pick_proc"])
    ref = proc(images=pils, return_tensors="pt")["pixel_values"]
    _assert_pixels_close(ours(_to_tensor(pils)), ref)


@pytest.mark.parametrize("size", SIZES)
def test_aesthetic_preprocess_matches_openai_clip(files, photo, size):
    ours = _aes(files).bundle.preprocess
    pils = _images(photo, size, n=2)
    ref = torch.stack([openai_clip_pil_preprocess()(im) for im in pils])
    _assert_pixels_close(ours(_to_tensor(pils)), ref)
    oc = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD)  # open_clip's 'shortest' == OpenAI's
    _assert_pixels_close(ours(_to_tensor(pils)), torch.stack([oc(im) for im in pils]))


def test_preprocess_takes_float_batches_like_converting_to_pil(files):
    pre = _aes(files).bundle.preprocess
    x = torch.rand(3, 3, 256, 320)
    y = pre(x)
    assert y.shape == (3, 3, 224, 224) and y.dtype == torch.float32
    # the input is rounded to uint8 first, as converting a decoded image to PIL does
    assert torch.equal(y, pre((x * 255).round() / 255))


# ------------------------------------------------------------------------------------------------
# Scores vs the published formulas
# ------------------------------------------------------------------------------------------------


def _groups(photo):
    """Two batches of real images at different non-square sizes, 5 images / prompts in all."""
    return [
        (_images(photo, (417, 300), n=3, seed=1), PROMPTS[:3]),
        (_images(photo, (333, 600), n=2, seed=2), PROMPTS[3:]),
    ]


def test_hpsv2_scores_match_reference(files, photo):
    reward = _hps(files)
    # HPSv2's img_score.py: open_clip model, load_state_dict(torch.load(cp)['state_dict']), preprocess_val,
    # tokenizer, image_features @ text_features.T (features normalized), diagonal.
    model = open_clip.create_model("tiny-hps-clip", pretrained=None).eval()
    model.load_state_dict(torch.load(files["hps_ckpt"], weights_only=True)["state_dict"])
    tokenizer, preprocess_val = open_clip.get_tokenizer("ViT-H-14"), hpsv2_pil_preprocess()
    for pils, prompts in _groups(photo):
        got = reward(_to_tensor(pils), prompts)
        ref = []
        with torch.no_grad():
            for im, prompt in zip(pils, prompts):
                image = preprocess_val(im).unsqueeze(0)
                text = tokenizer([prompt])
                image_features = model.encode_image(image, normalize=True)
                text_features = model.encode_text(text, normalize=True)
                ref.append(torch.diagonal(image_features @ text_features.T)[0])
        ref = torch.stack(ref)
        assert got.shape == (len(prompts),) and got.dtype == torch.float32
        assert (got - ref).abs().max().item() <= 1e-3, (got, ref)
        assert ref.std() > 1e-3  # the scores really depend on the image/prompt (a meaningful comparison)


def test_pickscore_scores_match_reference(files, photo):
    reward = _pick(files)
    # PickScore's published inference: processor(images=..., text=..., padding, truncation, max_length=77),
    # normalized embeddings, model.logit_scale.exp() * text_embs @ image_embs.T; ours is that / 100.
    from transformers import AutoTokenizer

    model = CLIPModel.from_pretrained(files["pick_model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(files["pick_proc"])
    image_processor = CLIPImageProcessorPil.from_pretrained(files["pick_proc"])
    for pils, prompts in _groups(photo):
        got = reward(_to_tensor(pils), prompts)
        ref = []
        with torch.no_grad():
            for im, prompt in zip(pils, prompts):
                image_inputs = image_processor(images=[im], return_tensors="pt")
                text_inputs = tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
                image_embs = rm._features(model.get_image_features(**image_inputs))
                image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
                text_embs = rm._features(model.get_text_features(**text_inputs))
                text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
                ref.append((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0] / 100)
        ref = torch.stack(ref)
        assert (got - ref).abs().max().item() <= 1e-3, (got, ref)
        assert ref.std() > 1e-3


def test_aesthetic_scores_match_reference(files, photo):
    reward = _aes(files)
    # improved-aesthetic-predictor's simple_inference.py: CLIP image features, L2-normalized (numpy), MLP.
    model = CLIPModel.from_pretrained(files["aes_clip"]).eval()
    mlp = ReferenceMLP(16)
    mlp.load_state_dict(torch.load(files["aes_mlp"], weights_only=True))
    mlp.eval()
    preprocess = openai_clip_pil_preprocess()
    for pils, prompts in _groups(photo):
        got = reward(_to_tensor(pils), prompts)
        with torch.no_grad():
            feats = rm._features(model.get_image_features(pixel_values=torch.stack([preprocess(im) for im in pils])))
        a = feats.numpy()
        l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
        l2[l2 == 0] = 1
        emb = a / np.expand_dims(l2, -1)
        with torch.no_grad():
            ref = mlp(torch.from_numpy(emb).float())[:, 0]
        assert (got - ref).abs().max().item() <= 1e-3, (got, ref)
        assert ref.std() > 0.05, ref


def test_batching_and_chunking_do_not_change_scores(files, photo):
    x = _to_tensor(_images(photo, (417, 300), n=3, seed=4))
    for make in (_hps, _pick, _aes):
        whole = make(files, batch_size=32)(x, PROMPTS[:3])
        for batch_size in (2, 1):  # chunks of 2 + 1, and one image at a time
            assert torch.allclose(whole, make(files, batch_size=batch_size)(x, PROMPTS[:3]), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Registry, config, combination, load-once
# ------------------------------------------------------------------------------------------------


def test_registered_in_reward_registry():
    assert {"hpsv2", "pickscore", "aesthetic", "multi_reward"} <= set(available_rewards())


def test_build_reward_from_config_weights_and_parts(files, photo):
    spec = {
        "pickscore": {"weight": 10.0, "model": files["pick_model"], "processor": files["pick_proc"]},
        "hpsv2": {"weight": 2.0, "checkpoint": files["hps_ckpt"], "clip_model": files["hps_cfg"]},
        "aesthetic": {"weight": 0.05, "mlp": files["aes_mlp"], "clip_model": files["aes_clip"]},
    }
    reward = build_reward(spec)
    x = _to_tensor(_images(photo, (512, 512), n=2))
    total, parts = reward(x, PROMPTS[:2])
    assert set(parts) == {"pickscore", "hpsv2", "aesthetic"}
    assert torch.allclose(total, 10 * parts["pickscore"] + 2 * parts["hpsv2"] + 0.05 * parts["aesthetic"])
    assert torch.allclose(parts["hpsv2"], _hps(files)(x, PROMPTS[:2]))
    with pytest.raises(RewardError, match="unknown option"):
        build_reward({"hpsv2": {"weight": 1.0, "ckpt": files["hps_ckpt"]}})


def test_models_load_once_per_process(files, photo):
    rm.clear_cache()
    before = rm.LOAD_COUNTS["hpsv2"]
    a, b = _hps(files), _hps(files, batch_size=4)
    assert rm.LOAD_COUNTS["hpsv2"] == before + 1 and a.bundle is b.bundle
    rm.clear_cache()
    _hps(files)
    assert rm.LOAD_COUNTS["hpsv2"] == before + 2
    p0 = rm.LOAD_COUNTS["pickscore"]
    _pick(files), _pick(files)
    assert rm.LOAD_COUNTS["pickscore"] == p0 + 1


def test_defaults_are_the_published_architectures():
    cfg = open_clip.get_model_config("ViT-H-14")  # hpsv2's default clip_model
    assert cfg["vision_cfg"]["width"] == 1280 and cfg["vision_cfg"]["patch_size"] == 14 and cfg["embed_dim"] == 1024
    assert rm.AestheticMLP().layers[0].in_features == 768


def test_hub_cache_is_used_for_defaults_without_network(files, tmp_path, monkeypatch):
    """checkpoint=None finds xswu/HPSv2's HPS_v2_compressed.pt in a (local) Hugging Face cache."""
    snap = tmp_path / "models--xswu--HPSv2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "models--xswu--HPSv2" / "refs").mkdir()
    (tmp_path / "models--xswu--HPSv2" / "refs" / "main").write_text("0" * 40)
    (snap / "HPS_v2_compressed.pt").write_bytes(Path(files["hps_ckpt"]).read_bytes())
    monkeypatch.setattr(rm, "HF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = rm.hpsv2(clip_model=files["hps_cfg"])
    assert reward(torch.rand(1, 3, 64, 64), ["x"]).shape == (1,)


# ------------------------------------------------------------------------------------------------
# Errors: missing or wrong files fail at construction, naming the config key and the source
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "HF_CACHE_DIR", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_files_name_the_key_and_the_source(files, tmp_path, empty_hub_cache):
    missing = str(tmp_path / "nope" / "HPS_v2_compressed.pt")
    cases = [
        (
            lambda: rm.hpsv2(checkpoint=missing, clip_model=files["hps_cfg"]),
            [
                "reward.hpsv2.checkpoint",
                "file not found",
                "xswu/HPSv2",
                "HPS_v2_compressed.pt",
                "HPS_v2.1_compressed.pt",
            ],
        ),
        (lambda: rm.hpsv2(clip_model=files["hps_cfg"]), ["reward.hpsv2.checkpoint", "xswu/HPSv2"]),
        (
            lambda: rm.hpsv2(checkpoint=files["hps_ckpt"], clip_model=str(tmp_path / "nope.json")),
            ["reward.hpsv2.clip_model", "not found"],
        ),
        (
            lambda: rm.hpsv2(checkpoint=files["hps_ckpt"], clip_model="ViT-Q-99"),
            ["reward.hpsv2.clip_model", "ViT-H-14"],
        ),
        (
            lambda: rm.pickscore(model=str(tmp_path / "PickScore_v1"), processor=files["pick_proc"]),
            ["reward.pickscore.model", "folder not found", "yuvalkirstain/PickScore_v1"],
        ),
        (
            lambda: rm.pickscore(model="yuvalkirstain/PickScore_v1", processor=files["pick_proc"]),
            ["reward.pickscore.model", "Hugging Face cache", "yuvalkirstain/PickScore_v1"],
        ),
        (
            lambda: rm.pickscore(model=files["pick_model"], processor=str(tmp_path / "proc")),
            ["reward.pickscore.processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"],
        ),
        (lambda: rm.pickscore(model=files["pick_model"]), ["reward.pickscore.processor", "laion/CLIP-ViT-H-14"]),
        (
            lambda: rm.aesthetic(mlp=str(tmp_path / "sac.pth"), clip_model=files["aes_clip"]),
            [
                "reward.aesthetic.mlp",
                "sac+logos+ava1-l14-linearMSE.pth",
                "christophschuhmann/improved-aesthetic-predictor",
            ],
        ),
        (lambda: rm.aesthetic(clip_model=files["aes_clip"]), ["reward.aesthetic.mlp", "improved-aesthetic-predictor"]),
        (
            lambda: rm.aesthetic(mlp=files["aes_mlp"], clip_model=str(tmp_path / "clip")),
            ["reward.aesthetic.clip_model", "openai/clip-vit-large-patch14"],
        ),
        (lambda: rm.aesthetic(mlp=files["aes_mlp"]), ["reward.aesthetic.clip_model", "openai/clip-vit-large-patch14"]),
    ]
    for make, needles in cases:
        with pytest.raises(RewardError) as info:
            make()
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))


def test_missing_file_fails_when_the_trainer_builds_the_reward(files, tmp_path, empty_hub_cache):
    with pytest.raises(RewardError, match=r"reward\.hpsv2\.checkpoint"):
        build_reward({"hpsv2": {"weight": 1.0, "checkpoint": str(tmp_path / "x.pt"), "clip_model": files["hps_cfg"]}})
    with pytest.raises(RewardError, match=r"reward\.(pickscore|hpsv2|aesthetic)\."):
        build_reward({"multi_reward": 1.0})  # nothing in the (empty) hub cache


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/prdp_reward_models_pwned",))


def test_wrong_files_are_refused_with_the_key(files, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RewardError, match=r"reward\.hpsv2\.checkpoint.*cannot read"):
        _hps({**files, "hps_ckpt": str(garbage)})

    # an arbitrary pickle is never unpickled (weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Exploit()}, evil)
    if os.path.exists("/tmp/prdp_reward_models_pwned"):
        os.remove("/tmp/prdp_reward_models_pwned")
    with pytest.raises(RewardError, match=r"reward\.hpsv2\.checkpoint.*arbitrary pickles are refused"):
        _hps({**files, "hps_ckpt": str(evil)})
    assert not os.path.exists("/tmp/prdp_reward_models_pwned")

    # a checkpoint of another architecture (the aesthetic MLP) / of another width
    with pytest.raises(RewardError, match=r"reward\.hpsv2\.checkpoint.*does not fit"):
        _hps({**files, "hps_ckpt": files["aes_mlp"]})
    wide = json.loads(json.dumps(TINY_OPEN_CLIP))
    wide["vision_cfg"]["width"] = 64
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    with pytest.raises(RewardError, match=r"reward\.hpsv2\.checkpoint.*does not fit.*xswu/HPSv2"):
        rm.hpsv2(checkpoint=files["hps_ckpt"], clip_model=str(tmp_path / "wide.json"))

    # the aesthetic MLP: a wrong state dict, a folder for the file, an embedding-size mismatch
    with pytest.raises(RewardError, match=r"reward\.aesthetic\.mlp.*not an improved-aesthetic-predictor"):
        _aes({**files, "aes_mlp": files["hps_ckpt"]})
    with pytest.raises(RewardError, match=r"reward\.aesthetic\.mlp.*is a folder"):
        _aes({**files, "aes_mlp": files["aes_clip"]})
    torch.save(ReferenceMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(RewardError, match=r"reward\.aesthetic\.mlp.*768.*16"):
        _aes({**files, "aes_mlp": str(tmp_path / "l14.pth")})

    # PickScore: a folder without config, a non-CLIP model, weights missing or not fitting the config
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match=r"reward\.pickscore\.model.*config\.json.*yuvalkirstain/PickScore_v1"):
        _pick({**files, "pick_model": str(tmp_path / "empty")})
    notclip = tmp_path / "bert"
    notclip.mkdir()
    (notclip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RewardError, match=r"reward\.pickscore\.model.*'bert'"):
        _pick({**files, "pick_model": str(notclip)})
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((files["root"] / "PickScore_v1" / "config.json").read_text())
    with pytest.raises(RewardError, match=r"reward\.pickscore\.model.*no weights"):
        _pick({**files, "pick_model": str(noweights)})
    other = _tiny_hf_clip(5, projection_dim=8)
    other.save_pretrained(tmp_path / "other")
    cfg = json.loads((files["root"] / "PickScore_v1" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardError, match=r"reward\.pickscore\.model"):
        _pick({**files, "pick_model": str(tmp_path / "other")})
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    state = load_file(str(files["root"] / "PickScore_v1" / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("text_projection")}, str(partial / "model.safetensors")
    )
    (partial / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardError, match=r"reward\.pickscore\.model.*do not fit.*text_projection"):
        _pick({**files, "pick_model": str(partial)})
    with pytest.raises(RewardError, match=r"reward\.pickscore\.processor.*laion"):
        _pick({**files, "pick_proc": str(tmp_path / "empty")})
    with pytest.raises(RewardError, match=r"reward\.pickscore\.batch_size"):
        _pick(files, batch_size=0)


def test_reward_rejects_bad_image_batches(files):
    with pytest.raises(RewardError, match="takes images"):
        _aes(files)(torch.rand(2, 3, 32, 32), ["one prompt"])
