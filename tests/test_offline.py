"""Offline mode: a dataset sampled once from the reference, resumable, refused when settings change."""

import json

import pytest
import torch
from helpers import SMALL, TIMING, metrics, run
from safetensors import safe_open
from safetensors.torch import load_file

OFFLINE = [*SMALL, "--set", "algo.online=false", "--set", "train.epochs=3"]


@pytest.mark.slow
def test_offline_dataset_is_the_references_rollouts_and_training_takes_the_online_steps(tmp_path):
    out = tmp_path / "run"
    run(["--output-dir", str(out), *OFFLINE])
    data = out / "offline"
    files = sorted(data.glob("epoch_*_rank0.safetensors"))
    assert [f.name for f in files] == [f"epoch_{e:04d}_rank0.safetensors" for e in range(3)]
    first = load_file(str(files[0]))
    assert "eps_ref" not in first and torch.equal(first["log_ratio_old"], torch.zeros_like(first["log_ratio_old"]))
    rows = metrics(out)
    assert [r["steps_applied"] for r in rows] == [2, 2, 2]
    online = tmp_path / "online"
    run(["--output-dir", str(online), *SMALL, "--set", "train.epochs=1"])
    # epoch 0 of both is sampled from theta = ref with the same prompts and seeds: the same rewards,
    # and the dataset stores the reward components, so they are logged offline too
    assert metrics(online)[0]["reward_mean"] == rows[0]["reward_mean"]
    components = [k for k in metrics(online)[0] if k.startswith("reward/")]
    assert components and all(metrics(online)[0][k] == rows[0][k] for k in components)
    assert all(k in r for r in rows for k in components)
    assert rows[1]["kl"] != 0.0  # pass 1 ran at theta != ref


def rollout_file(path):
    """A rollout file's metadata and tensors (its bytes are not canonical: safetensors writes the metadata
    map in hash order, which varies between processes)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_an_interrupted_dataset_is_completed_and_a_changed_one_refused(tmp_path):
    data = tmp_path / "data"
    common = [*OFFLINE, "--set", f"algo.offline_dir={data}"]
    run(["--output-dir", str(tmp_path / "a"), *common])
    kept_meta, kept = rollout_file(data / "epoch_0001_rank0.safetensors")
    (data / "epoch_0001_rank0.safetensors").unlink()
    (data / "epoch_0002_rank0.safetensors.tmp").write_bytes(b"half written")
    before = {f.name: f.stat().st_mtime_ns for f in data.glob("epoch_000[02]_rank0.safetensors")}
    proc = run(["--output-dir", str(tmp_path / "b"), *common])
    assert "offline dataset" in proc.stderr  # the progress bar of the one missing rollout
    meta, tensors = rollout_file(data / "epoch_0001_rank0.safetensors")
    assert meta == kept_meta and tensors.keys() == kept.keys()
    for k in kept:
        assert torch.equal(tensors[k], kept[k]), k  # bit-identical regeneration
    assert {f.name: f.stat().st_mtime_ns for f in data.glob("epoch_000[02]_rank0.safetensors")} == before
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert untimed(metrics(tmp_path / "a")) == untimed(metrics(tmp_path / "b"))
    proc = run(["--output-dir", str(tmp_path / "c"), *common, "--set", "sampler.guidance_scale=3.0"], check=False)
    assert proc.returncode != 0 and "sampler.guidance_scale: 5.0 there, 3.0 now" in proc.stderr
    proc = run(["--output-dir", str(tmp_path / "d"), *common, "--set", "sampler.spacing=quadratic"], check=False)
    assert proc.returncode != 0 and "sampler.spacing: 'uniform' there, 'quadratic' now" in proc.stderr
    assert json.loads((data / "meta.json").read_text())["sampler.guidance_scale"] == 5.0


def test_noise_device_is_recorded_and_a_dataset_is_completed_only_on_its_device_type(tmp_path):
    from prdp_ds.config import Config
    from prdp_ds.offline import OfflineDataset, dataset_meta

    meta = dataset_meta(Config(), 2, "fp", "cpu")
    assert meta["noise_device"] == "cpu" and dataset_meta(Config(), 2, "fp", "cuda")["noise_device"] == "cuda"
    made_on_cuda = {**meta, "noise_device": "cuda"}
    (tmp_path / "meta.json").write_text(json.dumps(made_on_cuda))
    never = lambda epoch: pytest.fail("nothing is to be sampled")  # noqa: E731
    with pytest.raises(ValueError, match="noise_device: 'cuda' there, 'cpu' now"):
        OfflineDataset(tmp_path, meta, 0).build(2, never)  # rollouts missing: they would get other noise
    for epoch in range(2):
        for rank in range(2):
            (tmp_path / f"epoch_{epoch:04d}_rank{rank}.safetensors").write_bytes(b"")
    OfflineDataset(tmp_path, meta, 0).build(2, never)  # complete: the stored latents load on any device
    (tmp_path / "epoch_0001_rank1.safetensors").unlink()  # another rank's rollout missing: refused on every rank
    with pytest.raises(ValueError, match="noise_device"):
        OfflineDataset(tmp_path, meta, 0).build(2, never)
    older = {k: v for k, v in made_on_cuda.items() if k != "noise_device"}  # before the key: drawn on the CPU
    (tmp_path / "meta.json").write_text(json.dumps(older))
    OfflineDataset(tmp_path, meta, 0).check_meta(sampling=True)
    with pytest.raises(ValueError, match="noise_device: 'cpu' there, 'cuda' now"):
        OfflineDataset(tmp_path, {**meta, "noise_device": "cuda"}, 0).check_meta(sampling=True)


@pytest.mark.slow
def test_offline_trains_a_flow_model_with_an_sde_window_and_records_the_window(tmp_path):
    out = tmp_path / "run"
    flux = ["--set", "model.pretrained=tiny_flux", "--set", "sampler.sde_steps=2", "--set", "sampler.sde_start=1"]
    run(["--output-dir", str(out), *OFFLINE, *flux])
    meta = json.loads((out / "offline" / "meta.json").read_text())
    assert meta["sampler.sde_steps"] == 2 and meta["sampler.sde_start"] == 1 and "sampler.noise_level" not in meta
    first = load_file(str(out / "offline" / "epoch_0000_rank0.safetensors"))
    assert first["latents"].shape[2] == 3 and first["log_ratio_old"].shape[2] == 2  # the window's 2 steps
    rows = metrics(out)
    assert [r["steps_applied"] for r in rows] == [2, 2, 2] and rows[1]["kl"] != 0.0
