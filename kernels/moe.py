"""Fused routed-expert MoE: `fused_moe` (dispatch), its Triton path, and the torch reference.

Owns: the computation y_t = sum_k w_tk * Expert_{e_tk}(x_t) over already-routed tokens, with
V4's clamped SwiGLU and bf16/fp32, FP8 (128x128 blocks) or FP4 (E2M1, groups of 32) expert
weights; and the slot sorting (`moe_align`) the grouped GEMMs run on.
Does not own: routing (scores, top-k, hash tables), the shared expert, or weight loading.

Triton path: token-slots are sorted by expert into BLOCK_M-padded blocks, a grouped GEMM computes
gate and up for every active expert with clamp/SwiGLU/routing weight fused (h is stored in x's
dtype, like the reference), a second grouped GEMM computes the down projection per slot in fp32,
and a last kernel sums each token's k slots in a fixed order, so results are deterministic (no
atomics). Quantized weights are dequantized inside the GEMMs. With bf16/fp16 activations the dots
run on tensor cores in that dtype (FP8/FP4 code values are exact there; the block scale multiplies
the fp32 partial product); fp32 activations use exact fp32 dots. Slot ids outside [0, E) (e.g. -1
for a masked slot) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import FLOAT_ACT_DTYPES, INDEX_DTYPES, cdiv, check_tensor, interpreting, next_pow2, pick_triton
from .quant import dequant_weight

_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.uint8)


def fused_moe(
    x: torch.Tensor,  # [T, D] bf16/fp16/fp32
    topk_ids: torch.Tensor,  # [T, k] int32/int64
    topk_weights: torch.Tensor,  # [T, k] fp32
    w1: torch.Tensor,  # [E, I, D] gate (or fp8 [E, I, D], or fp4 uint8 [E, I, D/2])
    w3: torch.Tensor,  # [E, I, D] up, same format as w1
    w2: torch.Tensor,  # [E, D, I] down (or fp8 [E, D, I], or fp4 uint8 [E, D, I/2])
    swiglu_limit: float | None = None,
    w1_scale: torch.Tensor | None = None,  # fp8: [E, ceil(I/128), ceil(D/128)]; fp4: [E, I, D/32]
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,  # fp8: [E, ceil(D/128), ceil(I/128)]; fp4: [E, D, I/32]
    use_triton: bool | None = None,
) -> torch.Tensor:  # [T, D] in x's dtype
    """Routed-expert MoE; Triton when the tensors are on CUDA (see `pick_triton`), else the reference."""
    _check_moe_args(x, topk_ids, topk_weights, w1, w3, w2, w1_scale, w3_scale, w2_scale)
    args = (x, topk_ids, topk_weights, w1, w3, w2, swiglu_limit, w1_scale, w3_scale, w2_scale)
    if pick_triton(use_triton, [x, topk_ids, topk_weights, w1, w3, w2]):
        return fused_moe_triton(*args)
    return fused_moe_ref(*args)


def fused_moe_ref(x, topk_ids, topk_weights, w1, w3, w2, swiglu_limit=None,
                  w1_scale=None, w3_scale=None, w2_scale=None) -> torch.Tensor:
    """Loop over experts; weights dequantized per expert to fp32; same shapes as `fused_moe`."""
    num_tokens, dim = x.shape
    y = torch.zeros(num_tokens, dim, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, j = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].float()  # [n, D]
        g = xe @ dequant_weight(w1[e], _at(w1_scale, e)).T  # [n, I] fp32
        u = xe @ dequant_weight(w3[e], _at(w3_scale, e)).T
        if swiglu_limit is not None:
            g = g.clamp(max=swiglu_limit)
            u = u.clamp(-swiglu_limit, swiglu_limit)
        h = F.silu(g) * u * topk_weights[tok, j].float()[:, None]
        h = h.to(x.dtype).float()  # the reference rounds h to the activation dtype before w2
        y.index_add_(0, tok, h @ dequant_weight(w2[e], _at(w2_scale, e)).T)
    return y.to(x.dtype)


def _at(scale: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if scale is None else scale[e]


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort token-slots by expert into blocks of `block_m` slots, each block owned by one expert.

    topk_ids [T, k] -> (sorted_slots [max_blocks * block_m] int32, block_expert [max_blocks] int32).
    Slot s = t * k + j. Each expert's slots are contiguous, in slot order, padded to a multiple of
    block_m with the sentinel T * k. Blocks past the last used one have expert -1. max_blocks =
    ceil(T*k / block_m) + min(E, T*k) bounds the padded count, so nothing here waits for the device
    (no .item(), bincount or boolean indexing).
    """
    flat = topk_ids.reshape(-1).long()
    num_slots = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid slots sort last
    # scatter_add, not bincount (which reads the max back to the host).
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    sorted_start = torch.cumsum(counts, 0) - counts  # where each expert begins in the unpadded order
    order = torch.argsort(key, stable=True)  # [T*k] slot ids, grouped by expert, slot order within
    sorted_key = key[order]
    e_of = sorted_key.clamp(max=num_experts - 1)
    dest = padded_start[e_of] + torch.arange(num_slots, device=dev) - sorted_start[e_of]
    max_blocks = cdiv(num_slots, block_m) + min(num_experts, num_slots)
    trash = max_blocks * block_m  # one extra cell takes the invalid slots (no boolean indexing)
    dest = torch.where(sorted_key < num_experts, dest, trash)
    sorted_slots = torch.full((trash + 1,), num_slots, dtype=torch.int32, device=dev)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    sorted_slots = sorted_slots[:trash]
    block_start = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_slots, block_expert


