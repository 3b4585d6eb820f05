"""Sizes of a DeepSeek-V4 model: parameters (total and active per token), checkpoint tensors and
bytes, and KV-cache bytes in the production layout.

Parameters are counted from the `Transformer` built on the meta device and cross-checked, name by
name and shape by shape, against the checkpoint inventory (`inventory.py`). Owns: the arithmetic.
Does not own: printing (`batchv4.pipelines.model_info`) or the engine's actual cache pools
(`forward_batch.CacheLayout`).

Counting rules (deepseek-v4.md §1.4, §3.3): FP4 weights count 2 parameters per byte; scales and
`tid2eid` are not parameters. Active per token excludes the embedding lookup and counts the head,
all non-expert tensors, the shared experts and `n_activated_experts` routed experts per layer.
KV bytes per token: N_csa * (entry + indexer key) / 4 + sum over HCA layers of entry / ratio, with a
584-byte entry (FP8 non-RoPE dims, BF16 RoPE dims, one ue8m0 scale per 64) and a 68-byte FP4
indexer key for the real models.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

import torch

from batchv4.config import ModelConfig
from batchv4.model import quant
from batchv4.model.checkpoint_files import DTYPE_BYTES, CheckpointError, read_headers
from batchv4.model.inventory import EXPERT, I64, expected_inventory, model_tensors

_STACKED = re.compile(r"\.ffn\.experts\.w[123]$")
_SCALE = re.compile(r"(\.scale|\.experts\.w[123]_scale)$")  # quantization scales: not parameters


@dataclass
class PartSizes:
    params: int                 # logical parameters (FP4 = 2 per byte), no scales, no tid2eid
    active_params: int          # per token, embedding lookup excluded
    tensors: int                # tensors in an official checkpoint (scales included)
    checkpoint_bytes: int


@dataclass
class KVSizes:
    entry_bytes: int            # one compressed KV entry
    indexer_key_bytes: int      # one CSA indexer key
    bytes_per_token: float      # asymptotic, all layers
    context: int
    total_bytes: float          # bytes_per_token * context (compressed entries + indexer keys)
    window_bytes: int           # per sequence: every main layer's raw window ring
    pending_bytes: int          # per sequence: compressors' pending tokens (a, g) in fp32, raw form


@dataclass
class ModelInfo:
    name: str
    layers: dict                # {"window": n, "csa": n, "hca": n, "mtp": n}
    main: PartSizes
    mtp: PartSizes
    kv: KVSizes
    cross_check: list[str] = field(default_factory=list)  # differences model vs inventory (empty = ok)
    on_disk: dict | None = None  # {"tensors": n, "bytes": n} when NAME_OR_PATH holds shards

    def to_dict(self) -> dict:
        return asdict(self)


def kv_entry_bytes(cfg: ModelConfig) -> int:
    """Production bytes of one compressed entry: FP8 non-RoPE dims + BF16 RoPE dims + one ue8m0
    scale per 64 non-RoPE dims, padded to 8 bytes (584 for the real models): the packed layout
    `quant.pack_kv_entries` writes."""
    return quant.kv_entry_nbytes(cfg.head_dim, cfg.rope_head_dim, torch.bfloat16)


def indexer_key_bytes(cfg: ModelConfig) -> int:
    """FP4 indexer key: two values per byte + one ue8m0 scale per 32 (68 for the real models)."""
    return quant.fp4_row_nbytes(cfg.index_head_dim)


def kv_sizes(cfg: ModelConfig, context: int) -> KVSizes:
    entry, ikey = kv_entry_bytes(cfg), indexer_key_bytes(cfg)
    per_token = 0.0
    pending = 0
    for i in range(cfg.n_layers):
        kind, r = cfg.layer_kind(i), cfg.compress_ratios[i]
        if kind == "csa":
            per_token += (entry + ikey) / r
            # previous + current block of (a, g), 2*head_dim and 2*index_head_dim channels, fp32
            pending += 2 * r * 2 * (2 * cfg.head_dim + 2 * cfg.index_head_dim) * 4
        elif kind == "hca":
            per_token += entry / r
            pending += r * 2 * cfg.head_dim * 4
    return KVSizes(entry_bytes=entry, indexer_key_bytes=ikey, bytes_per_token=per_token, context=context,
                   total_bytes=per_token * context, window_bytes=cfg.n_layers * cfg.window_size * entry,
                   pending_bytes=pending)


def _logical_shape(name: str, t: torch.Tensor) -> tuple[int, ...]:
    if _STACKED.search(name) and t.dtype in (torch.uint8, torch.int8):
        return (*t.shape[:-1], t.shape[-1] * 2)
    return tuple(t.shape)


def _meta_model_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from batchv4.model.model import Transformer  # torch-heavy; imported only when sizes are asked

    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: (_logical_shape(n, t), t.dtype) for n, t in model.state_dict().items() if not _SCALE.search(n)}


def _cross_check(cfg: ModelConfig, got: dict[str, tuple]) -> list[str]:
    want = {n: s for n, s, _ in model_tensors(cfg)}
    diffs = [f"{n}: model has it, the inventory does not" for n in sorted(set(got) - set(want))]
    diffs += [f"{n}: in the inventory, not in the model" for n in sorted(set(want) - set(got))]
    diffs += [f"{n}: model {got[n][0]} vs inventory {want[n]}" for n in sorted(set(want) & set(got))
              if tuple(got[n][0]) != tuple(want[n])]
    return diffs


def _part(cfg: ModelConfig, mtp: bool, shapes: dict[str, tuple[int, ...]], roles: dict[str, str],
          inventory: dict[str, tuple]) -> PartSizes:
    params = active = 0
    for name, shape in shapes.items():
        if name.startswith("mtp.") != mtp or roles.get(name) == I64:
            continue
        n = math.prod(shape)
        params += n
        if roles.get(name) == EXPERT:
            active += n * cfg.n_activated_experts // shape[0]
        elif name != "embed.weight":
            active += n
    inv = {k: v for k, v in inventory.items() if k.startswith("mtp.") == mtp}
    nbytes = sum(math.prod(s) * DTYPE_BYTES[d] for s, d in inv.values())
    return PartSizes(params=params, active_params=active, tensors=len(inv), checkpoint_bytes=nbytes)


def model_info(cfg: ModelConfig, context: int = 1 << 20, path: str | None = None) -> ModelInfo:
    """Sizes of `cfg` (counted on a meta-built Transformer); `path` adds what its shards hold."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    roles = {n: r for n, _, r in model_tensors(cfg)}
    got = _meta_model_tensors(cfg)
    shapes = {n: s for n, (s, _) in got.items()}
    inventory = expected_inventory(cfg)
    layers = {k: sum(cfg.layer_kind(i) == k for i in range(cfg.n_layers)) for k in ("window", "csa", "hca")}
    layers["mtp"] = cfg.n_mtp_layers
    info = ModelInfo(name=cfg.name, layers=layers, main=_part(cfg, False, shapes, roles, inventory),
                     mtp=_part(cfg, True, shapes, roles, inventory), kv=kv_sizes(cfg, context),
                     cross_check=_cross_check(cfg, got))
    if path is not None and os.path.isdir(path):
        try:
            infos, _ = read_headers(path)
        except CheckpointError:
            infos = {}
        if infos:
            info.on_disk = {"tensors": len(infos), "bytes": sum(t.nbytes for t in infos.values())}
    return info


