"""Helpers shared by the kernel modules: argument checks, scalar and coefficient conversion, row
flattening and the output allocator. Imports only torch and triton: kernels/ never imports prdp_ds.
"""

import torch
import triton

# Fixed when this module is imported, exactly like @triton.jit decides interpreter vs compiler.
INTERPRET = bool(triton.knobs.runtime.interpret)

# How a log-ratio is reduced over the D latent elements (the kernels and prdp_ds.logratio).
REDUCTIONS = ("sum", "mean")


def empty_out(shape, dtype, device):
    """Every output buffer of the launchers comes from here (tests swap in a NaN-poisoning
    allocator to prove each element is written by a kernel)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_tensor(fn, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def check_device(fn, named):
    """All tensors on one device, and a device the kernels can run on."""
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {where}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{fn}: tensors are on {device}, but the Triton kernels need CUDA tensors; to run on CPU "
            "set TRITON_INTERPRET=1 before `kernels` (or triton kernels) are imported"
        )
    return device


def coef_arg(fn, name, value, period, device, what):
    """A scalar / 0-dim / (period,) coefficient -> (fp32 contiguous tensor, its period)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{fn}: {name} requires grad, but the kernel treats it as a constant "
                "(its gradient is not computed); pass it detached"
            )
        if value.numel() not in (1, period):
            raise ValueError(
                f"{fn}: {name} must be a scalar or have {period} elements ({what}), got shape {tuple(value.shape)}"
            )
        t = value.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        return t, t.numel()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a float or a tensor, got {type(value).__name__}") from None
    return torch.tensor([v], dtype=torch.float32).to(device), 1


def scalar_arg(fn, name, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {tuple(value.shape)}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: {name} requires grad, but the kernel treats it as a constant")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}") from None


def check_latents(fn, named, min_dim, layout):
    """Validate the five latent-sized inputs (eps_uncond, eps_cond, eps_ref, x_t, x_prev): tensors of
    one shape with >= min_dim dims, only the two UNet outputs differentiable. Returns the shape."""
    for name, t in named.items():
        check_tensor(fn, name, t)
    shape = named["eps_uncond"].shape
    if len(shape) < min_dim:
        raise ValueError(f"{fn}: eps_uncond must have shape {layout} with >= {min_dim} dims, got {tuple(shape)}")
    for name, t in named.items():
        if t.shape != shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of eps_uncond)"
            )
        if name in ("eps_ref", "x_t", "x_prev") and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{fn}: {name} requires grad, but only eps_uncond and eps_cond are "
                "differentiable here; pass it detached"
            )
    return shape


def check_reduction(fn, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def flat_rows(t, rows):
    """(rows, ...) -> (rows, D) contiguous; a copy only when the input is not contiguous."""
    return t.reshape(rows, -1).contiguous()
