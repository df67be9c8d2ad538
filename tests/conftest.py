import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any
# kernel module is imported (docs/design.md §11).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never need the Hugging Face hub: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def world():
    """One single-rank process group (gloo) for the whole session, made before any test runs: the
    trainer and evaluate entry points called in-process leave a group they did not create in place,
    and DeepSpeed caches its groups, so a group torn down and made again would be stale to it."""
    from prdp_ds.engine import init_distributed

    return init_distributed()


@pytest.fixture
def poison(monkeypatch):
    """Every kernel launcher output starts as NaN, so an element a kernel fails to write cannot pass."""
    import kernels.utils as ku

    real = ku.empty_out

    def nan_empty(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(ku, "empty_out", nan_empty)


@pytest.fixture(scope="module")
def rollout():
    """A tiny policy moved away from its reference, its (G, B, T) = (2, 3, 4) rollout and (G, B) rewards."""
    from helpers import B, T, W

    from prdp_ds.models import build_tiny
    from prdp_ds.sampler import image_seeds, sample

    models = build_tiny(0)
    gen = torch.Generator().manual_seed(2)  # seeded: no r lands at a clip edge, where the loss has a kink
    with torch.no_grad():  # a policy that already moved away from the reference
        for p in models.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    traj = sample(models, ["a cat", "a red fox"], image_seeds(0, 0, [0, 1], B), T, W)
    rewards = torch.tensor([[0.30, 0.10, 0.20], [0.05, 0.25, 0.15]])
    return models, traj, rewards


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory):
    """The `tiny_demo` preset trained once per session (PRDP, ~3 minutes on 2 cores) -> its output dir."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("tiny_demo")
    repo = Path(__file__).resolve().parent.parent
    with socket.socket() as s:  # not the port of a process group this pytest process may hold
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run(
        [sys.executable, "-m", "prdp_ds.train", "--preset", "tiny_demo", "--output-dir", str(out)],
        cwd=repo,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": port},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
