"""LoRA (prdp_ds/lora.py): the reference is the policy UNet with its adapters disabled, the two-pass
gradient of the adapters equals full-graph autograd through a DeepSpeed engine, and what we save
loads where diffusers users load LoRA weights."""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import B, G, RecordingSGD, T, W, _cfg

from prdp_ds.checkpoint import save_checkpoint, save_unet
from prdp_ds.engine import build_ds_config, make_engine
from prdp_ds.logratio import guided_eps, step_log_ratio
from prdp_ds.lora import (
    LORA_WEIGHT_NAME,
    AdaptersDisabled,
    add_lora,
    has_lora,
    load_adapter,
    lora_parameters,
    merged_unet,
    save_adapter,
)
from prdp_ds.loss import rdp_loss
from prdp_ds.models import TINY, build_tiny
from prdp_ds.sampler import image_seeds, sample
from prdp_ds.twopass import policy_log_ratios, prdp_step

PROMPTS = ["a cat", "a red fox"]
REWARDS = torch.tensor([[0.30, 0.10, 0.20], [0.05, 0.25, 0.15]])
LORAS = [(1, 0.0), (4, 3.0)]  # (rank, alpha): scale 1, and an odd alpha / rank = 0.75


@pytest.fixture(autouse=True)
def _seeded_rng():
    """peft draws lora_A from the global RNG: seed it so each test is the same in any order, and leave
    the RNG as found for the tests that run after these."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def perturb(unet, seed=1, scale=0.05):
    """A trained-looking adapter: B random (it starts at zero), A moved too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            elif ".lora_A." in name:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen))


def unet_inputs(n=3):
    gen = torch.Generator().manual_seed(7)
    return (
        torch.randn(n, 4, 8, 8, generator=gen),
        torch.tensor([999, 500, 21][:n]),
        torch.randn(n, TINY["context_length"], TINY["text_dim"], generator=gen),
    )


def _engine(unet, cfg, stage=2, lr=1e-4, max_change=None):
    opt = RecordingSGD(lora_parameters(unet), lr, max_change)
    ds = build_ds_config({"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}, cfg, 1)
    return make_engine(unet, ds, opt), opt


def test_add_lora_freezes_the_base_and_refuses_bad_ranks():
    unet = build_tiny(0).unet
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="lora_rank"):
            add_lora(unet, bad, 0.0)
    assert not has_lora(unet)
    add_lora(unet, 2, 0.0)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.prdp." in n or ".lora_B.prdp." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_q", "to_k", "to_v", "0"}
    assert all(torch.count_nonzero(p) == 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    with pytest.raises(ValueError, match="already"):
        add_lora(unet, 2, 0.0)


def test_models_to_leaves_the_policy_dtype_alone():
    models = build_tiny(0).add_lora(2)
    assert isinstance(models.ref_unet, AdaptersDisabled) and models.ref_unet.module is models.unet
    assert not isinstance(models.ref_unet, torch.nn.Module)  # owns nothing, moves and casts nothing
    models.to("cpu", frozen_dtype=torch.bfloat16)
    assert {p.dtype for p in models.unet.parameters()} == {torch.float32}
    assert next(models.vae.parameters()).dtype == torch.bfloat16
    assert models.ref_unet.dtype == torch.float32 and models.ref_unet.config is models.unet.config


@pytest.mark.parametrize("rank,alpha", LORAS)
def test_at_init_the_log_ratio_is_exactly_zero_and_the_reference_is_the_base(rank, alpha):
    seeds = image_seeds(0, 0, [0, 1], B)
    plain = sample(build_tiny(0), PROMPTS, seeds, T, W)  # base UNet, deep-copied reference
    models = build_tiny(0).add_lora(rank, alpha)
    flags = [p.requires_grad for p in models.unet.parameters()]
    traj = sample(models, PROMPTS, seeds, T, W)
    assert torch.count_nonzero(traj.log_ratio_old) == 0
    assert torch.equal(traj.eps_old, traj.eps_ref)
    assert torch.equal(traj.eps_ref, plain.eps_ref) and torch.equal(traj.latents, plain.latents)
    perturb(models.unet)
    moved = sample(models, PROMPTS, seeds, T, W)
    assert (moved.log_ratio_old != 0).all(), "a non-zero adapter must give a non-zero log-ratio"
    assert (moved.eps_old - moved.eps_ref).abs().max() > 1e-3
    assert torch.equal(moved.eps_ref[:, :, 0], plain.eps_ref[:, :, 0]), "the reference stays the base UNet"
    assert [p.requires_grad for p in models.unet.parameters()] == flags, "the view must not change what trains"


def full_graph_grad(unet, models, traj, rewards, cfg, dtype=torch.float32):
    """Autograd through all T UNet calls of every image and the loss of docs/design.md §5 -> d loss / d adapters.
    dtype=float64 runs a float64 copy of `unet` with the log-ratio formed in float64 (the yardstick)."""
    if dtype != torch.float32:
        unet = copy.deepcopy(unet).to(dtype)
    s = traj.schedule
    cond = models.encode_prompts(traj.flat_prompts).to(dtype)
    uncond = models.encode_prompts([""]).to(dtype).expand(G * B, -1, -1)
    lat, eps_ref = traj.flat("latents").to(dtype), traj.flat("eps_ref").to(dtype)
    ratios = []
    for k in range(T):
        x = lat[:, k]
        out = unet(torch.cat([x, x]), s.timesteps[k].expand(2 * G * B), torch.cat([uncond, cond])).sample
        eps = guided_eps(out[: G * B], out[G * B :], W)
        a, b, sigma = (c[k].to(dtype) for c in (s.a, s.b, s.sigma))
        if dtype == torch.float32:  # the production formula (fp32)
            ratios.append(step_log_ratio(eps, eps_ref[:, k], x, lat[:, k + 1], a, b, sigma))
        else:  # docs/design.md §4 in float64
            resid = 2 * lat[:, k + 1] - 2 * a * x - b * (eps + eps_ref[:, k])
            ratios.append((b * (eps - eps_ref[:, k]) * resid).flatten(1).sum(1) / (2 * sigma**2))
    r = torch.stack(ratios, dim=1).reshape(G, B, T)
    loss = rdp_loss(r, traj.log_ratio_old.to(dtype), rewards.to(dtype), cfg.loss.clip_range, cfg.loss.kl_weight)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, lora_parameters(unet))])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rank,alpha,steps_per_chunk,images_per_chunk", [(1, 0.0, 1, 2), (4, 3.0, 3, 4)])
