"""Block-scaled FP8 linear: activation quantization + GEMM, dispatchers and torch references.

Owns: `act_quant` (x [M, K] -> e4m3 [M, K] + fp32 power-of-two scales [M, ceil(K/128)], one per
row and 128-wide K block), `fp8_gemm` (y = dequant(xq) @ dequant(W)^T with W e4m3 [N, K] and
fp32 128x128 block scales [ceil(N/128), ceil(K/128)]) and `fp8_linear` (both in sequence).
Does not own: weight quantization or ue8m0 -> fp32 scale conversion (see `quant.py` / the model).
"""

from __future__ import annotations

import torch

from ._common import FLOAT_ACT_DTYPES, cdiv, check_last_dim_contiguous, check_tensor, interpreting, pick_triton
from .quant import FP8_BLOCK, FP8_MAX, dequant_fp8_block, pow2_scale_ref

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- activation quantization -------------------------------------------------------------------

def act_quant(x: torch.Tensor, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 -> (xq [M, K] float8_e4m3fn, xs [M, ceil(K/128)] fp32)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_ACT_DTYPES)
    check_last_dim_contiguous("x", x)
    if pick_triton(use_triton, [x]):
        return act_quant_triton(x)
    return act_quant_ref(x)


def act_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    kb = cdiv(k, FP8_BLOCK)
    padded = torch.zeros(m, kb * FP8_BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    blocks = padded.view(m, kb, FP8_BLOCK)
    scale = pow2_scale_ref(blocks.abs().amax(-1), FP8_MAX)  # [M, kb]
    q = (blocks / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(m, kb * FP8_BLOCK)[:, :k].contiguous(), scale


def act_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from . import _fp8_gemm_jit as jit

    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, cdiv(k, FP8_BLOCK), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    block_m = 16
    jit.act_quant_kernel[(cdiv(m, block_m), cdiv(k, FP8_BLOCK))](
        x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), BLOCK_M=block_m, GROUP=FP8_BLOCK, num_warps=4,
    )
    return q, s


# ---- block-scaled GEMM -------------------------------------------------------------------------

def fp8_gemm(
    xq: torch.Tensor,  # [M, K] float8_e4m3fn
    xs: torch.Tensor,  # [M, ceil(K/128)] fp32
    w: torch.Tensor,  # [N, K] float8_e4m3fn
    ws: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    out_dtype: torch.dtype = torch.bfloat16,
    use_triton: bool | None = None,
) -> torch.Tensor:  # [M, N] out_dtype
    _check_gemm_args(xq, xs, w, ws, out_dtype)
    if pick_triton(use_triton, [xq, xs, w, ws]):
        return fp8_gemm_triton(xq, xs, w, ws, out_dtype)
    return fp8_gemm_ref(xq, xs, w, ws, out_dtype)


def fp8_gemm_ref(xq, xs, w, ws, out_dtype=torch.bfloat16) -> torch.Tensor:
    k = xq.shape[1]
    x = xq.float() * xs.repeat_interleave(FP8_BLOCK, dim=1)[:, :k]
    return (x @ dequant_fp8_block(w, ws).T).to(out_dtype)


def _fp8_dot_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm_triton(xq, xs, w, ws, out_dtype=torch.bfloat16) -> torch.Tensor:
    from . import _fp8_gemm_jit as jit

    m, k = xq.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    if interpreting():
        bm, bn, warps = 16, 32, 4
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 256 else 128
        bn, warps = 128, (8 if bm == 128 else 4)
    jit.fp8_gemm_kernel[(cdiv(m, bm), cdiv(n, bn))](
        xq, xs, w, ws, y, m, n, k,
        xq.stride(0), xs.stride(0), w.stride(0), ws.stride(0), y.stride(0),
        FP8_DOT=_fp8_dot_supported(xq.device) and not interpreting(), DOT_F32=interpreting(),
        OUT_BF16=out_dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK, num_warps=warps, num_stages=3,
    )
    return y


# ---- the linear layer: quantize the activation, then the GEMM ------------------------------------

def fp8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype | None = None,
               use_triton: bool | None = None) -> torch.Tensor:
    """x [M, K] -> x @ W^T [M, N] in out_dtype (default x's dtype), with x quantized like V4 does."""
    xq, xs = act_quant(x, use_triton=use_triton)
    return fp8_gemm(xq, xs, w, ws, out_dtype or x.dtype, use_triton=use_triton)


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype | None = None):
    xq, xs = act_quant_ref(x)
    return fp8_gemm_ref(xq, xs, w, ws, out_dtype or x.dtype)


def _check_gemm_args(xq, xs, w, ws, out_dtype) -> None:
    check_tensor("xq", xq, ndim=2, dtypes=(torch.float8_e4m3fn,))
    dev = xq.device
    m, k = xq.shape
    kb = cdiv(k, FP8_BLOCK)
    check_tensor("xs", xs, dtypes=(torch.float32,), shape=(m, kb), device=dev)
    check_tensor("w", w, ndim=2, dtypes=(torch.float8_e4m3fn,), device=dev)
    if w.shape[1] != k:
        raise ValueError(f"w must be [N, {k}] to match xq [M, {k}], got {tuple(w.shape)}")
    check_tensor("ws", ws, dtypes=(torch.float32,), shape=(cdiv(w.shape[0], FP8_BLOCK), kb), device=dev)
    for name, t in (("xq", xq), ("xs", xs), ("w", w), ("ws", ws)):
        check_last_dim_contiguous(name, t)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
