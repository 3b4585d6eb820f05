"""ModelConfig: the DeepSeek-V4 hyper-parameters, read from presets, HF `config.json` or the official
`inference/config.json`.

Owns: field names, legacy-key folding, validation and refusal of non-V4 configs. Does not own: any
torch code, weights, or cache sizing (see `batchv4.model.layout`). Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from batchv4.errors import UserError

PRESET_NAMES = ("deepseek-v4-flash", "deepseek-v4-pro", "deepseek-v4-flash-4l", "tiny", "test")


class ConfigError(UserError):
    """A config that cannot describe a DeepSeek-V4 model."""


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # attention schedule: one ratio per main layer (0 window-only, 4 CSA, other > 0 HCA)
    window_size: int = 128
    compress_ratios: tuple[int, ...] = ()
    csa_ratio: int = 4
    # lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # RoPE
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # MTP
    n_mtp_layers: int = 1
    # tokens
    bos_token_id: int = 0
    eos_token_id: int = 1
    # checkpoint formats: "fp8" (block-scaled e4m3) or "bf16"; experts "fp4", "fp8" or None (= as weights)
    weight_dtype: str = "bf16"
    expert_dtype: str | None = None
    scale_fmt: str | None = None
    name: str = "custom"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            object.__setattr__(self, "compress_ratios", _default_ratios(self.n_layers))
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ---- derived ----------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def layer_kind(self, i: int) -> str:
        """'window', 'csa' or 'hca' for main layer i."""
        r = self.compress_ratios[i]
        if r == 0:
            return "window"
        return "csa" if r == self.csa_ratio else "hca"

    def is_hash_layer(self, i: int) -> bool:
        return i < self.n_hash_layers

    @property
    def hca_ratios(self) -> tuple[int, ...]:
        return tuple(sorted({r for r in self.compress_ratios if r and r != self.csa_ratio}))

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def fingerprint_dict(self) -> dict:
        d = self.to_dict()
        d.pop("name")
        return d

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.compress_ratios) == self.n_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layers} layers")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios must be >= 0")
        need(self.csa_ratio == 4, "the CSA compressor needs ratio 4 (overlapping windows are keyed on it)")
        need(self.head_dim > self.rope_head_dim > 0 and self.rope_head_dim % 2 == 0,
             "rope_head_dim must be even and smaller than head_dim")
        need(self.n_heads % self.o_groups == 0, "n_heads must be a multiple of o_groups")
        need(0 < self.n_activated_experts <= self.n_routed_experts,
             "n_activated_experts must be in 1..n_routed_experts")
        need(self.score_func in ("sqrtsoftplus", "softmax", "sigmoid"),
             f"unknown score_func {self.score_func!r}")
        need(self.window_size > 0, "window_size must be positive")
        need(self.weight_dtype in ("fp8", "bf16"), f"unknown weight dtype {self.weight_dtype!r}")
        need(self.expert_dtype in (None, "fp4", "fp8", "bf16"), f"unknown expert_dtype {self.expert_dtype!r}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0,
             "index_head_dim must be a power of two (Hadamard transform)")
        need(0 <= self.n_hash_layers <= self.n_layers, "n_hash_layers out of range")

    # ---- readers ------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        _refuse_non_v4(d)
        if "text_config" in d:
            raise ConfigError("multimodal configs (text_config) are not DeepSeek-V4; batchv4 runs model_type deepseek_v4")
        n = int(d.get("num_hidden_layers", 43))
        ratios, n_extra = _hf_ratios(d, n)
        rope = d.get("rope_scaling") or {}
        rp = d.get("rope_parameters") or {}
        if isinstance(rp.get("compress"), dict):
            rope = {**rope, **rp["compress"]}
        elif rp and rp.get("rope_type", rp.get("type")) == "yarn":
            rope = {**rope, **rp}
        if "qk_rope_head_dim" in d:
            rope_dim = int(d["qk_rope_head_dim"])
        elif d.get("partial_rotary_factor"):
            rope_dim = int(int(d.get("head_dim", 512)) * float(d["partial_rotary_factor"]))
        else:
            rope_dim = 64
        if "num_hash_layers" in d:
            n_hash = int(d["num_hash_layers"])
        elif d.get("mlp_layer_types"):
            n_hash = sum(1 for t in d["mlp_layer_types"] if t == "hash_moe")
        else:
            n_hash = 3
        csa = int((d.get("compress_rates") or {}).get("compressed_sparse_attention", d.get("compress_rate_csa", 4)))
        q = d.get("quantization_config") or {}
        weight_dtype = "fp8" if str(q.get("fmt", q.get("quant_method", ""))).startswith(("e4m3", "fp8")) else "bf16"
        expert_dtype = d.get("expert_dtype", q.get("expert_dtype"))
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        mtp = int(d.get("num_nextn_predict_layers", 1))
        extra = {"dspark": n_extra > 1, "mtp_entries": n_extra}
        return cls(
            vocab_size=int(d.get("vocab_size", 129280)),
            dim=int(d.get("hidden_size", 4096)),
            n_layers=n,
            n_heads=int(d.get("num_attention_heads", 64)),
            head_dim=int(d.get("head_dim", 512)),
            rope_head_dim=rope_dim,
            q_lora_rank=int(d.get("q_lora_rank", 1024)),
            o_groups=int(d.get("o_groups", 8)),
            o_lora_rank=int(d.get("o_lora_rank", 1024)),
            window_size=int(d.get("sliding_window", 128)),
            compress_ratios=tuple(ratios),
            csa_ratio=csa,
            index_n_heads=int(d.get("index_n_heads", 64)),
            index_head_dim=int(d.get("index_head_dim", 128)),
            index_topk=int(d.get("index_topk", 512)),
            n_routed_experts=int(d.get("n_routed_experts", d.get("num_local_experts", 256))),
            n_shared_experts=int(d.get("n_shared_experts", 1)),
            n_activated_experts=int(d.get("num_experts_per_tok", 6)),
            moe_inter_dim=int(d.get("moe_intermediate_size", d.get("intermediate_size", 2048))),
            n_hash_layers=n_hash,
            score_func=str(d.get("scoring_func", "sqrtsoftplus")),
            route_scale=float(d.get("routed_scaling_factor", 1.5)),
            swiglu_limit=float(d.get("swiglu_limit", 10.0)),
            hc_mult=int(d.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(d.get("hc_eps", 1e-6)),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            compress_rope_theta=float(d.get("compress_rope_theta", 160000.0)),
            rope_factor=float(rope.get("factor", 16.0)),
            original_seq_len=int(rope.get("original_max_position_embeddings", 65536)),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 1048576)),
            n_mtp_layers=0 if n_extra > 1 else mtp,
            bos_token_id=int(d.get("bos_token_id", 0) or 0),
            eos_token_id=int(eos if eos is not None else 1),
            weight_dtype=weight_dtype,
            expert_dtype=expert_dtype,
            scale_fmt=q.get("scale_fmt"),
            name=name,
            extra=extra,
        )

    @classmethod
    def from_official_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        n = int(d["n_layers"])
        ratios = list(d.get("compress_ratios") or _default_ratios(n))
        n_extra = len(ratios) - n
        dtype = d.get("dtype", "bf16")
        return cls(
            vocab_size=int(d.get("vocab_size", 129280)),
            dim=int(d["dim"]),
            n_layers=n,
            n_heads=int(d["n_heads"]),
            head_dim=int(d.get("head_dim", 512)),
            rope_head_dim=int(d.get("rope_head_dim", 64)),
            q_lora_rank=int(d["q_lora_rank"]),
            o_groups=int(d["o_groups"]),
            o_lora_rank=int(d["o_lora_rank"]),
            window_size=int(d.get("window_size", 128)),
            compress_ratios=tuple(ratios[:n]),
            index_n_heads=int(d.get("index_n_heads", 64)),
            index_head_dim=int(d.get("index_head_dim", 128)),
            index_topk=int(d.get("index_topk", 512)),
            n_routed_experts=int(d["n_routed_experts"]),
            n_shared_experts=int(d.get("n_shared_experts", 1)),
            n_activated_experts=int(d["n_activated_experts"]),
            moe_inter_dim=int(d["moe_inter_dim"]),
            n_hash_layers=int(d.get("n_hash_layers", 0)),
            score_func=str(d.get("score_func", "sqrtsoftplus")),
            route_scale=float(d.get("route_scale", 1.0)),
            swiglu_limit=float(d.get("swiglu_limit", 10.0)),
            hc_mult=int(d.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(d.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(d.get("hc_eps", 1e-6)),
            norm_eps=float(d.get("norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            compress_rope_theta=float(d.get("compress_rope_theta", 160000.0)),
            rope_factor=float(d.get("rope_factor", 16.0)),
            original_seq_len=int(d.get("original_seq_len", 65536)),
            beta_fast=float(d.get("beta_fast", 32.0)),
            beta_slow=float(d.get("beta_slow", 1.0)),
            n_mtp_layers=0 if n_extra > 1 else int(d.get("n_mtp_layers", 1)),
            weight_dtype="fp8" if dtype == "fp8" else "bf16",
            expert_dtype=d.get("expert_dtype"),
            scale_fmt=d.get("scale_fmt"),
            name=name,
            extra={"dspark": n_extra > 1, "mtp_entries": n_extra},
        )

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        """Any of the three dialects: our own `to_dict`, HF config.json, or official ModelArgs."""
        if "model_type" in d or "hidden_size" in d:
            return cls.from_hf_dict(d, name=name)
        if "n_layers" in d and "dim" in d and "moe_inter_dim" in d and "n_heads" in d and "nope_head_dim" not in d:
            if "n_activated_experts" in d and "compress_ratios" in d and "route_scale" in d and "n_hash_layers" in d \
                    and "name" not in d:
                return cls.from_official_dict(d, name=name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        kw = dict(d)
        kw.setdefault("name", name)
        if "compress_ratios" in kw:
            kw["compress_ratios"] = tuple(kw["compress_ratios"])
        return cls(**kw)

    @classmethod
    def load(cls, name_or_path: str) -> "ModelConfig":
        """A preset name, a checkpoint directory (config.json or inference/config.json), or a JSON file."""
        if name_or_path in PRESET_NAMES:
            text = resources.files("batchv4").joinpath(f"presets/{name_or_path}.json").read_text()
            return cls.from_dict(json.loads(text), name=name_or_path)
        p = name_or_path
        if os.path.isdir(p):
            for cand in ("config.json", os.path.join("inference", "config.json")):
                if os.path.isfile(os.path.join(p, cand)):
                    return cls.from_dict(_read_json(os.path.join(p, cand)), name=os.path.basename(p.rstrip("/")))
            raise ConfigError(f"{p}: no config.json or inference/config.json in this directory")
        if os.path.isfile(p):
            return cls.from_dict(_read_json(p), name=os.path.splitext(os.path.basename(p))[0])
        raise ConfigError(f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESET_NAMES)}) "
                          f"and not a checkpoint directory or config file")


_HF_LAYER_TYPES = {"sliding_attention": "window", "compressed_sparse_attention": "csa",
                   "heavily_compressed_attention": "hca"}


def _refuse_non_v4(d: dict) -> None:
    mt = d.get("model_type")
    if mt is not None and mt != "deepseek_v4":
        hint = " (DeepSeek-V4.1 is a different architecture)" if str(mt).startswith("deepseek_v41") else ""
        raise ConfigError(f"model_type {mt!r} is not DeepSeek-V4{hint}; batchv4 runs model_type 'deepseek_v4'")


def _hf_ratios(d: dict, n: int) -> tuple[list[int], int]:
    if d.get("compress_ratios") is not None:
        r = [int(x) for x in d["compress_ratios"]]
        return r[:n], len(r) - n
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    rates.update(d.get("compress_rates") or {})
    if "compress_rate_hca" in d:
        rates["heavily_compressed_attention"] = int(d["compress_rate_hca"])
    if d.get("layer_types"):
        out = []
        for t in d["layer_types"][:n]:
            if t not in _HF_LAYER_TYPES:
                raise ConfigError(f"unknown layer type {t!r}")
            out.append(0 if t == "sliding_attention" else int(rates[t]))
        return out, 1
    return list(_default_ratios(n)), 1


def _default_ratios(n: int) -> tuple[int, ...]:
    # transformers' default schedule: two HCA layers, then CSA/HCA interleaved
    return tuple([128] * min(n, 2) + [4 if (i - 2) % 2 else 128 for i in range(2, n)])


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
