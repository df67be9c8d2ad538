import sys

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
