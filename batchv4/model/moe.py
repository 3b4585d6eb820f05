"""V4's MoE: sqrt-softplus gate (bias used only to select), hash routing by token id for the first
layers, clamped SwiGLU experts stacked per layer, and the shared expert.

Owns: routing and the expert math in three forms — `forward_reference` (a loop over tokens and their
experts: the oracle), the grouped torch path (tokens sorted by expert), and the fused Triton kernel
on CUDA devices — and the expert-shard build (`expert_shard=(rank, world)`: the module holds one
contiguous block of the routed experts, see `expert_range`, and asks an `ExpertExchange` to bring
every rank's tokens to the experts that hold them). Does not own: weight loading or quantized
formats (`checkpoint.py`, `quant.py`), or the exchange itself (`batchv4.engine.distributed`: the
model never imports torch.distributed).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from batchv4.config import ModelConfig
from batchv4.model import quant
from batchv4.model.layers import Linear


def expert_range(n_experts: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The routed experts rank `r` of `world` holds: [lo, hi), a contiguous block (sizes differ by
    at most one when `world` does not divide `n_experts`)."""
    if shard is None:
        return 0, n_experts
    r, world = shard
    if not (world >= 1 and 0 <= r < world):
        raise ValueError(f"expert_shard {shard}: need 0 <= rank < world")
    if world > n_experts:
        raise ValueError(f"expert_shard {shard}: {world} ranks but only {n_experts} routed experts")
    return n_experts * r // world, n_experts * (r + 1) // world


