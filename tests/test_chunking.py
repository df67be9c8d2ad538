"""'auto' pass-2 chunk sizes (prdp_ds/chunking.py): the sizing rule on injected memory numbers, the CPU rule,
resume, and on CUDA that the chosen chunk's measured peak fits its budget."""

import math

import pytest
import torch

from prdp_ds import chunking
from prdp_ds.config import dump, resolve
from prdp_ds.engine import batch_arithmetic


def brute_force(n_images, n_steps, row_bytes, fixed_bytes, budget, images=None, steps=None):
    """Reference: every (a, s) in 1..n x 1..T (or the fixed size) that fits -> the fewest backward calls."""
    fits = [
        (math.ceil(n_images / a) * math.ceil(n_steps / s), a, s)
        for a in ([images] if images else range(1, n_images + 1))
        for s in ([steps] if steps else range(1, n_steps + 1))
        if fixed_bytes + row_bytes * 2 * a * s <= budget
    ]
    return min(calls for calls, _, _ in fits)


@pytest.mark.parametrize(
    "n_images, n_steps, row_bytes, fixed_bytes, budget",
    [
        (64, 50, 100, 1000, 1000 + 100 * 2 * 192),
        (16, 10, 7, 0, 7 * 2 * 40),
        (37, 13, 3, 50, 50 + 3 * 2 * 999),
        (5, 3, 1, 0, 1e9),
    ],
)
def test_the_chosen_chunk_fits_and_has_the_fewest_backward_calls(n_images, n_steps, row_bytes, fixed_bytes, budget):
    a, s = chunking.fitting_chunk(n_images, n_steps, row_bytes, fixed_bytes, budget)
    assert fixed_bytes + row_bytes * 2 * a * s <= budget
    calls = math.ceil(n_images / a) * math.ceil(n_steps / s)
    assert calls == brute_force(n_images, n_steps, row_bytes, fixed_bytes, budget)
    assert a == math.ceil(n_images / math.ceil(n_images / a)) and s == math.ceil(n_steps / math.ceil(n_steps / s))
    for a2 in range(a + 1, n_images + 1):  # ties go to more images per chunk
        for s2 in range(1, n_steps + 1):
            fits = fixed_bytes + row_bytes * 2 * a2 * s2 <= budget
            assert not (fits and math.ceil(n_images / a2) * math.ceil(n_steps / s2) == calls)


def test_64_images_by_50_steps_with_room_for_192_image_steps():
    # 64 x 3 = 192 image-steps: all images, 17 step chunks (3, ..., 3, 2); 32 x 6 would take 2 x 9 = 18 calls
    assert chunking.fitting_chunk(64, 50, 100, 1000, 1000 + 100 * 2 * 192) == (64, 3)
    assert chunking.fitting_chunk(64, 50, 100, 1000, 1000 + 100 * 2 * 192 - 1)[0] < 64


def test_the_margin_is_left_free():
    free, n, T, latent, trainable = 100 * 2**30, 64, 50, 4 * 64 * 64, 10**9
    row, fixed = 200 * 2**20, 2 * 2**30
    for margin in (0.0, 0.2, 0.5):
        budget = chunking.budget_bytes(free, margin, trainable, n, T, latent)
        assert budget == free * (1 - margin) - 16 * trainable - 4 * n * (3 * T + 1) * latent
        a, s = chunking.fitting_chunk(n, T, row, fixed, budget)
        assert fixed + row * 2 * a * s <= free * (1 - margin) - 16 * trainable
    small = chunking.fitting_chunk(n, T, row, fixed, chunking.budget_bytes(free, 0.5, trainable, n, T, latent))
    large = chunking.fitting_chunk(n, T, row, fixed, chunking.budget_bytes(free, 0.0, trainable, n, T, latent))
    assert small[0] * small[1] < large[0] * large[1]


