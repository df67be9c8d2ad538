"""Throughput of the pretrained rewards (HPSv2, PickScore, aesthetic), and what loading once buys.

    python benchmarks/rewards.py                       # CPU: tiny models; CUDA: full-size models
    python benchmarks/rewards.py --size full --batch-sizes 8 32 64 --json benchmarks/results/rewards_gpu.json

No weights are needed: the real architectures (open_clip ViT-H-14 for HPSv2, transformers CLIP ViT-H-14
for PickScore, CLIP ViT-L/14 + the LAION MLP for aesthetic; or tiny versions of them) are built with
random weights, saved in the public files' formats into a temporary folder and loaded through the
rewards' real loading path, so the timings include our tensor preprocessing of 512x512 SD-sized
images, tokenization, bf16 autocast on CUDA, and (for the load rows) reading the files.

Rows: images/s per reward and batch size; then, per reward, one call with the model kept loaded
(load once per process, what the trainer does) vs one call that reloads it (clear the cache and
build the reward again).
"""

import argparse
import functools
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import cpu_name, run_meta  # noqa: E402
from prdp_ds import reward_models as rm  # noqa: E402

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_HF = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
    ),
    vision_config=dict(
        image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    ),
    projection_dim=16,
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (= PickScore_v1's architecture) and openai/clip-vit-large-patch14.
VIT_H_14_HF = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    ),
    vision_config=dict(
        image_size=224,
        patch_size=14,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        hidden_act="gelu",
    ),
    projection_dim=1024,
)
VIT_L_14_HF = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    ),
    vision_config=dict(
        image_size=224,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="quick_gelu",
    ),
    projection_dim=768,
)

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def make_weights(root, size):
    """Random-weight files in the public formats; returns each reward's factory options."""
    import open_clip
    from open_clip.model import CLIP
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    full = size == "full"
    # HPSv2: {'state_dict': fp16 tensors} like HPS_v2_compressed.pt
    if full:
        hps_cfg, clip_model = open_clip.get_model_config("ViT-H-14"), "ViT-H-14"
    else:
        hps_cfg, clip_model = TINY_OPEN_CLIP, str(root / "tiny-open-clip.json")
        Path(clip_model).write_text(json.dumps(TINY_OPEN_CLIP))
    model = CLIP(**hps_cfg)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, root / "HPS_v2_compressed.pt")
    del model

    # PickScore: CLIPModel folder + processor folder (CLIP BPE tokenizer + laion preprocessor config)
    CLIPModel(CLIPConfig(**(VIT_H_14_HF if full else TINY_HF))).save_pretrained(root / "PickScore_v1")
    proc = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    proc.mkdir()
    merges = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = (
        vocab
        + [v + "</w>" for v in vocab]
        + ["".join(m.split()) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    (proc / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (proc / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (proc / "tokenizer_config.json").write_text(
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
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(proc)

    # Aesthetic: CLIP ViT-L/14 folder + the MLP state dict
    aes_cfg = VIT_L_14_HF if full else TINY_HF
    CLIPModel(CLIPConfig(**aes_cfg)).save_pretrained(root / "clip-vit-large-patch14")
    torch.save(rm.AestheticMLP(aes_cfg["projection_dim"]).state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    return {
        "hpsv2": (rm.hpsv2, dict(checkpoint=str(root / "HPS_v2_compressed.pt"), clip_model=clip_model)),
        "pickscore": (rm.pickscore, dict(model=str(root / "PickScore_v1"), processor=str(proc))),
        "aesthetic": (
            rm.aesthetic,
            dict(mlp=str(root / "sac+logos+ava1-l14-linearMSE.pth"), clip_model=str(root / "clip-vit-large-patch14")),
        ),
    }


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _score_once(factory, options, device, images, prompts, reload=False):
    """Build the reward (from the cached bundle, or reloading its weights) and score one batch."""
    if reload:
        rm.clear_cache()
    factory(device=device, **options)(images, prompts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size", choices=["tiny", "full"], default=None, help="model widths (default: full on CUDA, tiny on CPU)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--resolution", type=int, default=512, help="input image side (SD1.x: 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rewards", nargs="+", default=["hpsv2", "pickscore", "aesthetic"])
    parser.add_argument("--json", default=None, help="write the rows (with device, date, command) here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    batch_sizes = args.batch_sizes or ([1, 8, 32, 64] if device.type == "cuda" else [1, 4, 16])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    meta = {**run_meta("benchmarks/rewards.py", device_name, argv), "model_size": size, "resolution": args.resolution}
    print(f"# device: {device_name}; models: {size} (random weights); images {args.resolution}x{args.resolution}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        factories = make_weights(Path(tmp), size)
        print(f"# wrote random-weight files in {time.perf_counter() - t0:.1f} s")
        gen = torch.Generator(device="cpu").manual_seed(0)
        print(f"{'reward':<10} {'batch':>5} {'images/s':>10} {'ms/image':>10}")
        for name in args.rewards:
            factory, options = factories[name]
            rm.clear_cache()
            reward = factory(device=device, **options)
            for bs in batch_sizes:
                images = torch.rand(bs, 3, args.resolution, args.resolution, generator=gen).to(device)
                prompts = [PROMPT] * bs
                reward(images, prompts)  # warm-up
                sec = _time(functools.partial(reward, images, prompts), device, args.repeats)
                row = {
                    **meta,
                    "kind": "throughput",
                    "reward": name,
                    "batch_size": bs,
                    "images_per_s": bs / sec,
                    "ms_per_image": 1000 * sec / bs,
                }
                rows.append(row)
                print(f"{name:<10} {bs:>5} {row['images_per_s']:>10.1f} {row['ms_per_image']:>10.2f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

        bs = batch_sizes[min(1, len(batch_sizes) - 1)]
        print(f"\n{'reward':<10} {'batch':>5} {'kept s/call':>12} {'reload s/call':>14} {'ratio':>8}")
        for name in args.rewards:
            factory, options = factories[name]
            images = torch.rand(bs, 3, args.resolution, args.resolution, generator=gen).to(device)
            prompts = [PROMPT] * bs
            rm.clear_cache()
            kept = factory(device=device, **options)
            kept(images, prompts)
            call = functools.partial(_score_once, factory, options, device, images, prompts)
            t_kept = _time(call, device, args.repeats)  # cached bundle: what the trainer does
            t_reload = _time(functools.partial(call, reload=True), device, max(1, min(args.repeats, 2)))
            row = {
                **meta,
                "kind": "load_once_vs_reload",
                "reward": name,
                "batch_size": bs,
                "kept_s_per_call": t_kept,
                "reload_s_per_call": t_reload,
                "reload_over_kept": t_reload / t_kept,
            }
            rows.append(row)
            print(f"{name:<10} {bs:>5} {t_kept:>12.4f} {t_reload:>14.3f} {t_reload / t_kept:>7.1f}x")
            del kept
            rm.clear_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        print(f"# wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
