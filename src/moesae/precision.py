"""Mixed precision, fused optimiser, ``torch.compile`` and the CPU allocator for SAE training (issue #7).

bf16 autocast runs the encoder matmuls (and keeps the pre-activations the top-k reads) in
bfloat16 while the parameters and the Adam state stay float32 ("master weights"). The trainer
wraps only the forward pass in :func:`autocast_context`; the backward runs in the dtypes the
forward chose. Tolerance of bf16 against the fp32 reference: tests/test_fast_paths.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import ContextManager, Iterable

import torch
from torch import nn

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_allocator_tuned = False

AUTOCAST_MODES = ("auto", "bf16", "off")


def resolve_autocast(mode: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a TrainConfig ``autocast`` value, or None for plain fp32.

    ``auto``: bf16 on a CUDA device that supports it, fp32 elsewhere (bf16 matmuls on most CPUs
    are slower than fp32). ``bf16``: bf16 on any device. ``off``: fp32.
    """
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"invalid train config field 'autocast': must be one of {AUTOCAST_MODES}, got {mode!r}")
    device = torch.device(device)
    if mode == "off":
        return None
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "invalid train config field 'autocast': 'bf16' was requested but this GPU has no bfloat16 "
                "support; use 'auto' or 'off'"
            )
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> ContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_adam(
    params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Adam:
    """Adam without weight decay, fused into one kernel where the installed torch supports it.

    The unfused Adam makes about ten passes over every parameter per step; at M = 24576 that
    is as slow as the whole forward pass of a Scale SAE. Same update rule either way.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0, foreach=True)


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """Compile ``module``'s forward in place (``nn.Module.compile``) when ``enabled``.

    In place, so parameter names, ``state_dict`` and checkpoints are unchanged. Shapes that depend
    on the routing (tokens per expert) are marked dynamic to avoid a recompile every step.
    """
    if enabled:
        module.compile(dynamic=True)
    return module


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process instead of unmapping it (Linux only).

    A training step allocates several M × d tensors (gradients, temporaries) and frees them again.
    By default glibc serves each such block with a fresh ``mmap`` and returns it with ``munmap``,
    so every step pays a page fault per 4 KiB of every one of them: at M = 24576 on CPU that was
    about half the time of a Scale SAE step. After this call large blocks come from the heap and
    are reused by the next step (``mallopt(M_MMAP_MAX, 0)``, trimming off). The cost is that the
    process keeps its peak heap until it exits. Idempotent; returns whether it is in effect.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    return _allocator_tuned
