"""V4 sparse attention over the paged cache: decode and varlen-prefill dispatchers + references.

Owns: o = softmax-with-sink over each query's candidate keys (K = V, one KV head shared by all
H query heads), reading the engine's cache layout:
  window pool  window_kv [num_slots, W, Dh]: position p of sequence s at [window_slot[s], p % W]
  entry pool   comp_kv [num_pages, P, Dh]: compressed entry j of s at [page_table[s, j // P], j % P]
Candidates of the query at position p: window positions max(0, p-W+1) .. p, then either the CSA
top-k entries (topk_idx, -1 = none), or the HCA entries 0 .. n_comp-1, or nothing (window-only
layers: both None). The sink is a per-head logit with a zero value vector.
Does not own: RoPE (the caller de-rotates o), writing the pools, choosing candidates (indexer).

Prefill rows of one sequence must be consecutive in q and have consecutive positions; window
positions >= the chunk's first position are read from new_kv (the chunk's own kv, not yet in
the pool), earlier ones from the pool.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_ACT_DTYPES, INDEX_DTYPES, check_last_dim_contiguous, check_tensor, interpreting
from ._common import cdiv, next_pow2, pick_triton

_REF_CHUNK = 128  # query rows per step of the reference (bounds its gathered-key memory)


def sparse_attn_decode(
    q: torch.Tensor,  # [B, H, Dh] bf16/fp16/fp32, one query per sequence
    positions: torch.Tensor,  # [B] int, absolute position of each query (its kv is in the pool)
    window_kv: torch.Tensor,  # [num_slots, W, Dh]
    window_slot: torch.Tensor,  # [B] int
    comp_kv: torch.Tensor | None,  # [num_pages, P, Dh]
    page_table: torch.Tensor | None,  # [B, max_pages] int
    sink: torch.Tensor,  # [H] fp32
    scale: float,
    topk_idx: torch.Tensor | None = None,  # [B, K] int32, -1 = no entry (CSA)
    n_comp: torch.Tensor | None = None,  # [B] int32 (HCA)
    use_triton: bool | None = None,
) -> torch.Tensor:  # [B, H, Dh] in q's dtype
    b = q.shape[0] if q.dim() == 3 else -1
    seq_ids = torch.arange(max(b, 0), device=q.device, dtype=torch.int32)
    args = _Args(q, seq_ids, positions, None, None, window_kv, window_slot, comp_kv, page_table, sink,
                 scale, topk_idx, n_comp)
    args.check(num_seqs=b)
    if pick_triton(use_triton, args.tensors()):
        return _sparse_attn_triton(args)
    return _sparse_attn_ref(args)


def sparse_attn_prefill(
    q: torch.Tensor,  # [T, H, Dh], the rows of B sequences concatenated
    cu_seqlens: torch.Tensor,  # [B+1] int, row offsets of the sequences in q / new_kv
    positions: torch.Tensor,  # [T] int, absolute positions (consecutive within a sequence)
    new_kv: torch.Tensor,  # [T, Dh], this chunk's kv (already normalised/rotated like the pool)
    window_kv: torch.Tensor,  # [num_slots, W, Dh], holds positions before each chunk
    window_slot: torch.Tensor,  # [B] int
    comp_kv: torch.Tensor | None,  # [num_pages, P, Dh]
    page_table: torch.Tensor | None,  # [B, max_pages] int
    sink: torch.Tensor,  # [H] fp32
    scale: float,
    topk_idx: torch.Tensor | None = None,  # [T, K] int32, -1 = no entry (CSA)
    n_comp: torch.Tensor | None = None,  # [T] int32 (HCA)
    use_triton: bool | None = None,
) -> torch.Tensor:  # [T, H, Dh] in q's dtype
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    num_rows = q.shape[0] if q.dim() == 3 else 0
    rows = torch.arange(num_rows, device=q.device)
    seq_ids = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True).to(torch.int32)  # [T]
    args = _Args(q, seq_ids, positions, cu_seqlens, new_kv, window_kv, window_slot, comp_kv, page_table,
                 sink, scale, topk_idx, n_comp)
    args.check(num_seqs=cu_seqlens.shape[0] - 1)
    if pick_triton(use_triton, args.tensors()):
        return _sparse_attn_triton(args)
    return _sparse_attn_ref(args)


def sparse_attn_decode_ref(q, positions, window_kv, window_slot, comp_kv, page_table, sink, scale,
                           topk_idx=None, n_comp=None) -> torch.Tensor:
    return sparse_attn_decode(q, positions, window_kv, window_slot, comp_kv, page_table, sink, scale,
                              topk_idx, n_comp, use_triton=False)


def sparse_attn_prefill_ref(q, cu_seqlens, positions, new_kv, window_kv, window_slot, comp_kv, page_table,
                            sink, scale, topk_idx=None, n_comp=None) -> torch.Tensor:
    return sparse_attn_prefill(q, cu_seqlens, positions, new_kv, window_kv, window_slot, comp_kv, page_table,
                               sink, scale, topk_idx, n_comp, use_triton=False)


class _Args:
    """The varlen form both entry points reduce to (decode = one-row sequences, no new_kv)."""

    def __init__(self, q, seq_ids, positions, cu_seqlens, new_kv, window_kv, window_slot, comp_kv,
                 page_table, sink, scale, topk_idx, n_comp):
        self.q, self.seq_ids, self.positions, self.cu_seqlens, self.new_kv = q, seq_ids, positions, cu_seqlens, new_kv
        self.window_kv, self.window_slot, self.comp_kv, self.page_table = window_kv, window_slot, comp_kv, page_table
        self.sink, self.scale, self.topk_idx, self.n_comp = sink, float(scale), topk_idx, n_comp
        self.mode = 1 if topk_idx is not None else 2 if n_comp is not None else 0

    def tensors(self) -> list:
        return [self.q, self.positions, self.new_kv, self.window_kv, self.window_slot, self.comp_kv,
                self.page_table, self.sink, self.topk_idx, self.n_comp]

    def check(self, num_seqs: int) -> None:
        q = self.q
        check_tensor("q", q, ndim=3, dtypes=FLOAT_ACT_DTYPES)
        dev = q.device
        rows, heads, dh = q.shape
        kv_dtypes = FLOAT_ACT_DTYPES
        check_tensor("positions", self.positions, dtypes=INDEX_DTYPES, shape=(rows,), device=dev)
        check_tensor("window_kv", self.window_kv, ndim=3, dtypes=kv_dtypes, device=dev)
        if self.window_kv.shape[2] != dh:
            raise ValueError(f"window_kv must be [num_slots, W, {dh}], got {tuple(self.window_kv.shape)}")
        check_tensor("window_slot", self.window_slot, dtypes=INDEX_DTYPES, shape=(num_seqs,), device=dev)
        check_tensor("sink", self.sink, dtypes=(torch.float32,), shape=(heads,), device=dev)
        if self.new_kv is not None:
            check_tensor("new_kv", self.new_kv, dtypes=(self.window_kv.dtype,), shape=(rows, dh), device=dev)
            check_last_dim_contiguous("new_kv", self.new_kv)
        if self.topk_idx is not None and self.n_comp is not None:
            raise ValueError("pass topk_idx (CSA) or n_comp (HCA), not both")
        if self.mode:
            if self.comp_kv is None or self.page_table is None:
                raise ValueError("comp_kv and page_table are required with topk_idx or n_comp")
            check_tensor("comp_kv", self.comp_kv, ndim=3, dtypes=kv_dtypes, device=dev)
            if self.comp_kv.shape[2] != dh:
                raise ValueError(f"comp_kv must be [num_pages, P, {dh}], got {tuple(self.comp_kv.shape)}")
            check_tensor("page_table", self.page_table, ndim=2, dtypes=INDEX_DTYPES, device=dev)
            if self.page_table.shape[0] != num_seqs:
                raise ValueError(f"page_table must have {num_seqs} rows (one per sequence), "
                                 f"got {self.page_table.shape[0]}")
            check_last_dim_contiguous("comp_kv", self.comp_kv)
            check_last_dim_contiguous("page_table", self.page_table)
        if self.topk_idx is not None:
            check_tensor("topk_idx", self.topk_idx, ndim=2, dtypes=INDEX_DTYPES, device=dev)
            if self.topk_idx.shape[0] != rows:
                raise ValueError(f"topk_idx must have {rows} rows, got {self.topk_idx.shape[0]}")
            check_last_dim_contiguous("topk_idx", self.topk_idx)
        if self.n_comp is not None:
            check_tensor("n_comp", self.n_comp, dtypes=INDEX_DTYPES, shape=(rows,), device=dev)
        check_last_dim_contiguous("q", q)
        check_last_dim_contiguous("window_kv", self.window_kv)


def _sparse_attn_ref(a: _Args) -> torch.Tensor:
    """Gather each query's candidate keys and run a dense softmax with the sink column appended."""
    q = a.q
    rows, heads, dh = q.shape
    out = torch.empty_like(q)
    win = a.window_kv.shape[1]
    seq_all = a.seq_ids.long()
    pos_all = a.positions.long()
    n_max = int(a.n_comp.max()) if a.mode == 2 and rows else 0
    for r0 in range(0, rows, _REF_CHUNK):
        r = slice(r0, min(rows, r0 + _REF_CHUNK))
        seq, pos = seq_all[r], pos_all[r]
        kpos = pos[:, None] - win + 1 + torch.arange(win, device=q.device)  # [R, W], oldest first
        valid_w = kpos >= 0
        kpos_c = kpos.clamp(min=0)
        keys_w = a.window_kv[a.window_slot.long()[seq][:, None], kpos_c % win]  # [R, W, Dh]
        if a.new_kv is not None:
            start = a.cu_seqlens.long()[seq]  # first row of each query's sequence
            first = pos_all[start]
            from_new = kpos_c >= first[:, None]
            new_rows = (start[:, None] + kpos_c - first[:, None]).clamp(0, rows - 1)
            keys_w = torch.where(from_new[..., None], a.new_kv[new_rows], keys_w)
        keys, valid = [keys_w.float()], [valid_w]
        if a.mode:
            if a.mode == 1:
                idx = a.topk_idx[r].long()
                valid_c = idx >= 0
            else:
                idx = torch.arange(n_max, device=q.device).expand(seq.numel(), n_max)
                valid_c = idx < a.n_comp[r].long()[:, None]
            idx = idx.clamp(min=0)
            page_size = a.comp_kv.shape[1]
            page = a.page_table.long()[seq[:, None], idx // page_size]
            page = torch.where(valid_c, page, 0)
            keys.append(a.comp_kv[page, idx % page_size].float())  # [R, C, Dh]
            valid.append(valid_c)
        k = torch.cat(keys, 1)  # [R, C, Dh] fp32
        ok = torch.cat(valid, 1)  # [R, C]
        s = torch.einsum("rhd,rcd->rhc", q[r].float(), k) * a.scale
        s = s.masked_fill(~ok[:, None, :], float("-inf"))
        sink_col = a.sink.float()[None, :, None].expand(s.shape[0], heads, 1)
        p = torch.softmax(torch.cat([s, sink_col], -1), -1)[..., :-1]
        out[r] = torch.einsum("rhc,rcd->rhd", p, k).to(q.dtype)
    return out


def _blocks(heads: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps). The [BLOCK_H, Dh] fp32 accumulator and the [BLOCK_N, Dh]
    key tile live in registers; for Dh = 512 on sm_90, 32 heads x 32 keys x 8 warps compiles to
    about 200 registers per thread without spills (ptxas), larger tiles spill."""
    if interpreting():
        return 16, 16, 4
    block_h = 16 if heads <= 16 else 32
    return (block_h, 32, 8) if block_d >= 256 else (block_h, 64, 4)


def _sparse_attn_triton(a: _Args) -> torch.Tensor:
    from . import _sparse_attn_jit as jit

    q = a.q
    rows, heads, dh = q.shape
    out = torch.empty_like(q)
    if rows == 0:
        return out
    block_d = next_pow2(dh, 16)
    block_h, block_n, warps = _blocks(heads, block_d)
    dummy = a.sink
    comp = a.comp_kv if a.mode else a.window_kv
    page = a.page_table if a.mode else a.window_slot
    topk = a.topk_idx if a.mode == 1 else dummy
    ncomp = a.n_comp if a.mode == 2 else dummy
    new = a.new_kv if a.new_kv is not None else q
    cu = a.cu_seqlens if a.cu_seqlens is not None else a.seq_ids
    page_stride = page.stride(0) if page.dim() == 2 else 0
    jit.sparse_attn_kernel[(rows, cdiv(heads, block_h))](
        q, out, a.seq_ids, a.positions, cu, new,
        a.window_kv, a.window_slot, comp, page, topk, ncomp, a.sink,
        heads, dh, a.window_kv.shape[1], comp.shape[1], a.topk_idx.shape[1] if a.mode == 1 else 0, a.scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), new.stride(0),
        a.window_kv.stride(0), a.window_kv.stride(1), comp.stride(0), comp.stride(1), page_stride,
        topk.stride(0) if a.mode == 1 else 0,
        MODE=a.mode, HAS_NEW=a.new_kv is not None, DOT_F32=q.dtype == torch.float32 or interpreting(),
        OUT_BF16=q.dtype == torch.bfloat16,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out
