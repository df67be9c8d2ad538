"""Presets, --set overrides and their errors (prdp_ds/config.py)."""

import pytest

from prdp_ds import config as config_lib
from prdp_ds.chunking import cpu_rule
from prdp_ds.config import ConfigError, from_dict, resolve, to_dict
from prdp_ds.engine import batch_arithmetic


@pytest.mark.parametrize("name", config_lib.preset_names())
def test_every_preset_resolves_round_trips_and_splits(name):
    cfg = resolve(name)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    batch_arithmetic(cpu_rule(cfg, 1), 1)  # raises on an impossible split ('auto' chunks as on a CPU)


def test_the_world_presets_use_the_world():
    for name, prompts in (("world", "world_small"), ("world_large", "world_large")):
        cfg = resolve(name)
        assert cfg.model.pretrained == "world" and cfg.prompts.source == prompts
    demo = resolve("demo")
    assert demo.model.pretrained == "world" and demo.prompts.source == "world_demo" and demo.sampler.spacing == "logsnr"
    assert resolve("tiny_demo").model.pretrained == "tiny"


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.lr=2e-5", "lr", 2e-5),
        ("train.epochs=3", "epochs", 3),
        ("ddpo.per_prompt_norm=false", "per_prompt_norm", False),
    ],
)
def test_overrides_are_parsed_as_yaml_and_type_checked(text, key, value):
    cfg = resolve("tiny_demo", overrides=[text])
    section = getattr(cfg, text.split(".")[0])
    assert getattr(section, key) == value and type(getattr(section, key)) is type(value)


def test_a_reward_override_replaces_the_whole_mapping():
    cfg = resolve("world", overrides=["reward={world_aesthetic: 1.0, world_judge: 0.0}"])
    assert cfg.reward == {"world_aesthetic": 1.0, "world_judge": 0.0}


def test_the_paper_presets_size_their_chunks_to_the_device():
    for name in ("small", "large", "multi_reward"):
        t = resolve(name).train
        assert (t.images_per_chunk, t.steps_per_chunk, t.memory_margin) == ("auto", "auto", 0.2)


@pytest.mark.parametrize(
    "text, value",
    [
        ("train.images_per_chunk=auto", "auto"),
        ("train.images_per_chunk=7", 7),
        ("train.steps_per_chunk=auto", "auto"),
        ("train.steps_per_chunk=1", 1),
        ("train.memory_margin=0", 0.0),
        ("train.memory_margin=0.35", 0.35),
        ("output.noise_every=0", 0),
        ("output.noise_every=3", 3),
    ],
)
def test_chunk_sizes_take_an_int_or_auto_and_the_margin_and_noise_keys_resolve(text, value):
    key, _, _ = text.partition("=")
    section, name = key.split(".")
    got = getattr(getattr(resolve("tiny_demo", overrides=[text]), section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("algo.name=ppo", "algo.name: expected one of"),
        ("sampler.spacing=cosine", "sampler.spacing: expected one of"),
        ("prompts.template={}", "prompts.template: expected str"),  # unquoted braces are a YAML mapping
        ("train=3", "train: expected a mapping"),
        ("nokey", "--set expects key=value"),
        ("train.images_per_chunk=0", "train.images_per_chunk: expected a positive int or 'auto', got 0"),
        ("train.images_per_chunk=-2", "train.images_per_chunk: expected a positive int or 'auto'"),
        ("train.images_per_chunk=2.5", "train.images_per_chunk: expected a positive int or 'auto'"),
        ("train.steps_per_chunk=max", "train.steps_per_chunk: expected a positive int or 'auto', got 'max'"),
        ("train.steps_per_chunk=true", "train.steps_per_chunk: expected a positive int or 'auto'"),
        ("train.steps_per_chunk=[1]", "train.steps_per_chunk: expected a positive int or 'auto'"),
        ("train.memory_margin=1", r"train.memory_margin: expected a float in \[0, 1\)"),
        ("train.memory_margin=-0.1", r"train.memory_margin: expected a float in \[0, 1\)"),
        ("train.memory_margin=auto", "train.memory_margin: expected float"),
        ("output.noise_every=1.5", "output.noise_every: expected int"),
        ("output.noise_every=-1", "output.noise_every: expected at least 0, got -1"),
    ],
)
def test_bad_overrides_name_the_key_and_what_was_expected(text, match):
    with pytest.raises(ConfigError, match=match):
        resolve("tiny_demo", overrides=[text])


