"""DeepSeek-V4's quantized number formats as pure torch functions.

Owns: ue8m0 scales, FP8 e4m3 weights with 128x128 block scales, packed FP4 (E2M1) experts with
per-32 scales (decode and encode), and the activation quantize-dequantize simulations the
reference runs in its forward (FP8 blocks of 64, FP4 blocks of 32, Walsh-Hadamard rotation,
FP8 rows in blocks of 128 for the FP8 GEMM path). Does not own: where tensors live, checkpoint
names (see `checkpoint.py`), or GEMM kernels (see `batchv4.kernels`).

Scale conventions: every scale here multiplies (dequant = q * scale); ue8m0 byte b means 2^(b-127).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
FP4_MAX = 6.0
# E2M1 code -> value; codes 8-15 are the negated 0-7 (code 8 is -0.0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between consecutive magnitudes 0..6; at the k-th midpoint a tie goes to the even code
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_E8M0 = getattr(torch, "float8_e8m0fnu", None)


# ---- ue8m0 scales --------------------------------------------------------------------------------

def is_e8m0(t: torch.Tensor) -> bool:
    return _E8M0 is not None and t.dtype == _E8M0


def e8m0_to_float(t: torch.Tensor) -> torch.Tensor:
    """ue8m0 bytes (float8_e8m0fnu or uint8) [...] -> float32 2^(byte-127) [...] (byte 255 -> NaN)."""
    b = t.view(torch.uint8) if is_e8m0(t) else t
    if b.dtype != torch.uint8:
        raise TypeError(f"e8m0_to_float expects float8_e8m0fnu or uint8, got {t.dtype}")
    e = b.to(torch.int32) - 127
    out = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)
    return torch.where(b == 255, torch.full_like(out, float("nan")), out)


def float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales [...] -> ue8m0 bytes [...] as float8_e8m0fnu (uint8 if torch lacks it)."""
    exp = _log2_ceil(s.float())
    if bool(((exp < -127) | (exp > 127)).any()):
        raise ValueError("scale outside the ue8m0 range 2^-127..2^127")
    b = (exp + 127).to(torch.uint8)
    return b.view(_E8M0) if _E8M0 is not None else b


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A scale tensor in any stored form (e8m0, uint8 bytes, float) -> float32, same shape."""
    if is_e8m0(scale) or scale.dtype == torch.uint8:
        return e8m0_to_float(scale)
    return scale.float()


def _log2_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for x > 0, exactly (from the float's exponent bits, as the reference kernels do)."""
    m, e = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    return torch.where(m == 0.5, e - 1, e).to(torch.int32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)


# ---- FP8 e4m3 weights with 128x128 blocks --------------------------------------------------------

