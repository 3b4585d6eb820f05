"""Lightning indexer top-k over paged indexer keys: dispatcher, Triton wrapper, torch reference.

Owns: idx[t] = the top-k entries j of score[t, j] = sum_h w[t, h] * relu(q[t, h] . kI[j]) among
the entries visible to token t ((j + 1) * ratio <= pos_t + 1), ordered by (-score, j): highest
score first, ties broken by the lower index; -1 where fewer than k entries are visible.
Keys live in the paged pool index_k [num_pages, P, Di]: entry j of sequence s at
[page_table[s, j // P], j % P] (the same paging as the compressed-entry pool), and every visible
entry must already be written there.
Does not own: the indexer's q/w projections, RoPE, Hadamard or FP4 simulation, the key compressor.

The Triton path streams over the entries with a running top-k (see `_indexer_jit`) and never
materializes the [T, N] score matrix; the reference does, per sequence, as the oracle.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_ACT_DTYPES, INDEX_DTYPES, cdiv, check_last_dim_contiguous, check_tensor, interpreting
from ._common import next_pow2, pick_triton

_REF_CHUNK = 16  # tokens per step of the reference (bounds its [chunk, Hi, N] product)


def indexer_topk(
    q: torch.Tensor,  # [T, Hi, Di] fp32/bf16
    weights: torch.Tensor,  # [T, Hi] fp32 (head weights, scale already folded in)
    index_k: torch.Tensor,  # [num_pages, P, Di]
    page_table: torch.Tensor,  # [B, max_pages] int
    positions: torch.Tensor,  # [T] int, absolute position of each token
    topk: int,
    cu_seqlens: torch.Tensor | None = None,  # [B+1] int; None: token t is sequence t (decode)
    ratio: int = 4,
    use_triton: bool | None = None,
) -> torch.Tensor:  # [T, topk] int32, -1 padded
    seq_ids = _check_and_seq_ids(q, weights, index_k, page_table, positions, topk, cu_seqlens, ratio)
    if pick_triton(use_triton, [q, weights, index_k, page_table, positions]):
        return indexer_topk_triton(q, weights, index_k, page_table, positions, topk, seq_ids, ratio)
    return indexer_topk_ref(q, weights, index_k, page_table, positions, topk, cu_seqlens, ratio)


def indexer_topk_ref(q, weights, index_k, page_table, positions, topk, cu_seqlens=None, ratio=4) -> torch.Tensor:
    num_tokens = q.shape[0]
    dev = q.device
    out = torch.full((num_tokens, topk), -1, dtype=torch.int32, device=dev)
    seq_ids = _seq_ids(num_tokens, cu_seqlens, dev)
    page_size = index_k.shape[1]
    for s in torch.unique(seq_ids).tolist():
        rows = torch.nonzero(seq_ids == s).flatten()
        pos = positions.long()[rows]
        n_vis = (pos + 1) // ratio  # [R]
        n_max = int(n_vis.max())
        if n_max == 0:
            continue
        j = torch.arange(n_max, device=dev)
        keys = index_k[page_table.long()[s, j // page_size], j % page_size].float()  # [N, Di]
        for c0 in range(0, rows.numel(), _REF_CHUNK):
            r = rows[c0:c0 + _REF_CHUNK]
            dots = torch.einsum("thd,nd->thn", q[r].float(), keys)  # [R, Hi, N]
            score = (dots.relu() * weights[r].float()[:, :, None]).sum(1) + 0.0  # +0.0: no -0.0
            score = score.masked_fill(j[None, :] >= n_vis[c0:c0 + _REF_CHUNK, None], float("-inf"))
            # Stable descending sort = order by (-score, index).
            vals, order = torch.sort(score, dim=1, descending=True, stable=True)
            k = min(topk, n_max)
            picked = torch.where(torch.isinf(vals[:, :k]), -1, order[:, :k])
            out[r, :k] = picked.to(torch.int32)
    return out


def indexer_topk_triton(q, weights, index_k, page_table, positions, topk, seq_ids, ratio=4,
                        num_splits: int | None = None) -> torch.Tensor:
    """Triton path; `num_splits` (programs per token over the entries) defaults to a device heuristic."""
    from . import _indexer_jit as jit

    num_tokens, heads, dim = q.shape
    out = torch.empty(num_tokens, topk, dtype=torch.int32, device=q.device)
    if num_tokens == 0 or topk == 0:
        return out.fill_(-1)
    block_n = 16 if interpreting() else 64
    kpad = next_pow2(topk, block_n)
    capacity = page_table.shape[1] * index_k.shape[1]  # most entries any sequence can have
    if num_splits is None:
        num_splits = _default_splits(num_tokens, capacity, kpad, q.device)
    num_splits = max(1, min(num_splits, cdiv(capacity, kpad)))
    chunk = cdiv(cdiv(capacity, num_splits), kpad) * kpad
    weights = weights.contiguous()
    part = torch.empty(num_tokens, num_splits, kpad, dtype=torch.int64, device=q.device) if num_splits > 1 else out
    jit.indexer_topk_kernel[(num_tokens, num_splits)](
        q, weights, index_k, page_table, seq_ids, positions, part, out,
        heads, dim, index_k.shape[1], ratio, topk, chunk,
        q.stride(0), q.stride(1), weights.stride(0), index_k.stride(0), index_k.stride(1), page_table.stride(0),
        part.stride(0), out.stride(0),
        WRITE_IDX=num_splits == 1, DOT_F32=q.dtype == torch.float32 or interpreting(),
        BLOCK_H=next_pow2(heads, 16), BLOCK_D=next_pow2(dim, 16), BLOCK_N=block_n, KPAD=kpad,
        num_warps=4 if interpreting() else 8,
    )
    if num_splits > 1:
        jit.indexer_merge_kernel[(num_tokens,)](
            part, out, topk, num_splits, part.stride(0), out.stride(0), KPAD=kpad, num_warps=4,
        )
    return out


def _default_splits(num_tokens: int, capacity: int, kpad: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    # Split only when the tokens alone cannot fill the GPU, and keep >= 4 blocks of kpad per split.
    return max(1, min(programs // max(num_tokens, 1), capacity // (4 * kpad)))


def _seq_ids(num_tokens: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    rows = torch.arange(num_tokens, device=device)
    if cu_seqlens is None:
        return rows.to(torch.int32)
    return torch.searchsorted(cu_seqlens[1:].long(), rows, right=True).to(torch.int32)  # [T]


def _check_and_seq_ids(q, weights, index_k, page_table, positions, topk, cu_seqlens, ratio) -> torch.Tensor:
    check_tensor("q", q, ndim=3, dtypes=FLOAT_ACT_DTYPES)
    dev = q.device
    num_tokens, heads, dim = q.shape
    check_tensor("weights", weights, dtypes=(torch.float32,), shape=(num_tokens, heads), device=dev)
    check_tensor("index_k", index_k, ndim=3, dtypes=FLOAT_ACT_DTYPES, device=dev)
    if index_k.shape[2] != dim:
        raise ValueError(f"index_k must be [num_pages, P, {dim}], got {tuple(index_k.shape)}")
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, shape=(num_tokens,), device=dev)
    num_seqs = num_tokens
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
        num_seqs = cu_seqlens.shape[0] - 1
    if page_table.shape[0] != num_seqs:
        raise ValueError(f"page_table must have one row per sequence ({num_seqs}), got {page_table.shape[0]}")
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    for name, t in (("q", q), ("index_k", index_k), ("page_table", page_table)):
        check_last_dim_contiguous(name, t)
    return _seq_ids(num_tokens, cu_seqlens, dev)
