"""Weight and activation number formats used by V4's kernels, in plain torch.

Owns: the FP8 e4m3 block-scaled layout (128x128 weight blocks, 1x128 activation blocks with
power-of-two scales), the FP4 E2M1 packed layout (two codes per byte, LOW nibble = even input
index, one scale per 32 inputs), their dequantizers (the oracle for in-kernel dequant) and
quantizers (used by tests and benchmarks to build weights).
Does not own: checkpoint loading (ue8m0 -> fp32 scale conversion lives with the model) or kernels.
"""

from __future__ import annotations

import torch

from ._common import cdiv

FP8_MAX = 448.0
FP8_BLOCK = 128
FP4_GROUP = 32
# E2M1 code -> value; codes 8..15 are the negated codes 0..7 (sign bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)  # [16] fp32


def pow2_scale_ref(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """2^ceil(log2(max(amax, 1e-4) / max_code)) computed exactly (frexp, no log2 rounding)."""
    r = amax.float().clamp(min=1e-4) / max_code
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(r), e)


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """w [..., N, K] float8_e4m3fn, scale [..., ceil(N/b), ceil(K/b)] fp32 -> [..., N, K] fp32."""
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(block, dim=-2)[..., :n, :]
    s = s.repeat_interleave(block, dim=-1)[..., :k]
    return w.float() * s


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """packed [..., K/2] uint8 -> codes [..., K] int64 in input order (low nibble first)."""
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """packed [..., N, K/2] uint8, scale [..., N, K/group] fp32 -> [..., N, K] fp32."""
    values = e2m1_table(packed.device)[unpack_fp4(packed)]
    return values * scale.float().repeat_interleave(group, dim=-1)


def dequant_weight(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Any supported expert/linear weight format -> fp32 with the same logical [..., N, K]."""
    if w.dtype == torch.float8_e4m3fn:
        return dequant_fp8_block(w, scale)
    if w.dtype == torch.uint8:
        return dequant_fp4(w, scale)
    return w.float()


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (float8_e4m3fn [..., N, K], fp32 scales [..., ceil(N/b), ceil(K/b)])."""
    n, k = w.shape[-2:]
    nb, kb = cdiv(n, block), cdiv(k, block)
    pad = torch.zeros(*w.shape[:-2], nb * block, kb * block, dtype=torch.float32, device=w.device)
    pad[..., :n, :k] = w.float()
    blocks = pad.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))  # [..., nb, b, kb, b]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = pow2_scale_ref(amax, FP8_MAX)
    s_full = scale.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    q = (w.float() / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp4(w: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float, K % group == 0 -> (uint8 [..., N, K/2], fp32 scales [..., N, K/group]).

    Nearest code per value after a power-of-two scale that maps the group's amax to <= 6.
    """
    k = w.shape[-1]
    if k % group or k % 2:
        raise ValueError(f"FP4 quantization needs K divisible by {group}, got {k}")
    g = w.float().unflatten(-1, (k // group, group))
    scale = pow2_scale_ref(g.abs().amax(-1), 6.0)  # [..., N, K/group]
    x = (g / scale[..., None]).flatten(-2)
    table = e2m1_table(w.device)
    codes = (x[..., None] - table).abs().argmin(-1)  # ties go to the lower code (the smaller magnitude)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, scale