def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """scale [..., ceil(rows/b), ceil(cols/b)] -> [..., rows, cols] (each scale covers a b x b block)."""
    return scale.repeat_interleave(block, dim=-2)[..., :rows, :].repeat_interleave(block, dim=-1)[..., :cols]


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w [..., O, I] float8_e4m3fn, scale [..., ceil(O/b), ceil(I/b)] float32 or e8m0 -> float32 [..., O, I]."""
    o, i = w.shape[-2:]
    want = (-(-o // block), -(-i // block))
    if tuple(scale.shape[-2:]) != want or scale.shape[:-2] != w.shape[:-2]:
        raise ValueError(f"FP8 weight {tuple(w.shape)} needs block scales {(*w.shape[:-2], *want)}, "
                         f"got {tuple(scale.shape)}")
    return w.float() * _expand_blocks(scale_to_float(scale), o, i, block)


def quant_fp8_block(w: torch.Tensor, block: int = 128, scale_format: str = "e8m0"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] float -> (w8 [..., O, I] float8_e4m3fn, scale [..., ceil(O/b), ceil(I/b)]).

    scale_format "e8m0": power-of-two scales stored as float8_e8m0fnu (2^ceil(log2(amax/448)));
    "f32": float32 scales amax/448. Dequantizing gives w up to e4m3 rounding.
    """
    if scale_format not in ("e8m0", "f32"):
        raise ValueError(f"scale_format must be 'e8m0' or 'f32', got {scale_format!r}")
    o, i = w.shape[-2:]
    po, pi = (-o) % block, (-i) % block
    wf = F.pad(w.float(), (0, pi, 0, po))
    lead = wf.shape[:-2]
    blocks = wf.reshape(*lead, (o + po) // block, block, (i + pi) // block, block)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(2.0 ** -126)      # [..., O/b, I/b] fp32
    if scale_format == "e8m0":
        # the smallest ue8m0 scale 2^-127 still covers any block this tiny (all-zero blocks included)
        s = _pow2(_log2_ceil(amax / FP8_MAX).clamp(-127, 127))
        stored = float_to_e8m0(s)
    else:
        s = amax / FP8_MAX
        stored = s
    w8 = (w.float() / _expand_blocks(s, o, i, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, stored


# ---- FP4 E2M1, two codes per byte, per-32 scales along K -----------------------------------------

def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """packed [..., K/2] int8/uint8 (low nibble = even index) -> float32 E2M1 values [..., K]."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"packed FP4 must be int8 or uint8, got {packed.dtype}")
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)        # [..., K] uint8
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    return table[codes.long()]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """packed [..., K/2] int8/uint8, scale [..., K/32] e8m0/float -> float32 [..., K]."""
    k = packed.shape[-1] * 2
    if tuple(scale.shape) != (*packed.shape[:-1], -(-k // block)):
        raise ValueError(f"FP4 tensor {tuple(packed.shape)} (K={k}) needs scales "
                         f"{(*packed.shape[:-1], -(-k // block))}, got {tuple(scale.shape)}")
    s = scale_to_float(scale).repeat_interleave(block, dim=-1)[..., :k]
    return unpack_fp4(packed) * s


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] already within [-6, 6] -> E2M1 codes [...] uint8, nearest value, ties to even code."""
    a = x.abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=x.device)
    # above midpoint k means code > k; at a midpoint, move up only when k is odd (k+1 is even)
    above = torch.where(torch.arange(7, device=x.device) % 2 == 0, a[..., None] > mids, a[..., None] >= mids)
    code = above.sum(dim=-1).to(torch.uint8)
    return torch.where(torch.signbit(x) & (code > 0), code | 0x08, code)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [..., K] uint8 (K even) -> packed [..., K/2] uint8, low nibble = even index."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def quant_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] float (K a multiple of 32) -> (packed [..., K/2] int8, scale [..., K/32] e8m0).

    Power-of-two scale 2^ceil(log2(amax/6)) per block, values rounded to nearest E2M1 (ties to even).
    """
    k = w.shape[-1]
    if k % block:
        raise ValueError(f"FP4 quantization needs the last dim to be a multiple of {block}, got {k}")
    wb = w.float().reshape(*w.shape[:-1], k // block, block)
    amax = wb.abs().amax(dim=-1).clamp_min(FP4_MAX * 2.0 ** -126)     # [..., K/32]
    s = _pow2(_log2_ceil(amax / FP4_MAX))
    codes = round_e2m1((wb / s[..., None]).clamp(-FP4_MAX, FP4_MAX)).reshape(w.shape)
    return pack_fp4(codes).view(torch.int8), float_to_e8m0(s)


# ---- activation simulations (reference QAT numerics, deepseek-v4.md §2.8) ------------------------

def _blocked(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    k = x.shape[-1]
    pad = (-k) % block
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    return xf.reshape(*x.shape[:-1], (k + pad) // block, block), k


def fp8_qdq(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x [..., K] -> same shape and dtype, each block of `block` along K rounded through e4m3 with a
    power-of-two scale s = 2^ceil(log2(max(amax, 1e-4) / 448))."""
    xb, k = _blocked(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
    s = _pow2(_log2_ceil(amax / FP8_MAX))
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return q.flatten(-2)[..., :k].to(x.dtype)


def fp4_qdq(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x [..., K] -> same shape and dtype, each block rounded to E2M1 (ties to even) with a
    power-of-two scale s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))."""
    xb, k = _blocked(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126)
    s = _pow2(_log2_ceil(amax / FP4_MAX))
    codes = round_e2m1((xb / s).clamp(-FP4_MAX, FP4_MAX))
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    return (table[codes.long()] * s).flatten(-2)[..., :k].to(x.dtype)


def act_quant_fp8_rows(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] float8_e4m3fn, scale [..., ceil(K/block)] float32), x = q * scale per block.

    The FP8 GEMM path's activation quantization: power-of-two scales, amax floored at 1e-4.
    """
    xb, k = _blocked(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
    s = _pow2(_log2_ceil(amax / FP8_MAX))
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)[..., :k]
    return q, s.squeeze(-1)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform (Sylvester order, scale 1/sqrt(n)) on the last dim.

    x [..., n] with n a power of two -> same shape and dtype (computed in float32).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * n ** -0.5).to(x.dtype)


# ---- the production cache layout: packed FP8 entries, packed FP4 indexer keys --------------------

def kv_entry_nbytes(dim: int, rope_dims: int, rope_dtype: torch.dtype, block: int = 64) -> int:
    """Bytes of one packed compressed entry: RoPE dims in `rope_dtype`, the other dims as e4m3,
    one ue8m0 scale per `block` of them, padded to 8 bytes (584 for V4 in bf16)."""
    nope = dim - rope_dims
    raw = rope_dims * torch.empty(0, dtype=rope_dtype).element_size() + nope + -(-nope // block)
    return -(-raw // 8) * 8


def pack_kv_entries(x: torch.Tensor, rope_dims: int, block: int = 64) -> torch.Tensor:
    """x [..., D] (RoPE dims last) -> uint8 [..., kv_entry_nbytes]: [RoPE dims as x.dtype bytes |
    e4m3 codes | ue8m0 scales | pad]. Unpacking gives `fp8_qdq` of the non-RoPE dims exactly and the
    RoPE dims unchanged."""
    nope = x.shape[-1] - rope_dims
    rope = x[..., nope:].contiguous().view(torch.uint8)
    q, s = act_quant_fp8_rows(x[..., :nope], block)
    parts = [rope, q.view(torch.uint8), float_to_e8m0(s).view(torch.uint8)]
    pad = kv_entry_nbytes(x.shape[-1], rope_dims, x.dtype, block) - sum(p.shape[-1] for p in parts)
    parts.append(torch.zeros(*x.shape[:-1], pad, dtype=torch.uint8, device=x.device))
    return torch.cat(parts, dim=-1)


def unpack_kv_entries(b: torch.Tensor, dim: int, rope_dims: int, dtype: torch.dtype,
                      block: int = 64) -> torch.Tensor:
    """uint8 [..., kv_entry_nbytes] from `pack_kv_entries` -> [..., dim] in `dtype`."""
    nope = dim - rope_dims
    r = rope_dims * torch.empty(0, dtype=dtype).element_size()
    rope = b[..., :r].contiguous().view(dtype)
    codes = b[..., r:r + nope].contiguous().view(torch.float8_e4m3fn).float()
    s = e8m0_to_float(b[..., r + nope:r + nope + -(-nope // block)])
    vals = codes * s.repeat_interleave(block, dim=-1)[..., :nope]
    return torch.cat([vals.to(dtype), rope], dim=-1)


def fp4_row_nbytes(dim: int, block: int = 32) -> int:
    """Bytes of one packed FP4 row: two values per byte + one ue8m0 scale per `block` (68 for 128)."""
    return dim // 2 + -(-dim // block)


def pack_fp4_rows(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x [..., K] -> uint8 [..., K/2 + K/block]: packed E2M1 codes then ue8m0 scales. Unpacking
    gives `fp4_qdq(x)` exactly."""
    packed, s = quant_fp4(x, block)
    return torch.cat([packed.view(torch.uint8), s.view(torch.uint8)], dim=-1)


def unpack_fp4_rows(b: torch.Tensor, dim: int, block: int = 32) -> torch.Tensor:
    """uint8 [..., fp4_row_nbytes] from `pack_fp4_rows` -> float32 [..., dim]."""
    return dequant_fp4(b[..., :dim // 2], b[..., dim // 2:], block)