def test_two_pass_adapter_gradient_equals_full_graph(world, rank, alpha, steps_per_chunk, images_per_chunk):
    models = build_tiny(0).add_lora(rank, alpha)
    perturb(models.unet)
    full = copy.deepcopy(models.unet)  # the full-graph side: same adapters, plain autograd
    # Recomputing r in another batch composition moves it by ~2e-4 (fp32 rounding x guidance x 1/sigma^2 at the
    # last steps), and the gradient jumps where an r crosses the clip edge: keep every r well off the edge.
    clip_range, lr = 1e-2, 3e-5
    cfg = _cfg(steps_per_chunk, images_per_chunk, clip_range)
    engine, opt = _engine(models.unet, cfg, lr=lr)
    models.unet = engine  # what the trainer does; the reference view keeps the module
    assert sum(p.numel() for p in engine.module.parameters() if p.requires_grad) == sum(
        p.numel() for p in lora_parameters(full)
    )
    traj = sample(models, PROMPTS, image_seeds(0, 0, [0, 1], B), T, W)  # policy via the engine, reference via the view
    assert traj.log_ratio_old.abs().min() > 0
    cond, uncond = models.encode_prompts(traj.flat_prompts), models.encode_prompts([""])
    for k in range(2):  # the second step runs pass 1 at theta != theta_old
        if k == 1:
            margin = (
                ((policy_log_ratios(full, traj, cond, uncond, cfg, "torch") - traj.log_ratio_old).abs() - clip_range)
                .abs()
                .min()
            )
            assert margin > 1e-3, f"precondition: some r is within rounding ({margin:.1e}) of the clip edge"
        stats = prdp_step(engine, traj, REWARDS, cond, uncond, cfg, "torch", first_step=k == 0)
        assert "skipped" not in stats and len(opt.seen) == k + 1
        want = full_graph_grad(full, models, traj, REWARDS, cfg)
        exact = full_graph_grad(full, models, traj, REWARDS, cfg, torch.float64)
        got = opt.seen[k][: want.numel()]
        assert want.abs().max() > 0 and _rel(got, want) < 1e-4, f"step {k}: {_rel(got, want)}"
        # against float64: the two-pass error is fp32 rounding, like the fp32 full graph's own; the atol
        # covers the chunked sums' other order (seen: 2.8e-5 vs 1.2e-5 with 2 threads)
        err_two_pass, err_full = _rel(got.double(), exact), _rel(want.double(), exact)
        assert err_two_pass <= 2 * err_full + 1e-5, (err_two_pass, err_full)
        with torch.no_grad():
            for p, g in zip(lora_parameters(full), torch.split(want, [p.numel() for p in lora_parameters(full)])):
                p.sub_(lr * g.view_as(p))
    assert 0 < stats["clip_frac"] < 1, "the clip should be active on the second step"
    base = build_tiny(0).unet
    x, t, e = unet_inputs()
    assert torch.equal(models.ref_unet(x, t, e).sample, base(x, t, e).sample), "base weights must stay frozen"
    assert [n for n, p in engine.module.named_parameters() if p.requires_grad] == [
        n for n, p in full.named_parameters() if p.requires_grad
    ]


