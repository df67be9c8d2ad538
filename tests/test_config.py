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
