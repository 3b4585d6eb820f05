"""Compressor softmax pooling (HCA and CSA layouts): dispatcher, Triton wrapper, torch reference.

Owns: entry_j[ch] = sum over the entry's token slots of softmax_slots(g[., ch]) * a[., ch], fp32.
  plain (HCA, ratio m): entry j pools tokens j*m .. j*m+m-1 of a [L, d].
  overlap (CSA, ratio 4 in V4): a and g are [L, 2d]; entry j pools the m tokens of block j-1 over
  channels [:d] and the m tokens of block j over channels [d:] (2m slots); for j = 0 the
  block j-1 slots are empty (weight 0).
Output [L // m, d]; trailing tokens (L % m) belong to the next call's pending state.
Does not own: the wkv/wgate projections, `ape` (already added to g), the entries' RMSNorm, RoPE
and quantization, or the pending-state bookkeeping across calls.
"""

from __future__ import annotations

import torch

from ._common import cdiv, check_last_dim_contiguous, check_tensor, interpreting, next_pow2, pick_triton


def compress_pool(
    a: torch.Tensor,  # [L, c*d] fp32 values (c = 2 when overlap else 1)
    g: torch.Tensor,  # [L, c*d] fp32 gate logits, ape already added
    ratio: int,
    overlap: bool,
    use_triton: bool | None = None,
) -> torch.Tensor:  # [L // ratio, d] fp32
    _check(a, g, ratio, overlap)
    if pick_triton(use_triton, [a, g]):
        return compress_pool_triton(a, g, ratio, overlap)
    return compress_pool_ref(a, g, ratio, overlap)


def compress_pool_ref(a: torch.Tensor, g: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    length, width = a.shape
    n = length // ratio
    a = a[: n * ratio].float().view(n, ratio, width)
    g = g[: n * ratio].float().view(n, ratio, width)
    if not overlap:
        return (torch.softmax(g, dim=1) * a).sum(1)
    d = width // 2
    # Slots of entry j: block j-1 with channels [:d] (absent for j = 0), then block j with [d:].
    prev_a = torch.cat([torch.zeros_like(a[:1, :, :d]), a[:-1, :, :d]], 0)
    prev_g = torch.cat([torch.full_like(g[:1, :, :d], float("-inf")), g[:-1, :, :d]], 0)
    slots_a = torch.cat([prev_a, a[:, :, d:]], 1)  # [n, 2*ratio, d]
    slots_g = torch.cat([prev_g, g[:, :, d:]], 1)
    return (torch.softmax(slots_g, dim=1) * slots_a).sum(1)


def compress_pool_triton(a: torch.Tensor, g: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    from . import _compressor_jit as jit

    length, width = a.shape
    n = length // ratio
    d = width // 2 if overlap else width
    out = torch.empty(n, d, dtype=torch.float32, device=a.device)
    if n == 0 or d == 0:
        return out
    block_r = next_pow2(ratio)
    # Keep the [BLOCK_R, BLOCK_D] tiles at <= 8K elements (HCA pools 128 tokens per entry).
    block_d = min(next_pow2(d), max(16, 8192 // block_r), 64 if interpreting() else 256)
    jit.compress_pool_kernel[(n, cdiv(d, block_d))](
        a, g, out, ratio, d, a.stride(0), g.stride(0), out.stride(0),
        OVERLAP=overlap, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _check(a: torch.Tensor, g: torch.Tensor, ratio: int, overlap: bool) -> None:
    check_tensor("a", a, ndim=2, dtypes=(torch.float32,))
    check_tensor("g", g, dtypes=(torch.float32,), shape=tuple(a.shape), device=a.device)
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if overlap and a.shape[1] % 2:
        raise ValueError(f"overlap pooling needs an even channel count (2d), got {a.shape[1]}")
    check_last_dim_contiguous("a", a)
    check_last_dim_contiguous("g", g)
