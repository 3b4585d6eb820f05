"""Shared plumbing for the kernel wrappers: backend choice, argument checks, small integer helpers.

Owns: the rule that picks Triton or the torch reference (by the tensors' device, never by a
global flag) and the checks every wrapper runs before it launches anything.
Does not own: any kernel or reference math, and it never imports triton at import time, so
`batchv4.kernels` stays importable where triton is absent.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_triton(use_triton: bool | None, tensors: Iterable[torch.Tensor | None]) -> bool:
    """Decide whether an op runs its Triton kernel.

    None: Triton exactly when every tensor is on CUDA and triton is installed.
    True: Triton, which needs CUDA tensors or the interpreter (CPU tensors + TRITON_INTERPRET=1).
    False: the torch reference.
    """
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if use_triton is None:
        return on_cuda and triton_available()
    if not use_triton:
        return False
    if not triton_available():
        raise RuntimeError("use_triton=True but triton is not installed (pip install 'batchv4[kernels]')")
    if not on_cuda and not interpreting():
        raise ValueError("use_triton=True needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    return True


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise ValueError with a readable message when `t` does not have the expected layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int, minimum: int = 1) -> int:
    p = minimum
    while p < n:
        p *= 2
    return p


INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