# ---- capacity planning: N GPUs, attention data-parallel, routed experts expert-parallel ----------
_CKPT_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(weight|scale)$")
WORKSPACE_BYTES = 2 << 30      # CUDA context, NCCL buffers, allocator slack: a fixed reserve per GPU


@dataclass
class CapacityPlan:
    gpus: int
    gpu_memory: int
    context: int
    kv_cache_dtype: str             # "auto" (bf16 entries) or "fp8" (the production layout)
    max_batched_tokens: int
    rank_weight_bytes: list[int]    # per rank: its routed experts + the replicated tensors
    replicated_bytes: int           # every rank's copy: attention, embedding, head, gates, shared experts
    expert_bytes_per_rank: list[int]
    activation_bytes: int           # one step of max_batched_tokens tokens, exchange buffers included
    workspace_bytes: int
    cache_budget_bytes: int         # what is left on the fullest GPU (negative: does not fit)
    cache_bytes_per_token: float
    cache_bytes_per_sequence: int   # fixed per running sequence: window rings + pending state
    cached_tokens_per_gpu: int
    sequences_per_gpu: int          # concurrent sequences at `context` tokens each
    fits: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def rank_weight_bytes(cfg: ModelConfig, gpus: int) -> tuple[int, list[int]]:
    """(replicated bytes, [expert bytes of rank r]) of an official checkpoint, from its inventory:
    exactly what `load_checkpoint(..., expert_shard=(r, gpus))` reads (weights in their checkpoint
    formats, scales included)."""
    from batchv4.model.moe import expert_range

    bounds = [expert_range(cfg.n_routed_experts, (r, gpus)) for r in range(gpus)]
    replicated, experts = 0, [0] * gpus
    for name, (shape, dtype) in expected_inventory(cfg).items():
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        m = _CKPT_EXPERT.search(name)
        if m is None:
            replicated += n
            continue
        e = int(m.group(1))
        experts[next(r for r, (lo, hi) in enumerate(bounds) if lo <= e < hi)] += n
    return replicated, experts


