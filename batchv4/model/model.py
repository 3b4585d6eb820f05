"""The DeepSeek-V4 network: blocks with mHC residual streams, the final collapse and head, and the
MTP draft block.

Owns: the module tree (parameter names follow the official checkpoint, except that routed experts
are stacked per layer) and the two forwards: `forward_reference` (one sequence from position 0,
dense masks, looped experts — the oracle) and `forward` (a packed `ForwardBatch` over cache pools
that the engine allocated). Does not own: scheduling, allocation, sampling (the engine), checkpoint
files (`checkpoint.py`).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from batchv4.config import ModelConfig
from batchv4.model.attention import Attention
from batchv4.model.forward_batch import CacheLayout, CachePools, ForwardBatch
from batchv4.model.layers import Linear, RMSNorm, hc_head, mhc_post, mhc_pre
from batchv4.model.moe import MoE, expert_range


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, ratio: int, hash_routed: bool, use_kernels: bool = False,
                 activation_sim: bool = False, expert_shard: tuple[int, int] | None = None) -> None:
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
        self.attn = Attention(cfg, kind, ratio, use_kernels, activation_sim)
        self.ffn = MoE(cfg, hash_routed, use_kernels, expert_shard)
        self.use_kernels = use_kernels  # the Triton mHC kernels

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

    def __init__(self, cfg: ModelConfig, use_kernels: bool = False, activation_sim: bool = False,
                 expert_shard: tuple[int, int] | None = None) -> None:
        super().__init__(cfg, "window", 0, False, use_kernels, activation_sim, expert_shard)
        n = cfg.hc_mult
        self.e_proj = Linear(cfg.dim, cfg.dim, use_kernels)
        self.h_proj = Linear(cfg.dim, cfg.dim, use_kernels)
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
    def __init__(self, cfg: ModelConfig, layers: list[int] | None = None, *, use_kernels: bool = False,
                 activation_sim: bool = False, expert_shard: tuple[int, int] | None = None) -> None:
        """`layers` builds only a subset of the main layers (real widths on one device).

        `use_kernels`: the Triton kernels (fused MoE, sparse attention, indexer top-k, compressor
        accumulators, mHC, FP8 GEMM for resident FP8 linears); the engine chooses them for CUDA
        devices, and on a CPU they run only under TRITON_INTERPRET=1 (tests). `activation_sim`:
        the reference's FP8/FP4 activation-quantization simulation (window and compressed KV,
        indexer queries and keys), which transformers lacks; the fp8 cache layout holds exactly
        its values. Both are fixed when the model is built. `expert_shard=(rank, world)`: every
        MoE holds only that rank's block of routed experts (`moe.expert_range`), for expert
        parallelism; everything else is replicated."""
        super().__init__()
        self.cfg = cfg
        self.use_kernels = use_kernels
        self.activation_sim = activation_sim
        self.expert_shard = expert_shard
        n = cfg.hc_mult
        self.layer_ids = list(range(cfg.n_layers)) if layers is None else sorted(layers)
        self.embed = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({
            str(i): Block(cfg, cfg.layer_kind(i), cfg.compress_ratios[i], cfg.is_hash_layer(i), use_kernels,
                          activation_sim, expert_shard)
            for i in self.layer_ids
        })
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Embedding(cfg.vocab_size, cfg.dim)  # [V, D], applied as a linear in fp32
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * cfg.dim))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.mtp = nn.ModuleList([MTPBlock(cfg, use_kernels, activation_sim, expert_shard) for _ in range(cfg.n_mtp_layers)])

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, layers: list[int] | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", std: float = 0.02,
               **build) -> "Transformer":
        """A seeded random model built in `dtype` on `device` directly: the module tree on the
        meta device, storage allocated once where it lives, every tensor filled by `init_random`
        (no float32 copy to convert, no init that is overwritten). `build`: use_kernels,
        activation_sim."""
        with torch.device("meta"):
            model = cls(cfg, layers, **build)
        return model.to(dtype).to_empty(device=device).init_random(seed, std)

    def set_activation_sim(self, on: bool) -> None:
        """Kept for tests/engine/test_engine.py, which switches the simulation on a built engine;
        build with `activation_sim=` instead. Sets the flag of the attention modules this model
        built (the only modules that read it)."""
        self.activation_sim = on
        for blk in [*self.layers.values(), *self.mtp]:
            blk.attn.sim = on

    def cache_layout(self, dtype: torch.dtype | None = None, page_size: int = 64,
                     with_mtp: bool = False, kv_format: str = "native") -> CacheLayout:
        return CacheLayout(self.cfg, dtype or self.embed.weight.dtype, page_size, with_mtp, kv_format)

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Seeded random weights (tests, benchmarks, the built-in tiny model), filled in place in
        each tensor's dtype: normal(0, std), norms and mHC scales 1 + normal(0, 0.1), routing tables
        with duplicate-free rows. Each tensor draws from its own generator seeded by (seed, name),
        on the CPU, so a tensor's values depend only on the seed, its name, shape and dtype and the
        torch version (not on the device, or on which other layers were built, or on the expert
        shard: a sharded expert stack is its rows of the whole stack)."""
        E = self.cfg.n_routed_experts
        for name, p in self.named_parameters():
            centred = name.endswith(("_base", "attn_sink", ".bias", "ape"))
            around_one = not centred and (name.endswith("_scale") or "norm" in name)
            stats = (1.0, 0.1) if around_one else (0.0, std)
            if self.expert_shard is not None and ".ffn.experts.w" in name:
                lo, hi = expert_range(E, self.expert_shard)
                whole = torch.empty((E, *p.shape[1:]), dtype=p.dtype)
                _fill_normal(whole, name, seed, *stats)
                p.copy_(whole[lo:hi])
            else:
                _fill_normal(p, name, seed, *stats)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                # the first k of a random permutation per row: argsort of uniform keys, one call
                # for all rows (a stable sort, so ties, if any, break the same way everywhere)
                keys = torch.rand(b.shape[0], E, generator=_generator(name, seed))
                b.copy_(torch.sort(keys, dim=1, stable=True).indices[:, : b.shape[1]].to(b.device))
            elif b.is_meta or b.is_floating_point():
                raise ValueError(f"init_random does not know how to fill buffer {name}")
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
        for b, p0 in enumerate(fb.start_pos):
            if p0 == 0 and fb.cu_seqlens[b + 1] > fb.cu_seqlens[b]:
                pools.reset_slot(fb.slots[b])
        ids = fb.token_ids
        x = self.embed(ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        for i in self.layer_ids:
            x = self.layers[str(i)](x, ids, fb, pools, i)
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


def _generator(name: str, seed: int) -> torch.Generator:
    # crc32, not hash(): Python salts str hashes per process
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (1 << 63))


def _fill_normal(p: torch.Tensor, name: str, seed: int, mean: float, std: float) -> None:
    g = _generator(name, seed)
    if p.device.type == "cpu":
        p.normal_(mean, std, generator=g)
    else:  # CPU generators only: draw on the CPU in p's dtype, then one copy
        p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(mean, std, generator=g))
