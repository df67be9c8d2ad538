import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before any
# kernel module is imported (SPEC §12).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never need the Hugging Face hub: fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