@runtime_checkable
class ExpertExchange(Protocol):
    """What a sharded MoE needs from the engine (implemented by `batchv4.engine.distributed`'s
    `AllToAllExchange`): `routed(moe, x [T, D], weights [T, k] fp32, ids [T, k] global expert ids)
    -> [T, D] fp32`, the routed experts' sum for this rank's tokens, computed by whichever ranks
    hold the experts."""

    def routed(self, moe: "MoE", x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool) -> None:
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.hash = hash_routed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if hash_routed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], token_ids [T] -> weights [T, k] fp32, expert ids [T, k] int64."""
        logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "sqrtsoftplus":
            scores = torch.sqrt(F.softplus(logits))
        elif self.score_func == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        if self.hash:
            ids = self.tid2eid[token_ids].long()
        else:
            ids = torch.topk(scores + self.bias.float(), self.topk, dim=-1).indices
        w = scores.gather(1, ids)
        if self.score_func != "softmax":
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, ids


class Experts(nn.Module):
    """Routed experts stacked: w1/w3 [E, I, D] (gate/up), w2 [E, D, I] (down). Float weights, or
    resident FP8 ([E, I, D] e4m3 + block scales) / FP4 (packed uint8 [E, I, D/2] + per-32 scales)."""

    def __init__(self, cfg: ModelConfig, expert_shard: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.lo, self.hi = expert_range(cfg.n_routed_experts, expert_shard)  # global ids held here
        self.n_routed = cfg.n_routed_experts
        E, I, D = self.hi - self.lo, cfg.moe_inter_dim, cfg.dim
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w3 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        for n in ("w1_scale", "w2_scale", "w3_scale"):
            self.register_buffer(n, None)

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, name)[e]
        scale = getattr(self, f"{name}_scale")
        if w.dtype == torch.uint8 or w.dtype == torch.int8:
            return quant.dequant_fp4(w, scale[e]).to(dtype)
        if w.dtype == torch.float8_e4m3fn:
            return quant.dequant_fp8_block(w, scale[e]).to(dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def expert(self, x: torch.Tensor, e: int, weight: torch.Tensor | None) -> torch.Tensor:
        """x [n, D] through expert e -> [n, D] fp32; weight [n] fp32 multiplies the SwiGLU output."""
        dt = x.dtype
        g = F.linear(x, self.expert_weight("w1", e, dt)).float().clamp(max=self.limit)
        u = F.linear(x, self.expert_weight("w3", e, dt)).float().clamp(-self.limit, self.limit)
        h = F.silu(g) * u
        if weight is not None:
            h = h * weight[:, None]
        return F.linear(h.to(dt), self.expert_weight("w2", e, dt)).float()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Grouped path: x [T, D], weights/ids [T, k] (local expert ids; -1 = a slot whose expert
        another rank holds, contributing 0 here) -> [T, D] fp32. Token slots are sorted by expert,
        each expert runs once over its slots, and the k results per token are gathered back and
        summed (no scatter-add, which is slow and serial on CPUs)."""
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        skip = int((flat < 0).sum()) if self.hi - self.lo < self.n_routed else 0   # -1 slots sort first
        counts = torch.bincount(flat[order[skip:]], minlength=self.w1.shape[0]).tolist()
        tok = order[skip:] // k
        wsorted = weights.reshape(-1)[order[skip:]]
        xs = x[tok]                                                              # [S, D]
        ys = torch.zeros(T * k, x.shape[1], dtype=torch.float32, device=x.device)
        if xs.shape[0] <= self.padded_max_slots and self.w1.dtype == x.dtype and self.w1.is_floating_point() \
                and self.w1.element_size() > 1:
            if xs.shape[0]:
                ys[skip:] = self._padded(xs, wsorted, flat[order[skip:]], counts)
        else:
            start = 0
            for e, n in enumerate(counts):
                if n:
                    ys[skip + start:skip + start + n] = self.expert(xs[start:start + n], e, wsorted[start:start + n])
                    start += n
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return ys[inverse].view(T, k, x.shape[1]).sum(dim=1)


    padded_max_slots = 1024   # up to this many token slots (decode steps), one batched matmul per weight

    def _padded(self, xs: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The grouped path for few slots: slots sorted by expert (xs [S, D], weights w [S], their
        experts [S]) padded to [E, max count, D], three batched matmuls for all experts at once
        (instead of three small ones per expert), the same math as `expert`. -> [S, D] fp32."""
        E, C = len(counts), max(counts)
        starts = torch.tensor([0] + counts[:-1], device=xs.device).cumsum(0)
        within = torch.arange(xs.shape[0], device=xs.device) - starts[experts]
        pad = xs.new_zeros(E, C, xs.shape[1])
        pad[experts, within] = xs
        wpad = w.new_zeros(E, C)
        wpad[experts, within] = w
        g = torch.bmm(pad, self.w1.transpose(1, 2)).float().clamp(max=self.limit)         # [E, C, I]
        u = torch.bmm(pad, self.w3.transpose(1, 2)).float().clamp(-self.limit, self.limit)
        h = F.silu(g) * u * wpad[..., None]
        y = torch.bmm(h.to(xs.dtype), self.w2.transpose(1, 2)).float()                    # [E, C, D]
        return y[experts, within]


class SharedExpert(nn.Module):
    def __init__(self, cfg: ModelConfig, use_kernels: bool = False) -> None:
        super().__init__()
        self.limit = cfg.swiglu_limit
        inter = cfg.moe_inter_dim * cfg.n_shared_experts
        self.w1 = Linear(cfg.dim, inter, use_kernels)
        self.w3 = Linear(cfg.dim, inter, use_kernels)
        self.w2 = Linear(inter, cfg.dim, use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D] fp32 (clamped like the routed experts: the post-release behaviour)."""
        g = self.w1(x).float().clamp(max=self.limit)
        u = self.w3(x).float().clamp(-self.limit, self.limit)
        return self.w2((F.silu(g) * u).to(x.dtype)).float()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool, use_kernels: bool = False,
                 expert_shard: tuple[int, int] | None = None) -> None:
        """`use_kernels`: the fused Triton MoE for the routed experts and the FP8 GEMM for a
        resident FP8 shared expert (CUDA devices; CPU tensors under TRITON_INTERPRET=1).
        `expert_shard=(rank, world)`: hold only this rank's block of routed experts; the forward
        then needs `exchange` (an `ExpertExchange`) set before it runs."""
        super().__init__()
        self.gate = Gate(cfg, hash_routed)
        self.experts = Experts(cfg, expert_shard)
        self.shared_experts = SharedExpert(cfg, use_kernels)
        self.use_kernels = use_kernels
        self.sharded = expert_shard is not None
        self.exchange: ExpertExchange | None = None
        self.layer_key = -1      # set by whoever attaches an exchange: the same key on every rank

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], token_ids [T] -> [T, D] in x.dtype."""
        w, ids = self.gate(x, token_ids)
        if self.sharded:
            if self.exchange is None:
                raise RuntimeError("an expert-sharded MoE runs only with an exchange attached "
                                   "(batchv4.engine.distributed)")
            routed = self.exchange.routed(self, x, w, ids)
        else:
            routed = self.local_routed(x, w, ids)
        return (routed + self.shared_experts(x)).to(x.dtype)

    def local_routed(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts this module holds, over x [T, D] with weights/ids [T, k] (global
        expert ids) -> [T, D] fp32; slots whose expert is held elsewhere contribute 0."""
        ex = self.experts
        local = ids - ex.lo
        if self.sharded:
            here = (ids >= ex.lo) & (ids < ex.hi)
            if self.use_kernels:       # the fused kernel takes no "elsewhere" slots: weight 0 instead
                local, w = torch.where(here, local, 0), torch.where(here, w, 0.0)
            else:
                local = torch.where(here, local, -1)
        if self.use_kernels:
            from batchv4.kernels.moe import fused_moe

            return fused_moe(x, local, w, ex.w1, ex.w3, ex.w2, ex.limit, w1_scale=ex.w1_scale,
                             w3_scale=ex.w3_scale, w2_scale=ex.w2_scale, use_triton=True).float()
        return ex(x, w, local)

    def forward_reference(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The oracle: every token through each of its experts one at a time."""
        w, ids = self.gate(x, token_ids)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                y[t] += self.experts.expert(x[t:t + 1], int(ids[t, j]), w[t, j:j + 1])[0]
        return (y + self.shared_experts(x)).to(x.dtype)
