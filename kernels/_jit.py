"""Triton device helpers shared by several kernels (rounding and number-format decoding).

Owns: exact rounding of fp32 values onto the bf16 and e4m3 grids, the E2M1 nibble decode, the
power-of-two scale rule and the dot-precision switch.
Does not own: kernels or wrappers. Imported only lazily, from the `_*_jit` modules.

Why explicit rounding: Triton's CPU interpreter truncates fp32->bf16 and mis-rounds fp32->e4m3
when rounding carries into the exponent. Rounding to the target grid first (nearest-even, in
fp32/int32 arithmetic) makes the final `.to()` exact on every backend, so the interpreter and the
GPU round these casts exactly like torch. On the GPU the extra integer ops are a handful per element.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    # fp32 -> nearest-even bf16 value, still held in fp32 (finite inputs).
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & -65536  # 0xFFFF0000 as a signed int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3_grid(x):
    # fp32 with |x| <= 448 -> nearest-even float8 e4m3fn value, still held in fp32.
    # e4m3 keeps 3 mantissa bits for exponents >= -6 and a fixed step of 2^-9 below that, so the
    # step is 2^(max(e, -6) - 3). Adding and subtracting 1.5 * 2^(step_exp + 23) rounds to a
    # multiple of the step with the hardware's nearest-even rule.
    # Rounds |x| and puts the sign bit back (so tiny negatives give -0.0, like a hardware convert;
    # Triton's unary minus is 0 - r, which would give +0.0).
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    step_exp = tl.maximum(e, -6) - 3
    magic = ((step_exp + 23 + 127) << 23 | 0x400000).to(tl.float32, bitcast=True)
    r = ((ax + magic) - magic).to(tl.int32, bitcast=True)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31
    return (r | sign).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_decode(codes):
    # int32 nibbles 0..15 -> fp32 E2M1 values (0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 = sign), computed
    # from the bit fields instead of a table load: exponent e = bits 1-2, mantissa m = bit 0;
    # e == 0 is subnormal (m * 0.5), otherwise (1 + m/2) * 2^(e-1) = (2 + m) * 2^e / 4.
    e = (codes >> 1) & 3
    m = (codes & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (2.0 + m) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((codes & 8) != 0, -mag, mag)


@triton.jit
def pow2_ceil_exponent(amax, max_code):
    # ceil(log2(max(amax, 1e-4) / max_code)) as int32, exact: from the bits of the correctly
    # rounded quotient (div_rn, not the GPU's approximate '/'), no log2 rounding.
    r = tl.div_rn(tl.maximum(amax, 1e-4), max_code)
    bits = r.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def exp2_int(e):
    # 2^e as fp32 for int32 e in [-126, 127], built from the exponent field (exact).
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def dot_acc(acc, a, b, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # a [M, K], b [K, N] fp32 values -> acc + a @ b (fp32). Tensor-core operands in DOT_DTYPE
    # (bf16/fp16; exact for values already on that grid) unless DOT_F32 (ieee fp32, no tf32).
    if DOT_F32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc
