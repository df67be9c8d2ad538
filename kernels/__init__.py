"""Triton kernels for prdp_ds (SPEC §7). Each module holds its kernels, launcher, autograd.Function
and names its PyTorch reference."""
