"""Compressor softmax pooling as running-softmax accumulators: dispatcher, Triton wrapper, torch
reference, and the small torch algebra around them.

Owns:
- `block_stats` (the kernel): tokens laid on the block grid of the compression ratio ->
  per block and channel (max g, sum exp(g - max), sum exp(g - max) * a), fp32. This is the part
  of the compressor that touches every token; the model's streaming compressor merges these
  accumulators with a cache slot's pending state, so it resumes at any position.
- `merge_stats`, `empty_stats`: combining accumulators (torch; O(entries), not O(tokens)).
- `compress_pool`: whole sequences from position 0 (stats, then merge; the kernel's gate and
  benchmark), beside its oracle `compress_pool_ref`:
  plain (HCA, ratio m): entry j pools tokens j*m .. j*m+m-1 of a [L, d].
  overlap (CSA, any ratio m): a and g are [L, 2d]; entry j pools the m tokens of block j-1 over
  channels [:d] and the m tokens of block j over channels [d:] (2m slots); for j = 0 the
  block j-1 slots are empty (weight 0). Output [L // m, d]; trailing tokens (L % m) are pending.
Does not own: the wkv/wgate projections, `ape` (already added to g), the entries' RMSNorm, RoPE
and quantization, or where the pending state is stored.
"""

from __future__ import annotations

import torch

from ._common import cdiv, check_last_dim_contiguous, check_tensor, interpreting, next_pow2, pick_triton


# ---- the kernel: per-block accumulators ------------------------------------------------------------

def block_stats(
    a: torch.Tensor,  # [L, C] fp32 values
    g: torch.Tensor,  # [L, C] fp32 gate logits (ape already added)
    ratio: int,
    offset: int = 0,  # the first token's slot in its block, 0 <= offset < ratio
    use_triton: bool | None = None,
) -> torch.Tensor:  # [ceil((offset + L) / ratio), 3, C] fp32
    """Block b holds tokens b*ratio - offset .. (b+1)*ratio - offset - 1; slots without a token
    contribute nothing (a block without any: max -inf, sums 0)."""
    _check(a, g, ratio, False)
    if not isinstance(offset, int) or not 0 <= offset < ratio:
        raise ValueError(f"offset must be an int in [0, {ratio}), got {offset!r}")
    if pick_triton(use_triton, [a, g]):
        return block_stats_triton(a, g, ratio, offset)
    return block_stats_ref(a, g, ratio, offset)


def block_stats_ref(a: torch.Tensor, g: torch.Tensor, ratio: int, offset: int = 0) -> torch.Tensor:
    length, width = a.shape
    nblk = cdiv(offset + length, ratio)
    # lay the tokens on the block grid, padding with gate -inf, so per-block stats are reductions
    gg = a.new_full((nblk * ratio, width), float("-inf"))
    aa = a.new_zeros((nblk * ratio, width))
    gg[offset:offset + length], aa[offset:offset + length] = g, a
    gg, aa = gg.view(nblk, ratio, width), aa.view(nblk, ratio, width)
    mx = gg.amax(dim=1)                                                       # [nblk, C]
    safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    w = torch.exp(gg - safe[:, None])
    return torch.stack([mx, w.sum(dim=1), (w * aa).sum(dim=1)], dim=1)


def block_stats_triton(a: torch.Tensor, g: torch.Tensor, ratio: int, offset: int = 0) -> torch.Tensor:
    from . import _compressor_jit as jit

    length, width = a.shape
    nblk = cdiv(offset + length, ratio)
    out = torch.empty(nblk, 3, width, dtype=torch.float32, device=a.device)
    if nblk == 0 or width == 0:
        return out
    block_r = next_pow2(ratio)
    # Keep the [BLOCK_R, BLOCK_C] tiles at <= 8K elements (HCA pools 128 tokens per entry).
    block_c = min(next_pow2(width), max(16, 8192 // block_r), 64 if interpreting() else 256)
    jit.block_stats_kernel[(nblk, cdiv(width, block_c))](
        a, g, out, length, width, ratio, offset, a.stride(0), g.stride(0), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


# ---- accumulator algebra ---------------------------------------------------------------------------

def empty_stats(n: int, d: int, device) -> torch.Tensor:
    """[n, 3, d] accumulators of no token: max -inf, sums 0."""
    t = torch.zeros(n, 3, d, device=device)
    t[:, 0] = float("-inf")
    return t


def merge_stats(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Merge running-softmax accumulators [n, 3, d] (an empty one has max -inf and zero sums)."""
    mx = torch.maximum(x[:, 0], y[:, 0])
    safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    fx = torch.where(torch.isinf(x[:, 0]), torch.zeros_like(mx), torch.exp(x[:, 0] - safe))
    fy = torch.where(torch.isinf(y[:, 0]), torch.zeros_like(mx), torch.exp(y[:, 0] - safe))
    return torch.stack([mx, x[:, 1] * fx + y[:, 1] * fy, x[:, 2] * fx + y[:, 2] * fy], dim=1)


# ---- whole sequences from position 0 ----------------------------------------------------------------

def compress_pool(
    a: torch.Tensor,  # [L, c*d] fp32 values (c = 2 when overlap else 1)
    g: torch.Tensor,  # [L, c*d] fp32 gate logits, ape already added
    ratio: int,
    overlap: bool,
    use_triton: bool | None = None,
) -> torch.Tensor:  # [L // ratio, d] fp32
    _check(a, g, ratio, overlap)
    n = a.shape[0] // ratio
    d = a.shape[1] // 2 if overlap else a.shape[1]
    if n == 0:
        return a.new_zeros(n, d)
    s = block_stats(a[: n * ratio], g[: n * ratio], ratio, 0, use_triton=use_triton)  # [n, 3, c*d]
    if overlap:
        # entry j: block j over channels [d:] merged with block j-1 over channels [:d]
        prev = torch.cat([empty_stats(1, d, a.device), s[:-1, :, :d]])
        s = merge_stats(s[:, :, d:], prev)
    return s[:, 2] / s[:, 1]


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


def _check(a: torch.Tensor, g: torch.Tensor, ratio: int, overlap: bool) -> None:
    check_tensor("a", a, ndim=2, dtypes=(torch.float32,))
    check_tensor("g", g, dtypes=(torch.float32,), shape=tuple(a.shape), device=a.device)
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    if overlap and a.shape[1] % 2:
        raise ValueError(f"overlap pooling needs an even channel count (2d), got {a.shape[1]}")
    check_last_dim_contiguous("a", a)
    check_last_dim_contiguous("g", g)
