import sys

import numpy as np
import pytest
import torch

from prdp_ds.rewards import NonFiniteRewardError, RewardError, available_rewards, build_reward, register_reward


def _images(n=4, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen)


def test_jpeg_rewards_order_flat_above_noisy():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = _images(1)
    images = torch.cat([flat, noisy])
    comp, _ = build_reward({"jpeg_compressibility": 1.0})(images, ["a", "b"])
    incomp, _ = build_reward({"jpeg_incompressibility": 1.0})(images, ["a", "b"])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)
    assert 0 < incomp[1] < 10  # kB


def test_weighted_sum_and_components():
    images = _images(3)
    reward = build_reward({"jpeg_compressibility": 1.0, "brightness": {"weight": 0.5}})
    total, parts = reward(images, ["x"] * 3)
    assert set(parts) == {"jpeg_compressibility", "brightness"}
    torch.testing.assert_close(parts["brightness"], images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(total, parts["jpeg_compressibility"] + 0.5 * parts["brightness"])


def test_custom_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "import torch\n"
        "def red(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n"
        "def scaled(factor):\n    return lambda images, prompts: factor * images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _images(2)
    total, _ = build_reward({"my_scores:red": 2.0})(images, ["a", "b"])
    torch.testing.assert_close(total, 2 * images[:, 0].mean(dim=(1, 2)))
    total, _ = build_reward({"my_scores:scaled": {"factor": 3.0}})(images, ["a", "b"])
    torch.testing.assert_close(total, 3 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(RewardError, match="cannot import 'nope'"):
        build_reward({"my_scores:nope": 1.0})
    sys.modules.pop("my_scores", None)


def test_config_errors_are_clear():
    with pytest.raises(RewardError, match="unknown reward 'sharpness'.*brightness"):
        build_reward({"sharpness": 1.0})
    with pytest.raises(RewardError, match=r"reward 'jpeg_compressibility': unknown option\(s\) \['qualty'\]"):
        build_reward({"jpeg_compressibility": {"qualty": 90}})
    with pytest.raises(RewardError, match="weight must be a number"):
        build_reward({"brightness": "high"})
    with pytest.raises(RewardError, match="non-empty mapping"):
        build_reward({})
    with pytest.raises(RewardError, match="images"):
        build_reward({"brightness": 1.0})(_images(2), ["only one prompt"])


@pytest.fixture
def broken_rewards():
    @register_reward("test_nan_reward")
    def nan_reward(device="cpu"):
        return lambda images, prompts: torch.tensor([0.0, float("nan")])

    @register_reward("test_shape_reward")
    def shape_reward(device="cpu"):
        return lambda images, prompts: torch.zeros(len(prompts), 1)

    yield
    from prdp_ds import rewards

    for name in ("test_nan_reward", "test_shape_reward"):
        rewards._REGISTRY.pop(name)


def test_bad_scores_raise_naming_the_reward(broken_rewards):
    with pytest.raises(NonFiniteRewardError, match="'test_nan_reward'.*'a dog'") as info:
        build_reward({"test_nan_reward": 1.0})(_images(2), ["a cat", "a dog"])
    assert info.value.prompts == ["a dog"]
    with pytest.raises(RewardError, match=r"'test_shape_reward' returned shape \(2, 1\), expected \(2,\)"):
        build_reward({"test_shape_reward": 1.0})(_images(2), ["a", "b"])


def test_registry_lists_builtins_and_combinations():
    names = available_rewards()
    assert {"jpeg_compressibility", "jpeg_incompressibility", "brightness", "multi_reward"} <= set(names)


@pytest.fixture
def reward_cases(tmp_path, monkeypatch):
    """An importable module `reward_cases` of custom rewards, good and bad; forgotten after the test."""
    (tmp_path / "reward_cases.py").write_text(
        "THRESHOLD = 3\n"
        "def one_arg(images):\n    return images.mean(dim=(1, 2, 3))\n"
        "def not_a_factory(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n"
        "def makes_an_int(factor):\n    return 3\n"
        "def returning(value):\n    return lambda images, prompts: value\n"
    )
    (tmp_path / "reward_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("reward_cases", "reward_broken"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            "reward_cases:THRESHOLD",
            r"^custom reward 'reward_cases:THRESHOLD': 'THRESHOLD' is not callable \(it is int 3\)$",
        ),
        ("reward_cases:nope", r"^custom reward 'reward_cases:nope': cannot import 'nope' from 'reward_cases'"),
        ("no_such_module:fn", r"^custom reward 'no_such_module:fn': cannot import 'fn' from 'no_such_module'"),
        ("reward_broken:fn", r"^custom reward 'reward_broken:fn': cannot import .*RuntimeError: no GPU here"),
        (":fn", r"^custom reward ':fn': cannot import 'fn' from ''"),
        (
            "reward_cases:one_arg",
            r"^custom reward 'reward_cases:one_arg': expected a reward callable as fn\(images, prompts\)",
        ),
        (
            {"reward_cases:not_a_factory": {"factor": 2}},
            r"^custom reward 'reward_cases:not_a_factory': expected a factory taking the options \['factor'\]",
        ),
        (
            {"reward_cases:makes_an_int": {"factor": 2}},
            r"^custom reward 'reward_cases:makes_an_int': the factory returned int 3, expected a callable$",
        ),
    ],
)
def test_a_bad_custom_reward_is_refused_when_built_in_one_line(reward_cases, spec, match):
    with pytest.raises(RewardError, match=match) as info:
        build_reward(spec if isinstance(spec, dict) else {spec: 1.0})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "value, match",
    [
        (None, r"returned NoneType None, expected a tensor, array or list of 2 numbers"),
        ("high", r"returned str 'high', expected a tensor, array or list of 2 numbers"),
        (["a", "b"], r"returned list \['a', 'b'\], expected"),
        ([1.0, None], r"returned list \[1.0, None\], expected"),
        ([[1.0], [2.0, 3.0]], r"returned list \[\[1.0\], \[2.0, 3.0\]\], expected"),
        (torch.zeros(2, dtype=torch.complex64), r"returned Tensor tensor\(\[0.\+0.j, 0.\+0.j\]\), expected"),
        (torch.zeros(3), r"returned shape \(3,\), expected \(2,\)"),
        (np.zeros((2, 1)), r"returned shape \(2, 1\), expected \(2,\)"),
        (0.5, r"returned float 0.5, expected"),
    ],
)
def test_unusable_scores_name_the_reward_what_it_returned_and_what_was_expected(reward_cases, value, match):
    reward = build_reward({"reward_cases:returning": {"value": value}})
    with pytest.raises(RewardError, match=r"^reward 'reward_cases:returning' " + match) as info:
        reward(_images(2), ["a", "b"])
    assert not isinstance(info.value, NonFiniteRewardError)


@pytest.mark.parametrize(
    "value, expected",
    [
        ([0.5, 2.0], [0.5, 2.0]),
        ((0.5, 2.0), [0.5, 2.0]),
        (np.array([0.5, 2.0]), [0.5, 2.0]),
        (np.array([1, 2]), [1.0, 2.0]),
        (torch.tensor([0.5, 2.0], dtype=torch.float64), [0.5, 2.0]),
        (torch.tensor([True, False]), [1.0, 0.0]),
    ],
)
def test_scores_may_be_a_tensor_an_array_or_a_list_of_numbers(reward_cases, value, expected):
    total, parts = build_reward({"reward_cases:returning": {"value": value}})(_images(2), ["a", "b"])
    torch.testing.assert_close(total, torch.tensor(expected))
    assert parts["reward_cases:returning"].dtype == torch.float32


def test_non_finite_scores_in_a_list_raise_as_in_a_tensor(reward_cases):
    reward = build_reward({"reward_cases:returning": {"value": [1.0, float("inf")]}})
    with pytest.raises(NonFiniteRewardError, match="'reward_cases:returning'.*'b'") as info:
        reward(_images(2), ["a", "b"])
    assert info.value.prompts == ["b"]
