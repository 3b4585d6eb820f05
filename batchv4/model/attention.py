"""V4 attention: query latent + per-head RMS norm, one shared K=V head with partial interleaved RoPE,
a sliding window, compressed entries (all of them for HCA, the indexer's top-k for CSA), a
per-head sink, inverse RoPE on the output, and the grouped low-rank output projection.

Owns: both forwards of the attention sublayer — `forward_reference` (one sequence from position 0,
dense masks: the oracle) and `forward_packed` (many sequences' chunks, reading and extending the
cache pools of a `ForwardBatch`). Does not own: page or slot allocation (the engine), the kernels
(`batchv4.kernels`, used on CUDA devices).
"""

from __future__ import annotations

import torch
from torch import nn

from batchv4.config import ModelConfig
from batchv4.model import quant
from batchv4.model.compressor import Compressor, Indexer
from batchv4.model.forward_batch import CachePools, DecodeRows, ForwardBatch
from batchv4.model.layers import Linear, RMSNorm, apply_rope, rms_unweighted, rope_cos_sin, rope_inv_freq


class Attention(nn.Module):
    """One layer's attention of `kind` ("window", "csa" or "hca") with compression `ratio` (0 for
    window-only). `use_kernels`: the Triton sparse attention, indexer top-k, compressor and FP8
    GEMM kernels (CUDA devices; CPU tensors under TRITON_INTERPRET=1). `activation_sim`: the
    reference's FP8/FP4 activation-quantization simulation (window and compressed KV, indexer
    queries and keys), which transformers lacks."""

    def __init__(self, cfg: ModelConfig, kind: str, ratio: int, use_kernels: bool = False,
                 activation_sim: bool = False) -> None:
        super().__init__()
        if (kind == "window") != (ratio == 0):
            raise ValueError(f"a {kind} layer cannot have compress ratio {ratio}")
        self.cfg = cfg
        self.ratio = ratio
        self.kind = kind
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.window = cfg.window_size
        self.scale = cfg.head_dim ** -0.5
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads))
        k = use_kernels
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, k)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, k)
        self.wkv = Linear(cfg.dim, cfg.head_dim, k)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wo_a = Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, k)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, k)
        if ratio:
            self.compressor = Compressor(cfg, ratio, cfg.head_dim, overlap=kind == "csa", use_kernels=k)
        if self.kind == "csa":
            self.indexer = Indexer(cfg, ratio, use_kernels=k)
        # computed on first use (not a buffer: a model built on the meta device must not keep it there)
        self._inv_freq: torch.Tensor | None = None
        self.sim = activation_sim
        self.use_kernels = use_kernels
        self.batched_decode = True  # decode steps of many sequences in one attention (torch path)
        self.score_budget = 1 << 20  # elements of one query block's attention scores (packed prefill)

    # ---- token-wise parts shared by both forwards -------------------------------------------------
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.cfg, compressed=self.ratio > 0).to(positions.device)
        return rope_cos_sin(self._inv_freq, positions)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [T, D] -> q [T, H, Dh], kv [T, Dh] (x.dtype), qa [T, q_lora], cos/sin [T, R/2]."""
        cos, sin = self.cos_sin(positions)
        qa = self.q_norm(self.wq_a(x))
        q = self.wq_b(qa).view(x.shape[0], self.n_heads, self.head_dim)
        q = apply_rope(rms_unweighted(q, self.cfg.norm_eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.sim:
            r = self.cfg.rope_head_dim
            kv = torch.cat([quant.fp8_qdq(kv[:, :-r].float(), block=64).to(kv.dtype), kv[:, -r:]], dim=-1)
        return q, kv, qa, cos, sin

    def _out(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """o [T, H, Dh] -> [T, D]: inverse RoPE at the query position, grouped wo_a, wo_b."""
        o = apply_rope(o, cos, sin, inverse=True)
        G = self.cfg.o_groups
        y = self.wo_a.forward_grouped(o.reshape(o.shape[0], G, -1), G)                  # [T, G*r]
        return self.wo_b(y)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [L, H, Dh]; keys [L, K, Dh] (per query); bias [L, K] (0 / -inf) -> [L, H, Dh] in q.dtype.
        K = V; the sink joins the softmax denominator with a zero value."""
        s = torch.einsum("lhd,lkd->lhk", q.float(), keys.float()) * self.scale + bias[:, None, :]
        sink = self.attn_sink.float().view(1, -1, 1).expand(s.shape[0], -1, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        return torch.einsum("lhk,lkd->lhd", p, keys.float()).to(q.dtype)

    def _sdpa_shared(self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [l, H, Dh]; keys [n, Dh] shared by the l queries; bias [l, n] -> [l, H, Dh]."""
        kf = keys.float()
        s = torch.einsum("lhd,nd->lhn", q.float(), kf) * self.scale + bias[:, None, :]
        sink = self.attn_sink.float().view(1, -1, 1).expand(s.shape[0], -1, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        return torch.einsum("lhn,nd->lhd", p, kf).to(q.dtype)

    def _sdpa_band_chosen(self, q: torch.Tensor, band: torch.Tensor, bias: torch.Tensor,
                          chosen: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """q [l, H, Dh]; band [n, Dh] shared with bias [l, n]; chosen [l, k, Dh] the entries with
        ids sel [l, k] (-1 = none) of each query -> [l, H, Dh]. The softmax of `_sdpa_shared`
        over the band and the chosen entries, without scoring the entries not chosen."""
        qf, bf = q.float(), band.float()
        chosen = chosen.float()
        cbias = torch.zeros(sel.shape, device=q.device).masked_fill(sel < 0, float("-inf"))
        s_band = torch.einsum("lhd,nd->lhn", qf, bf) * self.scale + bias[:, None, :]
        s_chosen = torch.einsum("lhd,lkd->lhk", qf, chosen) * self.scale + cbias[:, None, :]
        sink = self.attn_sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1)
        p = torch.softmax(torch.cat([s_band, s_chosen, sink], dim=-1), dim=-1)
        n = bf.shape[0]
        o = torch.einsum("lhn,nd->lhd", p[..., :n], bf) + torch.einsum("lhk,lkd->lhd", p[..., n:-1], chosen)
        return o.to(q.dtype)

    # ---- the oracle ------------------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """One sequence, positions 0..S-1, dense masks. x [S, D] -> [S, D]."""
        S = x.shape[0]
        pos = torch.arange(S, device=x.device)
        q, kv, qa, cos, sin = self._qkv(x, pos)
        keys = kv                                                               # [S, Dh]
        win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        mask = win
        if self.ratio:
            comp = self._reference_entries(self.compressor, x, pos, indexer=False)    # [N, Dh]
            N = comp.shape[0]
            visible = torch.arange(N, device=x.device)[None, :] < ((pos + 1) // self.ratio)[:, None]
            if self.kind == "csa":
                ikeys = self._reference_entries(self.indexer.compressor, x, pos, indexer=True)
                qi, wi = self.indexer.queries(x, qa, cos, sin, self.sim)
                sel = self.indexer.select(qi, wi, ikeys, pos)                         # [S, k]
                chosen = torch.zeros(S, N + 1, dtype=torch.bool, device=x.device)
                chosen.scatter_(1, torch.where(sel >= 0, sel, N), True)
                visible = visible & chosen[:, :N]
            keys = torch.cat([kv, comp.to(kv.dtype)])
            mask = torch.cat([win, visible], dim=1)
        bias = torch.zeros(mask.shape, device=x.device).masked_fill(~mask, float("-inf"))
        o = self._sdpa(q, keys.unsqueeze(0).expand(S, -1, -1), bias)
        return self._out(o, cos, sin)

    def _reference_entries(self, comp: Compressor, x, pos, indexer: bool) -> torch.Tensor:
        a, g = comp.project(x, pos)
        raw = comp.pool_reference(a, g)
        return comp.finish(raw, 0, self.cos_sin, x.dtype, self.sim, indexer)

    # ---- the packed forward ----------------------------------------------------------------------
    def forward_packed(self, x: torch.Tensor, fb: ForwardBatch, pools: CachePools, layer: int,
                       qblock: int = 256) -> torch.Tensor:
        """x [T, D] of many sequences (see ForwardBatch) -> [T, D]; reads and extends the caches."""
        q, kv, qa, cos, sin = self._qkv(x, fb.positions)
        if self.ratio:
            a, g = self.compressor.project(x, fb.positions)
        if self.kind == "csa":
            qi, wi = self.indexer.queries(x, qa, cos, sin, self.sim)
            ia, ig = self.indexer.compressor.project(x, fb.positions)
        W, P = self.window, pools.layout.page_size
        if self.use_kernels:
            return self._packed_kernels(x, fb, pools, layer, q, kv, cos, sin,
                                        (a, g) if self.ratio else None,
                                        (qi, wi, ia, ig) if self.kind == "csa" else None)
        out = torch.empty_like(q)
        dec = fb.decode_rows()
        if self.ratio and dec is not None:
            # decode steps: one compressor update for all single-token sequences
            self._extend_decode(self.compressor, pools, layer, pools.state[layer], a, g, fb, dec, P, indexer=False)
            if self.kind == "csa":
                self._extend_decode(self.indexer.compressor, pools, layer, pools.istate[layer], ia, ig, fb, dec,
                                    P, indexer=True)
        done = set(dec.seqs) if dec is not None else set()
        if done and self.batched_decode:
            self._decode_rows(q, kv, fb, pools, layer, dec, out, (qi, wi) if self.kind == "csa" else None)
        for b in range(fb.num_seqs):
            r0, r1 = fb.cu_seqlens[b], fb.cu_seqlens[b + 1]
            L = r1 - r0
            if L == 0 or (b in done and self.batched_decode):
                continue
            p0, slot = fb.start_pos[b], fb.slots[b]
            pos = fb.positions[r0:r1]
            # window keys: earlier positions from the ring, this chunk's from kv
            n_old = min(W - 1, p0)
            old_pos = torch.arange(p0 - n_old, p0, device=x.device)
            keys_w = torch.cat([pools.read_window(layer, slot, old_pos % W).to(kv.dtype), kv[r0:r1]])  # [n_old+L, Dh]
            comp_all = ikeys = None
            if self.ratio:
                table = fb.page_tables[self.ratio][b]
                if b not in done:
                    self._extend(self.compressor, pools, layer, pools.state[layer], a[r0:r1], g[r0:r1],
                                 p0, slot, table, P, indexer=False)
                ent = torch.arange((p0 + L) // self.ratio, device=x.device)
                if self.kind == "csa":
                    if b not in done:
                        self._extend(self.indexer.compressor, pools, layer, pools.istate[layer],
                                     ia[r0:r1], ig[r0:r1], p0, slot, table, P, indexer=True)
                    ikeys = pools.read_ikeys(layer, table[ent // P], ent % P)
                else:   # HCA reads every entry; CSA only the ones each query block chose (below)
                    comp_all = pools.read_entries(layer, table[ent // P], ent % P).to(kv.dtype)  # [N, Dh]
            # queries in blocks whose score matrix stays under a fixed size as the document grows
            dense = comp_all.shape[0] if comp_all is not None else 0
            step = max(1, min(qblock, self.score_budget // (self.n_heads * (W + qblock + dense))))
            for s in range(0, L, step):
                e = min(L, s + step)
                # the band of window keys these queries see is one contiguous slice
                k0, k1 = max(0, s + n_old - (W - 1)), e + n_old
                kpos = torch.arange(k0, k1, device=x.device) + (p0 - n_old)
                qpos = pos[s:e]
                band = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
                keys = keys_w[k0:k1]
                bias = torch.zeros(band.shape, device=x.device).masked_fill(~band, float("-inf"))
                qs = q[r0 + s:r0 + e]
                if ikeys is not None:
                    # CSA: the band plus only the indexer's top-k entries of each query
                    sel = self.indexer.select(qi[r0 + s:r0 + e], wi[r0 + s:r0 + e], ikeys, qpos)  # [l, k]
                    ids = sel.clamp(min=0)
                    chosen = pools.read_entries(layer, table[ids // P], ids % P).to(kv.dtype)     # [l, k, Dh]
                    out[r0 + s:r0 + e] = self._sdpa_band_chosen(qs, keys, bias, chosen, sel)
                    continue
                if comp_all is not None:
                    # HCA: every entry the query can see
                    visible = ent[None, :] < ((qpos + 1) // self.ratio)[:, None]
                    keys = torch.cat([keys, comp_all])
                    bias = torch.cat([bias, torch.zeros(visible.shape, device=x.device)
                                      .masked_fill(~visible, float("-inf"))], dim=1)
                out[r0 + s:r0 + e] = self._sdpa_shared(qs, keys, bias)
            # the ring keeps the last W positions
            keep = min(W, L)
            pools.write_window(layer, slot, pos[L - keep:] % W, kv[r1 - keep:r1])
        return self._out(out, cos, sin)

    def _decode_rows(self, q, kv, fb: ForwardBatch, pools: CachePools, layer: int, dec: DecodeRows,
                     out: torch.Tensor, idx_q) -> None:
        """Attention of the single-token sequences `dec` at once: each query against its ring of
        the last W positions and its compressed entries (padded to the longest; for CSA the
        indexer's top-k of them). Their compressor steps must already be done. Writes `out` rows
        and the new kv into the rings."""
        dev = q.device
        W, P = self.window, pools.layout.page_size
        rows, slots, pos = dec.rows, dec.slots, dec.positions                      # [B] each
        # the ring slot of position p is p % W: after this write it holds positions (p-W, p]
        pools.write_window(layer, slots, pos % W, kv[rows])
        keys = pools.read_window(layer, slots).to(kv.dtype)                         # [B, W, Dh]
        j = torch.arange(W, device=dev)
        visible = (j[None, :] <= pos[:, None]) | (pos[:, None] >= W - 1)           # [B, W]
        if self.ratio:
            n_ent = (pos + 1) // self.ratio                                        # [B]
            N = int(n_ent.max())
            if N:
                ent = torch.arange(N, device=dev)
                table = fb.page_tables[self.ratio][dec.index]
                pages = table[:, ent // P].clamp(min=0)                            # [B, N]
                comp = pools.read_entries(layer, pages, ent % P).to(kv.dtype)      # [B, N, Dh]
                seen = ent[None, :] < n_ent[:, None]
                if idx_q is not None:
                    ikeys = pools.read_ikeys(layer, pages, ent % P)                # [B, N, Di]
                    sel = self.indexer.select_rows(idx_q[0][rows], idx_q[1][rows], ikeys, pos)
                    chosen = torch.zeros(len(dec.seqs), N + 1, dtype=torch.bool, device=dev)
                    chosen.scatter_(1, torch.where(sel >= 0, sel, N), True)
                    seen = seen & chosen[:, :N]
                keys = torch.cat([keys, comp], dim=1)
                visible = torch.cat([visible, seen], dim=1)
        bias = torch.zeros(visible.shape, device=dev).masked_fill(~visible, float("-inf"))
        out[rows] = self._sdpa(q[rows], keys, bias)

    def _packed_kernels(self, x, fb: ForwardBatch, pools: CachePools, layer: int, q, kv, cos, sin,
                        comp_in, idx_in) -> torch.Tensor:
        """The same step through the Triton kernels: compressors extend each sequence's pages, then
        one indexer top-k and one sparse-attention call cover every token of the batch."""
        from batchv4.kernels.indexer import indexer_topk
        from batchv4.kernels.sparse_attn import sparse_attn_prefill

        if pools.layout.kv_format != "native":
            raise ValueError("the Triton attention kernels read the native cache layout; "
                             "kv_format='fp8' runs on the torch path (kernels off)")
        dev = x.device
        ring = pools.window[layer]
        P = pools.layout.page_size
        cu = torch.tensor(fb.cu_seqlens, dtype=torch.int32, device=dev)
        slots = torch.tensor(fb.slots, dtype=torch.int32, device=dev)
        table = comp = topk = n_comp = None
        if self.ratio:
            a, g = comp_in
            full = fb.page_tables[self.ratio]
            for b in range(fb.num_seqs):
                r0, r1 = fb.cu_seqlens[b], fb.cu_seqlens[b + 1]
                if r1 == r0:
                    continue
                self._extend(self.compressor, pools, layer, pools.state[layer], a[r0:r1], g[r0:r1],
                             fb.start_pos[b], fb.slots[b], full[b], P, indexer=False)
                if idx_in is not None:
                    self._extend(self.indexer.compressor, pools, layer, pools.istate[layer],
                                 idx_in[2][r0:r1], idx_in[3][r0:r1], fb.start_pos[b], fb.slots[b], full[b], P,
                                 indexer=True)
            table = full.clamp(min=0).to(torch.int32)
            comp = pools.comp[layer]
            if idx_in is not None:
                topk = indexer_topk(idx_in[0], idx_in[1], pools.ikey[layer], table, fb.positions,
                                    self.indexer.topk, cu_seqlens=cu, ratio=self.ratio, use_triton=True)
            else:
                n_comp = ((fb.positions + 1) // self.ratio).to(torch.int32)
        o = sparse_attn_prefill(q, cu, fb.positions, kv.to(ring.dtype), ring, slots, comp, table,
                                self.attn_sink.float(), self.scale, topk_idx=topk, n_comp=n_comp,
                                use_triton=True)
        W = self.window
        for b in range(fb.num_seqs):
            r0, r1 = fb.cu_seqlens[b], fb.cu_seqlens[b + 1]
            keep = min(W, r1 - r0)
            if keep:
                ring[fb.slots[b], fb.positions[r1 - keep:r1] % W] = kv[r1 - keep:r1].to(ring.dtype)
        return self._out(o.to(q.dtype), cos, sin)

    def _extend_decode(self, comp: Compressor, pools: CachePools, layer: int, state: torch.Tensor, a, g,
                       fb: ForwardBatch, dec: DecodeRows, P: int, indexer: bool) -> None:
        """The compressor step of every single-token sequence of the batch at once."""
        slots, pos = dec.slots, dec.positions
        emit, raw, new = comp.decode_step(a[dec.rows], g[dec.rows], pos, state[slots])
        state[slots] = new
        if bool(emit.any()):
            which = emit.nonzero().flatten()
            ent = (pos[which] + 1) // comp.ratio - 1                              # entry index
            table = fb.page_tables[comp.ratio][dec.index[which]]
            pages = table.gather(1, (ent // P)[:, None]).flatten()
            if bool((pages < 0).any()):
                raise ValueError("page table too short for a compressed entry")
            write = pools.write_ikeys if indexer else pools.write_entries
            write(layer, pages, ent % P, comp.finish_at(raw[which], ent, self.cos_sin, pools.layout.dtype, self.sim,
                                                         indexer))

    def _extend(self, comp: Compressor, pools: CachePools, layer: int, state: torch.Tensor, a, g, p0: int,
                slot: int, table: torch.Tensor, P: int, indexer: bool) -> None:
        raw, new_state = comp.pool_streaming(a, g, p0, state[slot])
        state[slot] = new_state
        if raw.shape[0]:
            first = p0 // comp.ratio
            ent = torch.arange(first, first + raw.shape[0], device=raw.device)
            pages = table[ent // P]
            if bool((pages < 0).any()):
                raise ValueError(f"page table too short for compressed entry {int(ent[-1])}")
            write = pools.write_ikeys if indexer else pools.write_entries
            write(layer, pages, ent % P, comp.finish(raw, first, self.cos_sin, pools.layout.dtype, self.sim, indexer))
