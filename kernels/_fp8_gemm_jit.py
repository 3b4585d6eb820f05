"""Triton kernels of the block-scaled FP8 linear (imported lazily by `fp8_gemm.py`).

Owns: per-row, per-128 activation quantization to e4m3 with power-of-two scales, and the GEMM
y = (xq * xs) @ (W * ws)^T with one fp32 promotion per 128-wide K block.
Does not own: argument checks, block-size choice, the references.
"""

import triton
import triton.language as tl

from ._jit import exp2_int, pow2_ceil_exponent, round_to_bf16_grid, round_to_e4m3_grid


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                     BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    # One program: BLOCK_M rows x one GROUP-wide block of K.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = pow2_ceil_exponent(tl.max(tl.abs(x), axis=1), 448.0)  # [BLOCK_M]
    scale = exp2_int(e)
    q = x * exp2_int(-e)[:, None]  # exact: a power-of-two multiply, no approximate division
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    q = round_to_e4m3_grid(q)
    tl.store(q_ptr + r64 * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + kb, scale, mask=rows < M)


@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                    FP8_DOT: tl.constexpr, DOT_F32: tl.constexpr, OUT_BF16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # c[M, N] = sum over 128-blocks kb of (a_kb @ b_kb^T) * as[:, kb] * bs[n // 128, kb].
    # BLOCK_K == 128 (one scale block per step), so each partial product is promoted once.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8_DOT:
            part = tl.dot(a, b)
        elif DOT_F32:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))  # e4m3 -> bf16 is exact
        a_s = tl.load(as_ptr + offs_m.to(tl.int64) * stride_asm + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptr + (offs_n // 128) * stride_bsn + kb, mask=n_mask, other=0.0)
        acc += part * a_s[:, None] * b_s[None, :]
    if OUT_BF16:
        acc = round_to_bf16_grid(acc)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
