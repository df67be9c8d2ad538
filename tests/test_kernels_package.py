"""`kernels` must be this repository's package, not the unrelated PyPI distribution of that name."""

import os
from pathlib import Path

import kernels
import prdp_ds

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_this_repos_package():
    path = Path(kernels.__file__).resolve()
    assert path.is_relative_to(REPO / "kernels"), f"`kernels` resolves to {path}, outside {REPO}"
    assert Path(prdp_ds.__file__).resolve().is_relative_to(REPO)


def test_public_api():
    assert set(kernels.__all__) == {"step_log_ratio_triton", "rdp_loss_triton", "fused_prdp_loss_triton"}
    for name in kernels.__all__:
        fn = getattr(kernels, name)
        assert callable(fn) and Path(fn.__code__.co_filename).resolve().is_relative_to(REPO / "kernels")
        assert "PyTorch reference" in fn.__doc__


def test_interpreter_on_without_gpu():
    import torch

    if not torch.cuda.is_available():
        from kernels import step_logratio

        assert os.environ.get("TRITON_INTERPRET") == "1" and step_logratio.INTERPRET
