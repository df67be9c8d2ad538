"""Triton kernels for prdp_ds (docs/design.md §10). Each module holds its kernels, launcher, autograd.Function
and names its PyTorch reference; the argument checks they share live in kernels.utils. kernels/ imports only
torch, triton and itself:

- step_log_ratio_triton  (kernels.step_logratio): per-step CFG log-ratio, (rows, D) -> (rows,)
- rdp_loss_triton        (kernels.rdp_loss): the PRDP loss on (G, B, T) log-ratios -> scalar
- fused_prdp_loss_triton (kernels.fused): both over whole (G, B, T, D...) trajectories -> scalar
"""

import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any
# kernel module is imported (docs/design.md §11).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fused import fused_prdp_loss_triton  # noqa: E402
from kernels.rdp_loss import rdp_loss_triton  # noqa: E402
from kernels.step_logratio import step_log_ratio_triton  # noqa: E402

__all__ = ["step_log_ratio_triton", "rdp_loss_triton", "fused_prdp_loss_triton"]
