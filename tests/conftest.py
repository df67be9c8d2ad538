import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any
# kernel module is imported (SPEC §12).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never need the Hugging Face hub: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def poison(monkeypatch):
    """Every kernel launcher output starts as NaN, so an element a kernel fails to write cannot pass."""
    import kernels.step_logratio as sl
    real = sl.empty_out

    def nan_empty(shape, dtype, device):
        return real(shape, dtype, device).fill_(float("nan"))
    monkeypatch.setattr(sl, "empty_out", nan_empty)
