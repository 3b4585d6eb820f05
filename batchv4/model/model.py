"""The DeepSeek-V4 network: blocks with mHC residual streams, the final collapse and head, and the
MTP draft block.

Owns: the module tree (parameter names follow the official checkpoint, except that routed experts
are stacked per layer) and the two forwards: `forward_reference` (one sequence from position 0,
dense masks, looped experts — the oracle) and `forward` (a packed `ForwardBatch` over cache pools
that the engine allocated). Does not own: scheduling, allocation, sampling (the engine), checkpoint
files (`checkpoint.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchv4.config import ModelConfig
from batchv4.model.attention import Attention
from batchv4.model.forward_batch import CacheLayout, CachePools, ForwardBatch
from batchv4.model.layers import Linear, RMSNorm, hc_head, mhc_post, mhc_pre
from batchv4.model.moe import MoE


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, hash_routed: bool) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.hc_mult
        mix = n * (n + 2)
        self.hc_attn_fn = nn.Parameter(torch.empty(mix, n * cfg.dim))
        self.hc_attn_base = nn.Parameter(torch.zeros(mix))
        self.hc_attn_scale = nn.Parameter(torch.ones(3))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix, n * cfg.dim))
        self.hc_ffn_base = nn.Parameter(torch.zeros(mix))
        self.hc_ffn_scale = nn.Parameter(torch.ones(3))
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, ratio)
        self.ffn = MoE(cfg, hash_routed)
        self.use_kernels = False  # the Triton mHC kernels (the model sets it on CUDA)

    def _pre(self, x, fn, base, scale):
        if self.use_kernels:
            from batchv4.kernels.mhc import mhc_pre as mhc_pre_kernel

            c = self.cfg
            return mhc_pre_kernel(x, fn.float(), base.float(), scale.float(), c.norm_eps, c.hc_eps,
                                  c.hc_sinkhorn_iters, use_triton=True)
        return mhc_pre(x, fn, base, scale, self.cfg)

    def _post(self, y, x, post, comb):
        if self.use_kernels:
            from batchv4.kernels.mhc import mhc_post as mhc_post_kernel

            return mhc_post_kernel(y.to(x.dtype), x, post, comb, use_triton=True)
        return mhc_post(y, x, post, comb)

    def _run(self, x: torch.Tensor, token_ids: torch.Tensor, attn_fn, ffn_fn) -> torch.Tensor:
        """x [T, n, D] streams -> [T, n, D]."""
        u, post, comb = self._pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        x = self._post(attn_fn(self.attn_norm(u)), x, post, comb)
        u, post, comb = self._pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        return self._post(ffn_fn(self.ffn_norm(u), token_ids), x, post, comb)

    def forward_reference(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        u, post, comb = mhc_pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.cfg)
        x = mhc_post(self.attn.forward_reference(self.attn_norm(u)), x, post, comb)
        u, post, comb = mhc_pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.cfg)
        return mhc_post(self.ffn.forward_reference(self.ffn_norm(u), token_ids), x, post, comb)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, fb: ForwardBatch, pools: CachePools,
                layer: int) -> torch.Tensor:
        return self._run(x, token_ids, lambda h: self.attn.forward_packed(h, fb, pools, layer), self.ffn)


class MTPBlock(Block):
    """Depth-1 multi-token prediction: fuses the main model's pre-collapse streams at position t with
    the embedding of token t+1 and predicts token t+2. Shares embed and head with the main model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, ratio=0, hash_routed=False)
        n = cfg.hc_mult
        self.e_proj = Linear(cfg.dim, cfg.dim)
        self.h_proj = Linear(cfg.dim, cfg.dim)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * cfg.dim))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.ones(1))

    def fuse(self, streams: torch.Tensor, next_emb: torch.Tensor) -> torch.Tensor:
        """streams [T, n, D] (main model, before hc_head), next_emb [T, D] -> block input [T, n, D]."""
        e = self.e_proj(self.enorm(next_emb))
        h = self.h_proj(self.hnorm(streams))
        return e.unsqueeze(1) + h

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[int] | None = None) -> None:
        """`layers` builds only a subset of the main layers (real widths on one device)."""
        super().__init__()
        self.cfg = cfg
        n = cfg.hc_mult
        self.layer_ids = list(range(cfg.n_layers)) if layers is None else sorted(layers)
        self.embed = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({
            str(i): Block(cfg, cfg.compress_ratios[i], cfg.is_hash_layer(i)) for i in self.layer_ids
        })
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Embedding(cfg.vocab_size, cfg.dim)  # [V, D], applied as a linear in fp32
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * cfg.dim))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.mtp = nn.ModuleList([MTPBlock(cfg) for _ in range(cfg.n_mtp_layers)])

    # ---- options ---------------------------------------------------------------------------------
    def set_activation_sim(self, on: bool) -> None:
        """FP8/FP4 activation-quantization simulation of the reference (window and compressed KV,
        indexer queries and keys). Off by default; transformers has no equivalent."""
        for m in self.modules():
            if hasattr(m, "sim"):
                m.sim = on

    def set_kernels(self, on: bool) -> None:
        """The Triton kernels (fused MoE, sparse attention, indexer top-k, mHC). The engine turns
        them on for CUDA devices; on a CPU they run only under TRITON_INTERPRET=1 (tests)."""
        for m in self.modules():
            if hasattr(m, "use_kernels"):
                m.use_kernels = on

    def cache_layout(self, dtype: torch.dtype | None = None, page_size: int = 64,
                     with_mtp: bool = False, kv_format: str = "native") -> CacheLayout:
        return CacheLayout(self.cfg, dtype or self.embed.weight.dtype, page_size, with_mtp, kv_format)

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Seeded random weights (tests, benchmarks, the built-in tiny model); routing tables get
        duplicate-free rows."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(("_base", "attn_sink", ".bias", "ape")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("_scale"):
                p.copy_(torch.ones(p.shape) + torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:
                p.copy_(torch.ones(p.shape) + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                E = self.cfg.n_routed_experts
                rows = torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])])
                b.copy_(rows)
        return self

    # ---- forwards --------------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, D] after the final norm -> logits [N, V] fp32."""
        return F.linear(h.float(), self.head.weight.float())

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        """streams [T, n, D] -> normed hidden [T, D]."""
        return self.norm(hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg))

    @torch.no_grad()
    def forward_reference(self, token_ids: torch.Tensor, return_streams: bool = False):
        """The oracle: one sequence, positions 0..S-1. token_ids [S] -> logits [S, V] fp32."""
        x = self.embed(token_ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        for i in self.layer_ids:
            x = self.layers[str(i)].forward_reference(x, token_ids)
        logits = self.logits(self.collapse(x))
        return (logits, x) if return_streams else logits

    @torch.no_grad()
    def forward(self, fb: ForwardBatch, pools: CachePools, return_streams: bool = False):
        """One packed step. Returns logits [len(fb.logits_indices), V] fp32 (and the streams
        [T, n, D] when asked, for MTP)."""
        for src, dst in fb.restores:
            pools.copy_slot(src, dst)
        for ratio, src, dst in fb.page_copies:
            pools.copy_page(ratio, src, dst)
        for b, p0 in enumerate(fb.start_pos):
            if p0 == 0 and fb.cu_seqlens[b + 1] > fb.cu_seqlens[b]:
                pools.reset_slot(fb.slots[b])
        ids = fb.token_ids
        x = self.embed(ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        for i in self.layer_ids:
            x = self.layers[str(i)](x, ids, fb, pools, i)
        for src, dst in fb.saves:
            pools.copy_slot(src, dst)
        h = self.collapse(x[fb.logits_indices])
        logits = self.logits(h)
        return (logits, x) if return_streams else logits

    @torch.no_grad()
    def mtp_reference(self, streams: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP draft logits for one sequence from position 0: streams [S, n, D] of the main model,
        next_ids [S] (token t+1 at row t) -> logits [S, V] for token t+2."""
        blk = self.mtp[0]
        x = blk.fuse(streams, self.embed(next_ids))
        x = blk.forward_reference(x, next_ids)
        return self.logits(blk.collapse(x))
