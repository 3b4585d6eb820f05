"""Triton kernel of V4's sparse attention over {window} U {compressed candidates} (lazy import).

Owns: one program per (query row, group of BLOCK_H heads). The heads share V4's single KV head,
so each gathered key block [BLOCK_N, Dh] is loaded once and used by all BLOCK_H heads, for both
q.k and p.v (K = V). Online softmax in base 2, started from the sink logit (m = sink, l = 1):
the sink joins the denominator with a zero value vector and needs no extra step at the end.
Does not own: argument checks, the row -> sequence mapping, the reference.

Candidate order: window positions first (oldest first), then compressed entries; the softmax is
order independent up to fp32 rounding.
"""

import triton
import triton.language as tl

from ._jit import round_to_bf16_grid


@triton.jit
def _attend_block(q, k, valid, acc, m_i, l_i, qk_scale, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # q [BH, BD], k [BN, BD] as loaded (any float dtype); valid [BN]; scores in log2 units.
    if DOT_F32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        k = k.to(DOT_DTYPE)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k))
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_F32:
        acc = tl.dot(p, k, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(DOT_DTYPE), k, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def sparse_attn_kernel(
    q_ptr, o_ptr, seq_ptr, pos_ptr, cu_ptr, new_ptr,
    win_ptr, win_slot_ptr, comp_ptr, page_ptr, topk_ptr, ncomp_ptr, sink_ptr,
    H, Dh, W, P, TOPK, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_new,
    stride_ws, stride_wp, stride_cp, stride_cr, stride_pt, stride_kt,
    MODE: tl.constexpr, HAS_NEW: tl.constexpr, DOT_F32: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # MODE 0: window only; 1: window + top-k compressed entries (CSA); 2: window + the first
    # n_comp compressed entries (HCA). HAS_NEW: window positions >= the chunk's first position
    # come from new_kv (prefill); otherwise every window key is read from the pool (decode).
    LOG2E: tl.constexpr = 1.4426950408889634
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < H
    d_mask = offs_d < Dh
    seq = tl.load(seq_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int32)
    dot_dtype = q_ptr.dtype.element_ty

    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D] as stored
    m_i = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * LOG2E
    l_i = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    scale2 = qk_scale * LOG2E

    # Window: positions max(0, pos-W+1) .. pos.
    n_win = tl.minimum(pos + 1, W)
    win_start = pos - n_win + 1
    win_base = win_ptr + tl.load(win_slot_ptr + seq).to(tl.int64) * stride_ws
    if HAS_NEW:
        new_row0 = tl.load(cu_ptr + seq).to(tl.int64)
        first_pos = tl.load(pos_ptr + new_row0).to(tl.int32)
    for i0 in range(0, n_win, BLOCK_N):
        kpos = win_start + i0 + tl.arange(0, BLOCK_N)  # int32 absolute positions
        valid = kpos <= pos
        lmask = valid[:, None] & d_mask[None, :]
        if HAS_NEW:
            from_new = kpos >= first_pos
            # One gather from two sources: pick each row's pointer (new_kv and the pool share a dtype).
            row_new = new_ptr + (new_row0 + (kpos - first_pos))[:, None] * stride_new
            row_old = win_base + (kpos % W).to(tl.int64)[:, None] * stride_wp
            k = tl.load(tl.where(from_new[:, None], row_new, row_old) + offs_d[None, :], mask=lmask, other=0.0)
        else:
            k = tl.load(win_base + (kpos % W).to(tl.int64)[:, None] * stride_wp + offs_d[None, :],
                        mask=lmask, other=0.0)
        acc, m_i, l_i = _attend_block(q, k, valid, acc, m_i, l_i, scale2, DOT_F32, dot_dtype)

    # Compressed entries, gathered through the sequence's page table.
    if MODE != 0:
        if MODE == 1:
            n_cand = TOPK
        else:
            n_cand = tl.load(ncomp_ptr + t)
        for c0 in range(0, n_cand, BLOCK_N):
            offs_c = c0 + tl.arange(0, BLOCK_N)
            if MODE == 1:
                idx = tl.load(topk_ptr + t * stride_kt + offs_c, mask=offs_c < TOPK, other=-1).to(tl.int64)
                valid = idx >= 0
            else:
                idx = offs_c.to(tl.int64)
                valid = offs_c < n_cand
            page = tl.load(page_ptr + seq * stride_pt + idx // P, mask=valid, other=0).to(tl.int64)
            rows = page * stride_cp + (idx % P) * stride_cr
            k = tl.load(comp_ptr + rows[:, None] + offs_d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0)
            acc, m_i, l_i = _attend_block(q, k, valid, acc, m_i, l_i, scale2, DOT_F32, dot_dtype)

    out = acc / l_i[:, None]
    if OUT_BF16:
        out = round_to_bf16_grid(out)
    tl.store(o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
