"""Triton kernels of the lightning indexer's streaming top-k (imported lazily by `indexer.py`).

Owns: scoring score[t, j] = sum_h w[t, h] * relu(q[t, h] . k[j]) block by block and keeping a
running top-KPAD in registers, so the [T, N] score matrix never exists.

How the running top-k works: each candidate is one int64 key, (order-preserving int32 image of
the fp32 score) << 32 | (2^31 - 1 - j), so sorting keys descending sorts by (-score, j): higher
score first, lower index first among equal scores (exactly the reference's tie rule). KPAD
scores are staged, sorted ascending, and merged into the running list (sorted descending) by an
elementwise max, which yields the top KPAD of the union (the bitonic top-k merge); one more sort
restores descending order. A staged block whose best key cannot enter the list is skipped.
Long contexts are split over several programs (grid dim 1); `indexer_merge_kernel` merges their
sorted lists the same way. Invisible or absent entries carry a sentinel key and come out as -1.
Does not own: argument checks, the split choice, the reference.
"""

import triton
import triton.language as tl

SENTINEL = tl.constexpr(-9223372036854775807)  # below every real key


@triton.jit
def _make_keys(score, j, valid):
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(score == 0.0, 0, bits)  # -0.0 and +0.0 are the same score
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64)
    return tl.where(valid, key, SENTINEL)


@triton.jit
def _merge_top(best_desc, other):
    # best_desc sorted descending; other any order; both [KPAD]. Returns top KPAD, descending.
    other_asc = tl.sort(other)
    return tl.sort(tl.maximum(best_desc, other_asc), descending=True)


@triton.jit
def _store_indices(idx_ptr, keys, K, KPAD: tl.constexpr):
    offs = tl.arange(0, KPAD)
    idx = 0x7FFFFFFF - (keys & 0x7FFFFFFF)  # the low word is 2^31 - 1 - j, bit 31 clear
    idx = tl.where(keys == SENTINEL, -1, idx).to(tl.int32)
    tl.store(idx_ptr + offs, idx, mask=offs < K)


@triton.jit
def indexer_topk_kernel(
    q_ptr, w_ptr, k_ptr, page_ptr, seq_ptr, pos_ptr, part_ptr, idx_ptr,
    HI, DI, P, RATIO, K, chunk,
    stride_qt, stride_qh, stride_wt, stride_kp, stride_kr, stride_pt, stride_part_t, stride_idx_t,
    WRITE_IDX: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KPAD: tl.constexpr,
):
    # Program (t, split): entries [split * chunk, min((split+1) * chunk, visible)) of token t.
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    seq = tl.load(seq_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int32)
    n_vis = (pos + 1) // RATIO  # entry j is visible iff (j + 1) * RATIO <= pos + 1
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_vis)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DI
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h[:, None] < HI) & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D] as stored
    w = tl.load(w_ptr + t * stride_wt + offs_h, mask=offs_h < HI, other=0.0).to(tl.float32)
    dot_dtype = q_ptr.dtype.element_ty
    lane = tl.arange(0, KPAD)
    best = tl.full((KPAD,), SENTINEL, dtype=tl.int64)
    for base in range(lo, hi, KPAD):
        stage = tl.full((KPAD,), SENTINEL, dtype=tl.int64)
        for sb in range(0, KPAD // BLOCK_N):  # a loop, not unrolled: one k tile live at a time
            j = base + sb * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = j < hi
            page = tl.load(page_ptr + seq * stride_pt + j // P, mask=valid, other=0).to(tl.int64)
            rows = page * stride_kp + (j % P).to(tl.int64) * stride_kr
            k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(dot_dtype)))
            score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)  # [BLOCK_N]
            keys = _make_keys(score, j, valid)
            # Put this sub-block's keys at lanes sb*BLOCK_N .. sb*BLOCK_N + BLOCK_N - 1 of the stage.
            tiled = tl.reshape(tl.broadcast_to(keys[None, :], (KPAD // BLOCK_N, BLOCK_N)), (KPAD,))
            stage = tl.where(lane // BLOCK_N == sb, tiled, stage)
        if tl.max(stage, axis=0) > tl.min(best, axis=0):
            best = _merge_top(best, stage)
    if WRITE_IDX:
        _store_indices(idx_ptr + t * stride_idx_t, best, K, KPAD)
    else:
        tl.store(part_ptr + t * stride_part_t + split * KPAD + lane, best)


@triton.jit
def indexer_merge_kernel(part_ptr, idx_ptr, K, num_splits, stride_part_t, stride_idx_t, KPAD: tl.constexpr):
    # Merge the per-split sorted lists of token t and write its top-K indices.
    t = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, KPAD)
    base = part_ptr + t * stride_part_t
    best = tl.load(base + lane)
    for sp in range(1, num_splits):
        best = _merge_top(best, tl.load(base + sp * KPAD + lane))
    _store_indices(idx_ptr + t * stride_idx_t, best, K, KPAD)