def test_unknown_preset_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: demo"):
        resolve("nope")
    with pytest.raises(ConfigError, match=str(tmp_path / "missing.yaml")):
        resolve(None, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        resolve(None, tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "text, line",
    [
        ("model.pretrained=", "model.pretrained: expected a non-empty string, got ''"),
        ("model.seed=-1", "model.seed: expected at least 0, got -1"),
        ("model.lora_rank=-4", "model.lora_rank: expected at least 0, got -4"),
        ("model.lora_alpha=-1", "model.lora_alpha: expected a finite float >= 0 (0 means alpha = rank), got -1.0"),
        ("sampler.num_steps=0", "sampler.num_steps: expected at least 1, got 0"),
        (
            "sampler.guidance_scale=-1",
            "sampler.guidance_scale: expected a finite float >= 0 (0: unconditional, 1: no guidance), got -1.0",
        ),
        ("sampler.eta=0", "sampler.eta: expected a float in (0, 1] (the policy needs sigma_t > 0), got 0.0"),
        ("sampler.eta=1.5", "sampler.eta: expected a float in (0, 1] (the policy needs sigma_t > 0), got 1.5"),
        ("sampler.batch_size=0", "sampler.batch_size: expected at least 1, got 0"),
        ("sampler.ref_batch_size=0", "sampler.ref_batch_size: expected at least 1, got 0"),
        ("loss.kl_weight=0", "loss.kl_weight: expected a finite float > 0, got 0.0"),
        ("loss.clip_range=-0.1", "loss.clip_range: expected a finite float > 0, got -0.1"),
        ("loss.clip_range=.nan", "loss.clip_range: expected a finite float > 0, got nan"),
        ("train.epochs=0", "train.epochs: expected at least 1, got 0"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch: expected at least 1, got 0"),
        ("train.prompts_per_epoch=0", "train.prompts_per_epoch: expected at least 1, got 0"),
        ("train.images_per_prompt=0", "train.images_per_prompt: expected at least 1, got 0"),
        ("train.lr=0", "train.lr: expected a finite float > 0, got 0.0"),
        ("train.lr=.inf", "train.lr: expected a finite float > 0, got inf"),
        ("train.weight_decay=-1e-4", "train.weight_decay: expected a finite float >= 0, got -0.0001"),
        ("train.adam_betas=[0.9, 1.0]", "train.adam_betas: expected two floats in [0, 1), got [0.9, 1.0]"),
        ("train.adam_betas=[0.9]", "train.adam_betas: expected two floats in [0, 1), got [0.9]"),
        ("train.adam_eps=0", "train.adam_eps: expected a finite float > 0, got 0.0"),
        ("train.grad_clip=-1", "train.grad_clip: expected a finite float >= 0 (0: no clipping), got -1.0"),
        ("train.images_per_chunk=0", "train.images_per_chunk: expected a positive int or 'auto', got 0"),
        ("train.steps_per_chunk=0", "train.steps_per_chunk: expected a positive int or 'auto', got 0"),
        ("train.memory_margin=1", "train.memory_margin: expected a float in [0, 1), got 1.0"),
        ("train.seed=-1", "train.seed: expected at least 0, got -1"),
        ("train.max_bad_steps=0", "train.max_bad_steps: expected at least 1, got 0"),
        ("prompts.source=", "prompts.source: expected a non-empty string, got ''"),
        (
            "prompts.template='{} and {}'",
            "prompts.template: expected a format string with '{}' as its only replacement field, got '{} and {}'",
        ),
        ("prompts.field=", "prompts.field: expected a non-empty string, got ''"),
        ("prompts.over_length=cut", "prompts.over_length: expected one of ('truncate', 'drop'), got 'cut'"),
        ("loss.impl=cuda", "loss.impl: expected one of ('auto', 'torch', 'triton'), got 'cuda'"),
        ("ddpo.clip_range=0", "ddpo.clip_range: expected a finite float > 0, got 0.0"),
        ("ddpo.adv_clip=-5", "ddpo.adv_clip: expected a finite float > 0, got -5.0"),
        ("ddpo.buffer_size=0", "ddpo.buffer_size: expected at least 1, got 0"),
        ("ddpo.min_count=0", "ddpo.min_count: expected at least 1, got 0"),
        ("ddpo.reduction=max", "ddpo.reduction: expected one of ('sum', 'mean'), got 'max'"),
        ("algo.name=ppo", "algo.name: expected one of ('prdp', 'ddpo', 'grpo', 'dpok'), got 'ppo'"),
        ("grpo.clip_range=0", "grpo.clip_range: expected a finite float > 0, got 0.0"),
        ("grpo.adv_clip=-1", "grpo.adv_clip: expected a finite float > 0, got -1.0"),
        ("grpo.kl_weight=-0.01", "grpo.kl_weight: expected a finite float >= 0, got -0.01"),
        ("grpo.step_fraction=0", "grpo.step_fraction: expected a float in (0, 1], got 0.0"),
        ("grpo.step_fraction=1.5", "grpo.step_fraction: expected a float in (0, 1], got 1.5"),
        ("grpo.reduction=max", "grpo.reduction: expected one of ('sum', 'mean'), got 'max'"),
        ("dpok.reward_weight=0", "dpok.reward_weight: expected a finite float > 0, got 0.0"),
        ("dpok.kl_weight=-1", "dpok.kl_weight: expected a finite float >= 0, got -1.0"),
        ("dpok.clip_range=nan", "dpok.clip_range: expected a finite float > 0, got nan"),
        ("dpok.reduction=max", "dpok.reduction: expected one of ('sum', 'mean'), got 'max'"),
        ("dpok.value_lr=0", "dpok.value_lr: expected a finite float > 0, got 0.0"),
        ("dpok.value_updates=0", "dpok.value_updates: expected at least 1, got 0"),
        ("dpok.value_steps=0", "dpok.value_steps: expected at least 1, got 0"),
        ("dpok.value_batch_size=0", "dpok.value_batch_size: expected at least 1, got 0"),
        ("dpok.value_width=0", "dpok.value_width: expected at least 1, got 0"),
        ("output.save_every=-1", "output.save_every: expected at least 0, got -1"),
        ("output.sample_every=-1", "output.sample_every: expected at least 0, got -1"),
        ("output.eval_images=0", "output.eval_images: expected at least 1, got 0"),
        ("output.noise_every=-1", "output.noise_every: expected at least 0, got -1"),
        ("sampler.noise_level=0", "sampler.noise_level: expected a float in (0, 2] (the policy needs s > 0), got 0.0"),
        ("sampler.sde_steps=-1", "sampler.sde_steps: expected at least 0, got -1"),
        ("sampler.sde_start=-1", "sampler.sde_start: expected at least 0, got -1"),
        ("reward={}", "reward: expected a non-empty mapping name -> weight or {weight, options}, got {}"),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_the_key_the_value_and_the_range(text, line):
    with pytest.raises(ConfigError) as info:
        resolve("tiny_demo", overrides=[text])
    assert str(info.value) == line


@pytest.mark.parametrize(
    "texts, line",
    [
        (
            ["train.images_per_prompt=1"],
            "train.images_per_prompt: expected at least 2 with algo.name 'prdp' (its loss compares pairs of a "
            "prompt's images), got 1",
        ),
        (
            ["algo.name=grpo", "train.images_per_prompt=1"],
            "train.images_per_prompt: expected at least 2 with algo.name 'grpo' (its advantages standardize within "
            "a prompt's images), got 1",
        ),
        (
            ["algo.name=grpo", "algo.online=false"],
            "algo.online: expected true with algo.name 'grpo' (its ratio is to the sampling policy: on fixed "
            "reference rollouts the clip would zero its gradient once the policy moves), got False",
        ),
        (
            ["algo.name=dpok", "algo.online=false"],
            "algo.online: expected true with algo.name 'dpok' (its ratio is to the sampling policy: on fixed "
            "reference rollouts the clip would zero its gradient once the policy moves), got False",
        ),
        (["ddpo.min_count=17"], "ddpo.min_count: expected at most ddpo.buffer_size = 16, got 17"),
        (
            ["algo.name=ddpo", "train.images_per_prompt=1", "ddpo.min_count=1"],
            "ddpo.min_count: expected at least 2 with train.images_per_prompt 1 and ddpo.per_prompt_norm (a prompt's "
            "first reward, alone in its history, would be standardized by itself to advantage 0), got 1",
        ),
        (
            ["output.eval_prompts=[]"],
            "output.eval_prompts: expected at least one prompt while output.sample_every > 0, got []",
        ),
        (
            ["sampler.num_steps=4", "sampler.sde_steps=2", "sampler.sde_start=3"],
            "sampler.sde_start: expected the SDE window [sde_start, sde_start + sde_steps) inside the 4 steps "
            "(sde_steps 0 takes every step and needs sde_start 0), got sde_start 3 with sde_steps 2",
        ),
        (
            ["sampler.sde_start=1"],
            "sampler.sde_start: expected the SDE window [sde_start, sde_start + sde_steps) inside the 10 steps "
            "(sde_steps 0 takes every step and needs sde_start 0), got sde_start 1 with sde_steps 0",
        ),
    ],
)
def test_a_value_the_other_keys_rule_out_is_one_line_naming_it(texts, line):
    with pytest.raises(ConfigError) as info:
        resolve("tiny_demo", overrides=texts)
    assert str(info.value) == line


@pytest.mark.parametrize(
    "texts",
    [
        ["algo.name=ddpo", "train.images_per_prompt=1"],  # DDPO's statistics come from the batch until min_count
        ["algo.name=ddpo", "train.images_per_prompt=1", "ddpo.per_prompt_norm=false", "ddpo.min_count=1"],
        ["output.eval_prompts=[]", "output.sample_every=0"],
        ["algo.name=grpo", "grpo.kl_weight=0", "grpo.step_fraction=1", "grpo.reduction=sum"],
        ["algo.name=dpok", "train.images_per_prompt=1", "dpok.kl_weight=0", "dpok.reduction=sum"],  # V needs no group
        ["sampler.guidance_scale=0", "sampler.eta=1", "train.grad_clip=0", "train.weight_decay=0"],
        ["train.memory_margin=0", "train.adam_betas=[0, 0]", "output.save_every=0", "model.lora_rank=0"],
        ["loss.clip_range=1.0e9", "prompts.template='A painting of a {}'"],
        ["train.images_per_prompt=0", "train.images_per_prompt=2"],  # a later --set fixes an earlier value
        ["sampler.num_steps=4", "sampler.sde_steps=4", "sampler.noise_level=2"],  # the window: every step
        ["sampler.num_steps=4", "sampler.sde_steps=1", "sampler.sde_start=3"],  # the last step alone
    ],
)
def test_edge_values_that_mean_something_resolve(texts):
    resolve("tiny_demo", overrides=texts)


def test_every_error_is_reported_at_once_one_line_each():
    texts = ["train.lrr=1", "train.epochs=1.5", "loss.clip_range=-0.1", "train.steps_per_epoch=0", "nokey"]
    with pytest.raises(ConfigError) as info:
        resolve("tiny_demo", overrides=texts)
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    assert [line.split(":")[0] for line in lines] == [
        "--set expects key=value, got 'nokey'",
        "unknown config key 'train.lrr'; valid keys",
        "train.epochs",
        "loss.clip_range",
        "train.steps_per_epoch",
    ]


def test_a_preset_file_and_a_saved_config_are_checked_as_overrides_are(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {lr: 0, epochs: 0}\n")
    with pytest.raises(ConfigError, match=r"^train.epochs: expected at least 1, got 0\ntrain.lr: expected"):
        resolve(None, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="^sampler.batch_size: expected at least 1, got 0$"):
        from_dict({**to_dict(resolve("tiny_demo")), "sampler": {"batch_size": 0}})


def test_every_key_but_the_bools_has_a_rule():
    cfg = config_lib.Config()
    unruled = set()
    for key in config_lib.valid_keys():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if key not in config_lib.RANGES and key not in config_lib.CHOICES and not isinstance(value, bool):
            unruled.add(key)
    assert unruled == {"algo.offline_dir", "output.eval_prompts"}  # any folder; checked against sample_every


@pytest.mark.parametrize(
    "override, refused, changed",
    [
        ("train.lr=1e-4", {}, {"train.lr": (3e-4, 1e-4)}),
        ("output.eval_images=2", {}, {"output.eval_images": (4, 2)}),
        ("model.gradient_checkpointing=true", {}, {"model.gradient_checkpointing": (False, True)}),
        ("train.images_per_chunk=auto", {}, {}),
        ("train.images_per_chunk=16", {}, {"train.images_per_chunk": (32, 16)}),
        ("sampler.guidance_scale=3", {"sampler.guidance_scale": (5.0, 3.0)}, {}),
        ("train.steps_per_epoch=3", {"train.steps_per_epoch": (2, 3)}, {}),
        ("reward={brightness: 2.0}", {"reward": ({"brightness": 1.0}, {"brightness": 2.0})}, {}),
        ("train.weight_decay=0", {"train.weight_decay": (1e-4, 0.0)}, {}),
    ],
)
def test_resume_changes_splits_what_a_resume_may_change_from_what_it_may_not(override, refused, changed):
    saved = resolve("tiny_demo")
    assert config_lib.resume_changes(saved, resolve("tiny_demo", None, [override])) == (refused, changed)
    assert config_lib.resume_changes(saved, saved) == ({}, {})
