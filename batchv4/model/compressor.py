"""V4's token compressors (CSA with overlapping windows, HCA without) and the lightning indexer.

Owns: the pooling math in two forms — the obvious whole-sequence softmax (the oracle) and the
streaming form over running accumulators (max, sum, weighted sum per channel) that the packed
forward uses to resume from a cache slot at any position — and the indexer's scores and top-k.
A compressor overlaps (CSA) because its layer is a CSA layer, at whatever ratio the config gives.
Does not own: where entries are stored (pages belong to the engine; the attention module reads and
writes them), the attention itself, or the per-block accumulators and their merge
(`batchv4.kernels.compressor`: `block_stats` is a Triton kernel beside its torch reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchv4.config import ModelConfig
from batchv4.kernels.compressor import block_stats, empty_stats, merge_stats
from batchv4.model import quant
from batchv4.model.layers import Linear, RMSNorm, apply_rope


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry of width `dim`.

    With `overlap` (the CSA kind, at any ratio) it projects to 2*dim channels: the first half
    pools into the NEXT entry, the second half into the current one, so entry j covers blocks j-1
    and j. `use_kernels` computes the per-block accumulators of the streaming form with the Triton
    kernel (`batchv4.kernels.compressor.block_stats`).
    """

    def __init__(self, cfg: ModelConfig, ratio: int, dim: int, overlap: bool, use_kernels: bool = False) -> None:
        super().__init__()
        self.ratio = ratio
        self.dim = dim
        self.overlap = overlap
        self.use_kernels = use_kernels
        c = 2 if self.overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, c * dim))
        self.wkv = Linear(cfg.dim, c * dim)
        self.wgate = Linear(cfg.dim, c * dim)
        self.norm = RMSNorm(dim, cfg.norm_eps)

    @property
    def n_acc(self) -> int:
        return 2 if self.overlap else 1

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> values a, gate logits g [T, c*dim] fp32 (ape added to the gates only)."""
        xf = x.float()
        a = F.linear(xf, self.wkv.dense_weight(torch.float32))
        g = F.linear(xf, self.wgate.dense_weight(torch.float32)) + self.ape.float()[positions % self.ratio]
        return a, g

    # ---- the oracle: a whole sequence from position 0 ---------------------------------------------
    def pool_reference(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """a, g [S, c*dim] of positions 0..S-1 -> raw entries [S // ratio, dim] fp32."""
        m, d = self.ratio, self.dim
        n = a.shape[0] // m
        if n == 0:
            return a.new_zeros(0, d)
        a, g = a[: n * m].view(n, m, -1), g[: n * m].view(n, m, -1)
        if not self.overlap:
            return (a * torch.softmax(g, dim=1)).sum(dim=1)
        kv = a.new_zeros(n, 2 * m, d)
        gate = g.new_full((n, 2 * m, d), float("-inf"))
        kv[:, m:], gate[:, m:] = a[..., d:], g[..., d:]
        kv[1:, :m], gate[1:, :m] = a[:-1, :, :d], g[:-1, :, :d]
        return (kv * torch.softmax(gate, dim=1)).sum(dim=1)

    # ---- the streaming form -----------------------------------------------------------------------
    def pool_streaming(self, a: torch.Tensor, g: torch.Tensor, p0: int,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens at positions p0..p0+L-1 of one sequence.

        a, g [L, c*dim] fp32; state [c, 3, dim] fp32 accumulators of entries p0//m .. p0//m+c-1.
        Returns (raw entries [E, dim] completed by these tokens: indices p0//m .. (p0+L)//m - 1,
        new state [c, 3, dim] for entries (p0+L)//m ..).

        Per-block statistics of the chunk on the block grid (`block_stats`: the Triton kernel
        with `use_kernels`, else its torch reference) are merged with the carried state and, for
        CSA, with the previous block's first-half statistics.
        """
        m, d, c = self.ratio, self.dim, self.n_acc
        L = a.shape[0]
        base = p0 // m
        off = p0 - base * m
        blocks = block_stats(a, g, m, off, use_triton=self.use_kernels)          # [nblk, 3, c*d]
        if self.overlap:
            cur, nxt = blocks[..., d:], blocks[..., :d]     # B half -> entry b, A half -> entry b+1
            # entry base+i gets the B half of block i and the A half of block i-1
            shifted = torch.cat([empty_stats(1, d, a.device), nxt], dim=0)   # [nblk+1, 3, d]
            stats = merge_stats(torch.cat([cur, empty_stats(1, d, a.device)], dim=0), shifted)
        else:
            stats = torch.cat([blocks, empty_stats(1, d, a.device)], dim=0)
        stats[:c] = merge_stats(stats[:c], state)
        n_emit = (p0 + L) // m - base
        entries = stats[:n_emit, 2] / stats[:n_emit, 1]
        new_state = stats[n_emit:n_emit + c]
        if new_state.shape[0] < c:
            new_state = torch.cat([new_state, empty_stats(c - new_state.shape[0], d, a.device)])
        return entries, new_state

    def decode_step(self, a: torch.Tensor, g: torch.Tensor, pos: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token for each of B sequences at once (the decode fast path of pool_streaming).

        a, g [B, c*dim] fp32; pos [B] positions; state [B, c, 3, dim]. Returns (emit [B] bool: the
        token closed an entry, raw entries [B, dim] (valid where emit), new state [B, c, 3, dim]).
        """
        d = self.dim
        if self.overlap:
            cur = merge_stats(state[:, 0], _token_stats(g[:, d:], a[:, d:]))
            nxt = merge_stats(state[:, 1], _token_stats(g[:, :d], a[:, :d]))
        else:
            cur, nxt = merge_stats(state[:, 0], _token_stats(g, a)), None
        emit = (pos + 1) % self.ratio == 0
        raw = cur[:, 2] / cur[:, 1]
        empty = empty_stats(a.shape[0], d, a.device)
        e = emit[:, None, None]
        if self.overlap:
            new = torch.stack([torch.where(e, nxt, cur), torch.where(e, empty, nxt)], dim=1)
        else:
            new = torch.where(e, empty, cur)[:, None]
        return emit, raw, new

    def finish(self, raw: torch.Tensor, first_entry: int, cos_sin_fn, out_dtype: torch.dtype,
               sim: bool, indexer: bool) -> torch.Tensor:
        """raw [E, dim] fp32 entries first_entry.. -> stored entries [E, dim] (norm, RoPE at the
        block start, and the activation-quantization simulation when `sim`)."""
        ent = torch.arange(raw.shape[0], device=raw.device) + first_entry
        return self.finish_at(raw, ent, cos_sin_fn, out_dtype, sim, indexer)

    def finish_at(self, raw: torch.Tensor, ent: torch.Tensor, cos_sin_fn, out_dtype: torch.dtype,
                  sim: bool, indexer: bool) -> torch.Tensor:
        """raw [E, dim] fp32 entries with indices ent [E] -> stored entries [E, dim]."""
        e = self.norm(raw.to(out_dtype))
        pos = ent * self.ratio
        cos, sin = cos_sin_fn(pos)
        e = apply_rope(e, cos, sin)
        if sim:
            if indexer:
                e = quant.fp4_qdq(quant.hadamard(e.float()), block=32).to(out_dtype)
            else:
                r = cos.shape[-1] * 2
                e = torch.cat([quant.fp8_qdq(e[..., :-r].float(), block=64).to(out_dtype), e[..., -r:]], dim=-1)
        return e


def _token_stats(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One token as an accumulator [B, 3, d]: max g, sum 1, weighted sum a."""
    return torch.stack([g, torch.ones_like(g), a], dim=1)


class Indexer(nn.Module):
    """The lightning indexer of a CSA layer: scores queries against the indexer's own compressed keys
    and keeps the top-k entries per query."""

    def __init__(self, cfg: ModelConfig, ratio: int, use_kernels: bool = False) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.ratio = ratio
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, use_kernels)
        self.weights_proj = Linear(cfg.dim, cfg.index_n_heads)
        self.compressor = Compressor(cfg, ratio, cfg.index_head_dim, overlap=True, use_kernels=use_kernels)

    def queries(self, x: torch.Tensor, qa: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                sim: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], qa [T, q_lora] -> q [T, Hi, Di] fp32, head weights [T, Hi] fp32."""
        q = self.wq_b(qa).view(qa.shape[0], self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin).float()
        if sim:
            q = quant.fp4_qdq(quant.hadamard(q), block=32)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               block: int = 256, budget: int = 1 << 22) -> torch.Tensor:
        """q [L, Hi, Di], w [L, Hi], keys [N, Di], positions [L] -> top-k entry ids [L, k] int64,
        -1 where fewer than k entries are visible (entry j is visible iff (j+1)*ratio <= t+1).
        Ties break by lower entry index. Queries go in blocks of at most `block`, fewer when the
        block's scores [block, Hi, N] would pass `budget` elements, so the workspace stays flat
        as the document grows."""
        L, N = q.shape[0], keys.shape[0]
        k = min(self.topk, N)
        out = torch.full((L, max(k, 0)), -1, dtype=torch.int64, device=q.device)
        if k == 0 or L == 0:
            return out
        kf = keys.float()
        block = max(1, min(block, budget // max(1, q.shape[1] * N)))
        for s in range(0, L, block):
            qb, wb, pb = q[s:s + block], w[s:s + block], positions[s:s + block]
            score = torch.einsum("lhd,nd->lhn", qb, kf).relu_()
            score = torch.einsum("lhn,lh->ln", score, wb)                          # [l, N]
            out[s:s + block] = self._top(score, (pb + 1) // self.ratio, k)
        return out

    def select_rows(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """`select` for B queries of B different sequences at once (decode): q [B, Hi, Di],
        w [B, Hi], keys [B, N, Di] (each row's entries, padded to N), positions [B] ->
        [B, min(topk, N)] entry ids, -1 where fewer are visible. Same rule, same ties."""
        k = min(self.topk, keys.shape[1])
        if k == 0:
            return torch.full((q.shape[0], 0), -1, dtype=torch.int64, device=q.device)
        score = torch.einsum("bhd,bnd->bhn", q, keys.float()).relu_()
        score = (score * w.unsqueeze(-1)).sum(dim=1)                             # [B, N]
        return self._top(score, (positions + 1) // self.ratio, k)

    @staticmethod
    def _top(score: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
        """score [R, N], visible count per row [R] -> the k best visible entry ids [R, k] in
        ascending id order, -1 where fewer than k are visible. Ties at the k-th score go to the
        lower ids. (ReLU makes exact ties at 0 common, and a query's selection must not depend on
        how many later entries exist.) Linear in N: a top-k for the k-th score, then the set."""
        R, N = score.shape
        ent = torch.arange(N, device=score.device)
        visible = ent[None, :] < limit[:, None]
        score = score.masked_fill(~visible, float("-inf"))
        kth = torch.topk(score, k, dim=-1).values[:, -1:]                        # [R, 1]
        above = (score > kth) & visible
        tied = (score == kth) & visible
        room = k - above.sum(dim=-1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=-1) <= room))
        # the taken ids, in order, into columns 0..; untaken ones all land in a spare column
        col = torch.where(take, take.cumsum(dim=-1) - 1, k)
        out = torch.full((R, k + 1), -1, dtype=torch.int64, device=score.device)
        out.scatter_(1, col, torch.where(take, ent[None, :], -1).expand(R, N).contiguous())
        return out[:, :k]