def test_a_fixed_size_is_kept_and_a_chunk_that_cannot_fit_names_the_keys():
    assert chunking.fitting_chunk(64, 50, 1, 0, 2 * 64 * 7, images=64) == (64, 7)
    assert chunking.fitting_chunk(64, 50, 1, 0, 2 * 64 * 5 - 1, steps=5) == (32, 5)  # 63 x 5 fits: 2 even chunks
    with pytest.raises(ValueError, match=r"train.images_per_chunk / train.steps_per_chunk = auto.*train.memory_margin"):
        chunking.fitting_chunk(64, 50, 100, 1000, 1000 + 100)
    with pytest.raises(ValueError, match=r"\(8 image\(s\) x 1 step\(s\)\)"):
        chunking.fitting_chunk(64, 50, 1, 0, 2 * 7, images=8)


@pytest.mark.parametrize("world", [1, 2])
def test_the_cpu_rule_is_all_of_the_ranks_images_by_one_step(world):
    cfg = resolve("small", overrides=["train.prompts_per_epoch=4", "train.images_per_prompt=3"])
    assert chunking.auto_keys(cfg) == ["train.images_per_chunk", "train.steps_per_chunk"]
    out, line = chunking.resolve(cfg, world, torch.device("cpu"), None, torch.float32)
    assert (out.train.images_per_chunk, out.train.steps_per_chunk) == (12 // world, 1)
    assert cfg.train.images_per_chunk == "auto", "the input config is left as it was"
    assert line.startswith(
        f"chunk sizes: train.images_per_chunk=auto -> {12 // world}, train.steps_per_chunk=auto -> 1"
    )
    assert batch_arithmetic(out, world)["backward_calls_per_step"] == cfg.sampler.num_steps
    half = resolve("small", overrides=["train.images_per_chunk=5"])
    assert chunking.auto_keys(half) == ["train.steps_per_chunk"]
    out, _ = chunking.resolve(half, world, torch.device("cpu"), None, torch.float32)
    assert (out.train.images_per_chunk, out.train.steps_per_chunk) == (5, 1)
    explicit = resolve("tiny_demo")
    assert chunking.resolve(explicit, world, torch.device("cpu"), None, torch.float32) == (explicit, None)


def test_a_resume_takes_the_checkpoints_sizes_for_the_auto_keys(tmp_path):
    saved = resolve("small", overrides=["train.images_per_chunk=24", "train.steps_per_chunk=7"])
    (tmp_path / "config.yaml").write_text(dump(saved))
    cfg = resolve("small", overrides=["train.images_per_chunk=16"])  # steps_per_chunk: auto
    out, line = chunking.resolve(cfg, 1, torch.device("cpu"), None, torch.float32, tmp_path)
    assert (out.train.images_per_chunk, out.train.steps_per_chunk) == (16, 7)
    assert str(tmp_path) in line


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="checks the CUDA memory probe against torch.cuda.max_memory_allocated, which has no CPU counterpart; "
    "make gpu-checks runs it",
)
def test_on_cuda_the_chosen_chunk_fits_its_budget():
    from prdp_ds.models import build_tiny
    from prdp_ds.sampler import cfg_predict

    device = torch.device("cuda")
    models = build_tiny(0).to(device)
    cfg = resolve("tiny_demo", overrides=["train.images_per_chunk=auto", "train.steps_per_chunk=auto"])
    out, line = chunking.resolve(cfg, 1, device, models, torch.float32)
    a, s = out.train.images_per_chunk, out.train.steps_per_chunk
    assert "measured" in line and a >= 1 and s >= 1
    shape = (models.unet.config.in_channels, models.unet.config.sample_size, models.unet.config.sample_size)
    row, fixed = chunking.measure_rows(models.unet, models.encode_prompts([""]), shape, torch.float32, device, (1, 8))
    n = a * s  # the chosen chunk, measured: the linear model's prediction holds to 10% + 16 MiB
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.randn((n, *shape), device=device)
    emb = models.encode_prompts([""]).expand(n, -1, -1)
    eps_u, eps_c = cfg_predict(models.unet, x, torch.full((n,), 500, device=device), emb, emb)
    (eps_u.sum() + eps_c.sum()).backward()
    peak = torch.cuda.max_memory_allocated(device) - base
    assert peak <= 1.1 * (fixed + row * 2 * n) + 2**24