def tiny_pipeline(unet):
    """A StableDiffusionPipeline from the tiny parts, offline: a CLIPTokenizer over the byte alphabet."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY["context_length"])
    parts = build_tiny(0)
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("rank,alpha", LORAS)
def test_saved_adapter_loads_into_a_diffusers_pipeline_and_merges(tmp_path, rank, alpha):
    unet = add_lora(build_tiny(0).unet, rank, alpha)
    perturb(unet)
    x, t, e = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, e).sample
        base = build_tiny(0).unet(x, t, e).sample
    assert (want - base).abs().max() > 1e-2
    save_adapter(unet, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [LORA_WEIGHT_NAME]
    pipe = tiny_pipeline(build_tiny(0).unet)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # what a diffusers user does
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, e).sample, want, rtol=1e-6, atol=1e-6)
        images = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
        assert images.shape == (1, 3, 32, 32)
        ours = load_adapter(build_tiny(0).unet, tmp_path / "lora")
        torch.testing.assert_close(ours(x, t, e).sample, want, rtol=1e-6, atol=1e-6)
        plain = merged_unet(unet)
        assert type(plain) is UNet2DConditionModel and not has_lora(plain)
        assert not any(".lora_" in n or "base_layer" in n for n in plain.state_dict())
        torch.testing.assert_close(plain(x, t, e).sample, want, rtol=1e-5, atol=1e-5)
    assert has_lora(unet), "merged_unet leaves its input alone"


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_a_transformer_adapter_is_saved_in_its_pipelines_lora_format_and_loads_back(tmp_path, family):
    """SD3 / FLUX adapters are written as StableDiffusion3Pipeline / FluxPipeline write them ('transformer.' keys):
    the pipeline's lora_state_dict reads them, and load_adapter and merged_unet give the adapted outputs."""
    from prdp_ds.lora import lora_format
    from prdp_ds.models import load_models

    fresh = lambda: load_models(family, reference=False).unet  # noqa: E731
    policy = add_lora(fresh(), 2)
    perturb(policy)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 8, 8, generator=gen)
    t = torch.tensor([990.0, 500.0, 20.0])
    emb = torch.randn(3, *load_models(family).encode_prompts([""]).shape[1:], generator=gen)
    kw = {"guidance": torch.full((3,), 3.5)} if policy.guidance_distilled else {}
    with torch.no_grad():
        want = policy(x, t, emb, **kw).sample
        assert (want - fresh()(x, t, emb, **kw).sample).abs().max() > 1e-3
    save_adapter(policy, tmp_path / "lora")
    pipeline, prefix = lora_format(policy)
    assert prefix == "transformer" and pipeline.__name__ in ("StableDiffusion3Pipeline", "FluxPipeline")
    state = pipeline.lora_state_dict(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    state = state[0] if isinstance(state, tuple) else state
    assert state and all(k.startswith("transformer.") for k in state)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(fresh(), tmp_path / "lora")(x, t, emb, **kw).sample, want)
        plain = merged_unet(policy)
        plain.latent_side = getattr(policy, "latent_side", None)
        assert type(plain) is type(policy) and not has_lora(plain)
        torch.testing.assert_close(plain(x, t, emb, **kw).sample, want, rtol=1e-5, atol=1e-5)


def test_full_finetuning_still_saves_the_full_unet(tmp_path):
    save_unet(build_tiny(0).unet, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


@pytest.mark.parametrize("stage,save_merged", [(2, False), (3, True)])
def test_checkpoint_saves_the_adapter_and_optionally_the_merged_unet(world, tmp_path, stage, save_merged):
    models = build_tiny(0).add_lora(4, 3.0)
    cfg = _cfg(2, 3, 1e-3)
    cfg.output.save_merged_unet = save_merged
    engine, opt = _engine(models.unet, cfg, stage=stage, max_change=1e-2)
    models.unet = engine
    traj = sample(models, PROMPTS, image_seeds(0, 0, [0, 1], B), T, W)
    assert torch.count_nonzero(traj.log_ratio_old) == 0
    stats = prdp_step(
        engine,
        traj,
        REWARDS,
        models.encode_prompts(traj.flat_prompts),
        models.encode_prompts([""]),
        cfg,
        "torch",
        first_step=True,
    )
    assert "skipped" not in stats and len(opt.seen) == 1
    state = {"epoch": 0, "step_in_epoch": cfg.train.steps_per_epoch}
    path = save_checkpoint(engine, cfg, tmp_path, state, rank=0)
    assert (path / "unet_lora" / LORA_WEIGHT_NAME).is_file() and (path / "engine").is_dir()
    assert (path / "unet").is_dir() == save_merged
    x, t, e = unet_inputs()
    with torch.no_grad():
        want = engine.module(x, t, e).sample  # the trained policy
        assert (want - models.ref_unet(x, t, e).sample).abs().max() > 1e-4, "one step should move the policy"
        loaded = load_adapter(build_tiny(0).unet, path / "unet_lora")
        torch.testing.assert_close(loaded(x, t, e).sample, want, rtol=1e-6, atol=1e-6)
        if save_merged:
            merged = UNet2DConditionModel.from_pretrained(str(path / "unet"), use_safetensors=True)
            torch.testing.assert_close(merged(x, t, e).sample, want, rtol=1e-5, atol=1e-5)