def activation_bytes(cfg: ModelConfig, tokens: int, gpus: int) -> int:
    """An estimate of one step's live activations for `tokens` tokens: the mHC streams (bf16, three
    copies), the routed experts' fp32 intermediates and outputs for k slots, the attention's q and
    output, the exchange's receive and combine buffers (a token reaches at most min(k, gpus) ranks),
    and fp32 logits for up to 256 rows."""
    D, k, I = cfg.dim, cfg.n_activated_experts, cfg.moe_inter_dim
    per_token = (3 * cfg.hc_mult * D * 2 + 4 * k * (2 * I + D) + 2 * cfg.n_heads * cfg.head_dim * 2
                 + min(k, gpus) * (2 * D + 8 * k + 4 * D))
    return tokens * per_token + min(tokens, 256) * cfg.vocab_size * 4


def capacity_plan(cfg: ModelConfig, gpus: int, gpu_memory: int, context: int = 1 << 20,
                  kv_cache_dtype: str = "auto", max_batched_tokens: int = 8192) -> CapacityPlan:
    """Whether `cfg` fits `gpus` GPUs of `gpu_memory` bytes with its routed experts expert-parallel
    and everything else replicated, and how much KV cache (tokens, sequences at `context`) is left
    per GPU. Weights count in their checkpoint formats (FP4 experts, FP8 linears for the released
    models); the cache uses the engine's own layout (`CacheLayout`, bf16, "native" or "fp8")."""
    from batchv4.model.forward_batch import CacheLayout

    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if gpus > cfg.n_routed_experts:
        raise ValueError(f"{gpus} GPUs but only {cfg.n_routed_experts} routed experts to shard")
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype must be auto or fp8, got {kv_cache_dtype!r}")
    replicated, experts = rank_weight_bytes(cfg, gpus)
    weights = [replicated + e for e in experts]
    act = activation_bytes(cfg, max_batched_tokens, gpus)
    budget = gpu_memory - max(weights) - act - WORKSPACE_BYTES
    layout = CacheLayout(cfg, torch.bfloat16, 8, kv_format="fp8" if kv_cache_dtype == "fp8" else "native")
    per_token, per_seq = layout.bytes_per_token(), layout.bytes_per_slot()
    tokens = max(0, int(budget // per_token)) if budget > 0 else 0
    seqs = max(0, int(budget // (context * per_token + per_seq))) if budget > 0 else 0
    if budget <= 0:
        reason = (f"does not fit: {max(weights) / 2**30:,.1f} GiB of weights + {act / 2**30:,.1f} GiB of activations "
                  f"+ {WORKSPACE_BYTES / 2**30:,.0f} GiB workspace per GPU exceed {gpu_memory / 2**30:,.1f} GiB")
    elif seqs == 0:
        reason = f"does not fit: not one sequence of {context:,} tokens fits the cache left"
    else:
        reason = ""
    return CapacityPlan(gpus=gpus, gpu_memory=gpu_memory, context=context, kv_cache_dtype=kv_cache_dtype,
                        max_batched_tokens=max_batched_tokens, rank_weight_bytes=weights,
                        replicated_bytes=replicated, expert_bytes_per_rank=experts, activation_bytes=act,
                        workspace_bytes=WORKSPACE_BYTES, cache_budget_bytes=int(budget),
                        cache_bytes_per_token=per_token, cache_bytes_per_sequence=per_seq,
                        cached_tokens_per_gpu=tokens, sequences_per_gpu=seqs, fits=not reason, reason=reason)
