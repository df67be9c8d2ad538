import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, _port

from prdp_ds.config import Config
from prdp_ds.engine import batch_arithmetic, build_ds_config, load_ds_json

# under the deepspeed launcher: initialise, then count this process's mappings of DeepSpeed's shared-memory buffers
INIT_AND_COUNT_SHM = """
from pathlib import Path
from prdp_ds.engine import init_distributed
rank, world, _ = init_distributed()
print(f"rank {rank} maps {Path('/proc/self/maps').read_text().count('deepspeed_allreduce_buffer')} buffers")
"""


def _cfg(N=8, B=4, T=10, images_per_chunk=3, steps_per_chunk=4):
    cfg = Config()
    cfg.train.prompts_per_epoch, cfg.train.images_per_prompt = N, B
    cfg.sampler.num_steps = T
    cfg.train.images_per_chunk, cfg.train.steps_per_chunk = images_per_chunk, steps_per_chunk
    return cfg


@pytest.mark.parametrize("world", [1, 2, 4])
def test_accumulation_equals_backward_calls_per_step(world):
    cfg = _cfg()
    arith = batch_arithmetic(cfg, world)
    images = 8 // world * 4
    assert arith["images_per_rank"] == images
    assert arith["backward_calls_per_step"] == -(-images // 3) * -(-10 // 4)
    ds = build_ds_config({}, cfg, world)
    assert ds["gradient_accumulation_steps"] == arith["backward_calls_per_step"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="train.prompts_per_epoch=8 must be divisible by the world size 3"):
        batch_arithmetic(_cfg(), 3)


@pytest.mark.parametrize(
    "json_value,match",
    [
        ({"gradient_accumulation_steps": 1}, "'gradient_accumulation_steps' is owned"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' is owned by the training config"),
        ({"data_types": {"grad_accum_dtype": "bf16"}}, "grad_accum_dtype must be 'fp32'"),
        ({"communication_data_type": "bf16"}, "communication_data_type must be 'fp32'"),
    ],
)
def test_conflicting_json_is_an_error(json_value, match):
    with pytest.raises(ValueError, match=match):
        build_ds_config(json_value, _cfg(), 1)


def test_throughput_timer_is_off_unless_the_json_sets_timers():
    """DeepSpeed's throughput timer synchronizes the device on every engine.step (once per backward call here)."""
    assert build_ds_config({}, _cfg(), 1)["timers"] == {"throughput": {"enabled": False}}
    mine = {"throughput": {"enabled": True, "synchronized": False}}
    assert build_ds_config({"timers": mine}, _cfg(), 1)["timers"] == mine


def test_agreeing_json_values_and_offload():
    cfg = _cfg()
    ds = build_ds_config(
        {
            "gradient_clipping": cfg.train.grad_clip,
            "bf16": {"enabled": False},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        },
        cfg,
        1,
    )
    assert ds["bf16"]["enabled"] is False and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json")), ids=lambda p: p.stem
)
def test_shipped_ds_configs_are_accepted(path):
    ds = build_ds_config(load_ds_json(path), _cfg(), 1, str(path))
    # ZeRO-1 reduces gradients once per optimizer step (docs/design.md §8); zero3.json stays at stage 3
    assert ds["zero_optimization"]["stage"] == (3 if path.stem == "zero3" else 1)
    assert ds["timers"] == {"throughput": {"enabled": False}} and ds["communication_data_type"] == "fp32"
    if path.stem == "zero2_fp32":  # bf16 off even where the accelerator has it
        assert ds["bf16"]["enabled"] is False


@pytest.mark.slow
def test_cpu_ranks_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU backend maps a shared-memory buffer per rank and never unlinks it (66 MB of RAM per rank per
    run, until reboot); init_distributed unlinks it once every rank has mapped every other's."""
    script, port = tmp_path / "init.py", str(_port())
    script.write_text(INIT_AND_COUNT_SHM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    proc = subprocess.run([*launcher, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {int(r): int(n) for r, n in re.findall(r"rank (\d) maps (\d+) buffers", proc.stdout)}
    assert sorted(counts) == [0, 1] and min(counts.values()) >= 2, proc.stdout[-3000:]  # both buffers, in each rank
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