def _weight_format(w: torch.Tensor) -> int:
    return 1 if w.dtype == torch.float8_e4m3fn else 2 if w.dtype == torch.uint8 else 0


def _pick_blocks(num_slots: int, num_experts: int, fmt: int) -> dict:
    # BLOCK_K must divide the scale group along K: 32 for FP4, 128 for FP8.
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    per_expert = num_slots / max(num_experts, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32 if fmt == 2 else 64, num_warps=4)


def fused_moe_triton(x, topk_ids, topk_weights, w1, w3, w2, swiglu_limit=None,
                     w1_scale=None, w3_scale=None, w2_scale=None) -> torch.Tensor:
    """The Triton path of `fused_moe` (same arguments; no dispatch)."""
    from . import _moe_jit as jit

    num_tokens, dim = x.shape
    topk = topk_ids.shape[1]
    num_experts, inter = w1.shape[0], w1.shape[1]
    num_slots = num_tokens * topk
    y = torch.empty(num_tokens, dim, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y
    fmt = _weight_format(w1)
    cfg = _pick_blocks(num_slots, num_experts, fmt)
    bm, bn, bk, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    sorted_slots, block_expert = moe_align(topk_ids, num_experts, bm)
    num_blocks = block_expert.numel()
    route_w = topk_weights.float().contiguous()  # [T*k] fp32, indexed by slot
    dummy = route_w  # stands in for absent scale tensors; never read when FMT == 0
    s1, s3, s2 = (s if s is not None else dummy for s in (w1_scale, w3_scale, w2_scale))
    sst = s1.stride() if fmt else (0, 0, 0)
    s2t = s2.stride() if fmt else (0, 0, 0)
    dot_f32 = x.dtype == torch.float32 or interpreting()
    out_bf16 = x.dtype == torch.bfloat16

    h = torch.empty(num_blocks * bm, inter, dtype=x.dtype, device=x.device)  # [padded slots, I]
    jit.moe_gate_up_kernel[(num_blocks, cdiv(inter, bn))](
        x, h, w1, w3, s1, s3, sorted_slots, block_expert, route_w,
        num_slots, topk, dim, inter, float(swiglu_limit or 0.0),
        x.stride(0), w1.stride(0), w1.stride(1), sst[0], sst[1], sst[2], h.stride(0),
        FMT=fmt, HAS_LIMIT=swiglu_limit is not None, DOT_F32=dot_f32, OUT_BF16=out_bf16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    slot_out = torch.empty(num_slots, dim, dtype=torch.float32, device=x.device)  # [T*k, D] fp32
    jit.moe_down_kernel[(num_blocks, cdiv(dim, bn))](
        h, slot_out, w2, s2, sorted_slots, block_expert,
        num_slots, dim, inter,
        h.stride(0), w2.stride(0), w2.stride(1), s2t[0], s2t[1], s2t[2], slot_out.stride(0),
        FMT=fmt, DOT_F32=dot_f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    ids = topk_ids.contiguous()
    block_d = min(1024, next_pow2(dim))
    jit.moe_sum_kernel[(num_tokens, cdiv(dim, block_d))](
        slot_out, ids, y, dim, num_experts, TOPK=topk, OUT_BF16=out_bf16, BLOCK_D=block_d, num_warps=4,
    )
    return y


def _check_moe_args(x, topk_ids, topk_weights, w1, w3, w2, w1_scale, w3_scale, w2_scale) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_ACT_DTYPES)
    dev = x.device
    num_tokens, dim = x.shape
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    topk = topk_ids.shape[1]
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, topk), device=dev)
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows, x has {num_tokens} tokens")
    check_tensor("w1", w1, ndim=3, dtypes=_WEIGHT_DTYPES, device=dev)
    num_experts, inter = w1.shape[0], w1.shape[1]
    fmt = _weight_format(w1)
    pack = 2 if fmt == 2 else 1
    if w1.shape[2] * pack != dim:
        raise ValueError(f"w1 must be [E, I, {dim // pack}] for D={dim} in its format, got {tuple(w1.shape)}")
    check_tensor("w3", w3, dtypes=(w1.dtype,), shape=tuple(w1.shape), device=dev)
    check_tensor("w2", w2, dtypes=(w1.dtype,), shape=(num_experts, dim, inter // pack), device=dev)
    if fmt == 2 and (dim % 32 or inter % 32):
        raise ValueError(f"FP4 experts need D and I divisible by 32, got D={dim}, I={inter}")
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if fmt == 0:
        if any(s is not None for s in (w1_scale, w3_scale, w2_scale)):
            raise ValueError("scales were given for unquantized (float) expert weights")
        return
    for name, s, n, k in (("w1_scale", w1_scale, inter, dim), ("w3_scale", w3_scale, inter, dim),
                          ("w2_scale", w2_scale, dim, inter)):
        if s is None:
            raise ValueError(f"{name} is required for {w1.dtype} expert weights")
        want = (num_experts, cdiv(n, 128), cdiv(k, 128)) if fmt == 1 else (num_experts, n, k // 32)
        check_tensor(name, s, dtypes=(torch.float32,), shape=want, device=dev)
        if not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
