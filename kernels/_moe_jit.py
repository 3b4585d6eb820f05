"""Triton kernels of the fused MoE (imported lazily by `moe.py`, which owns the API).

Owns: the grouped gate+up GEMM with clamp/SwiGLU/routing weight fused, the grouped down GEMM,
the per-token sum of the k expert outputs, and the in-kernel weight dequantization.
Does not own: slot sorting (`moe.moe_align`, plain torch), argument checks, the reference.

Weight formats (FMT): 0 = plain float [E, N, K]; 1 = FP8 e4m3 [E, N, K] with fp32 128x128
block scales [E, ceil(N/128), ceil(K/128)]; 2 = FP4 E2M1 packed uint8 [E, N, K/2] (low nibble =
even k) with fp32 scales [E, N, K/32]. Tiles are dequantized in the kernel right after loading
(FP4 codes decoded from their bit fields, see `_jit.e2m1_decode`; scales applied per tile, see
`_dot_w_tile`), never ahead of it.
"""

import triton
import triton.language as tl

from ._jit import dot_acc, e2m1_decode, round_to_bf16_grid


@triton.jit
def _dot_w_tile(acc, a, w_ptr, s_ptr, w_base, s_base, offs_n, k0, N, K, stride_wn, stride_sn, stride_sk,
                FMT: tl.constexpr, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    # acc [BM, BN] + a [BM, BK] @ dequant(W[e, offs_n, k0 : k0+BK])^T, all fp32 values.
    # A quantized tile's scale is constant along its K range (BLOCK_K divides the scale group:
    # 32 for FP4, 128 for FP8), so the codes' values (exact in bf16) go through the dot and the
    # scale multiplies the partial product per output column: one fp32 multiply, no gather.
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    mask = (offs_k[:, None] < K) & n_ok[None, :]
    row = offs_n[None, :].to(tl.int64) * stride_wn
    if FMT == 2:
        packed = tl.load(w_ptr + w_base + row + offs_k[:, None] // 2, mask=mask, other=0).to(tl.int32)
        vals = e2m1_decode((packed >> ((offs_k[:, None] & 1) * 4)) & 0xF)
        scale = tl.load(s_ptr + s_base + offs_n * stride_sn + (k0 // 32) * stride_sk, mask=n_ok, other=0.0)
    else:
        vals = tl.load(w_ptr + w_base + row + offs_k[:, None], mask=mask, other=0.0).to(tl.float32)
        if FMT == 1:
            scale = tl.load(s_ptr + s_base + (offs_n // 128) * stride_sn + (k0 // 128) * stride_sk,
                            mask=n_ok, other=0.0)
    if FMT == 0:
        acc = dot_acc(acc, a, vals, DOT_F32, DOT_DTYPE)
    else:
        acc += dot_acc(tl.zeros_like(acc), a, vals, DOT_F32, DOT_DTYPE) * scale[None, :]
    return acc


@triton.jit
def moe_gate_up_kernel(
    x_ptr, h_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr,
    sorted_slot_ptr, block_expert_ptr, route_w_ptr,
    num_slots, TOPK, D, I, limit,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_hm,
    FMT: tl.constexpr, HAS_LIMIT: tl.constexpr, DOT_F32: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_M sorted token-slots of one expert x BLOCK_N intermediate channels.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slot_ptr + rows)
    valid = slot < num_slots
    tok = (slot // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = e * stride_we
    s_base = e * stride_se
    dot_dtype = x_ptr.dtype.element_ty
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < D), other=0.0).to(tl.float32)
        g = _dot_w_tile(g, a, w1_ptr, s1_ptr, w_base, s_base, offs_n, k0, I, D, stride_wn, stride_sn, stride_sk,
                        FMT, DOT_F32, dot_dtype, BLOCK_K)
        u = _dot_w_tile(u, a, w3_ptr, s3_ptr, w_base, s_base, offs_n, k0, I, D, stride_wn, stride_sn, stride_sk,
                        FMT, DOT_F32, dot_dtype, BLOCK_K)
    if HAS_LIMIT:
        # V4's SwiGLU clamp is asymmetric: the gate only from above, the up projection both ways.
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    route_w = tl.load(route_w_ptr + slot, mask=valid, other=0.0)
    h = g * tl.sigmoid(g) * u * route_w[:, None]
    if OUT_BF16:
        h = round_to_bf16_grid(h)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < I))


@triton.jit
def moe_down_kernel(
    h_ptr, out_ptr, w2_ptr, s2_ptr, sorted_slot_ptr, block_expert_ptr,
    num_slots, D, I,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_om,
    FMT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_M sorted token-slots of one expert x BLOCK_N output channels; writes the
    # fp32 per-slot result (the per-token sum happens in moe_sum_kernel, in a fixed order).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slot_ptr + rows)
    valid = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = e * stride_we
    s_base = e * stride_se
    dot_dtype = h_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < I), other=0.0).to(tl.float32)
        acc = _dot_w_tile(acc, a, w2_ptr, s2_ptr, w_base, s_base, offs_n, k0, D, I, stride_wn, stride_sn,
                          stride_sk, FMT, DOT_F32, dot_dtype, BLOCK_K)
    tl.store(out_ptr + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc,
             mask=valid[:, None] & (offs_n[None, :] < D))


@triton.jit
def moe_sum_kernel(slot_out_ptr, ids_ptr, y_ptr, D, E, TOPK: tl.constexpr, OUT_BF16: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    # y[t] = sum over j of slot_out[t*TOPK + j] for the slots routed to a real expert.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        eid = tl.load(ids_ptr + t * TOPK + j)
        if (eid >= 0) & (eid < E):
            acc += tl.load(slot_out_ptr + (t * TOPK + j) * D + offs, mask=offs < D, other=0.0)
    if OUT_BF16:
        acc = round_to_bf16_grid(acc)
    tl.store(y_ptr + t * D + offs, acc.to(y_ptr.dtype.element_ty), mask=offs < D)
