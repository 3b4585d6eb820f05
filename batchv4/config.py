"""ModelConfig: the DeepSeek-V4 hyper-parameters, read from presets, HF `config.json` or the official
`inference/config.json`.

Owns: field names, the two file dialects (told apart by what the file says it is: transformers'
config.json names its `model_type` / `architectures`, DeepSeek's inference config uses the
`ModelArgs` names `dim`, `n_layers`, ...), each layer's kind as the checkpoint's own config states
it, validation, and refusal of non-V4 configs. Does not own: any torch code, weights, or cache
sizing (see `batchv4.model.forward_batch`). Never imports torch.
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

LAYER_KINDS = ("window", "csa", "hca")
# transformers' `layer_types` names -> our kinds (the checkpoint writer writes the inverse)
HF_LAYER_TYPES = {"sliding_attention": "window", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
# DeepSeek's inference code derives a layer's kind from its ratio alone: 0 window-only, this value
# CSA, any other HCA. Only configs without explicit kinds are read with that rule.
OFFICIAL_CSA_RATIO = 4
# transformers' default `compress_rates`, for HF configs that name kinds but no ratios
_HF_DEFAULT_RATES = {"window": 0, "csa": 4, "hca": 128}
# keys that identify DeepSeek's inference config (ModelArgs); our presets use the same names
_OFFICIAL_KEYS = frozenset({"dim", "n_layers", "n_heads", "moe_inter_dim"})


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
    # attention schedule, one entry per main layer: its kind ("window", "csa" or "hca") and its
    # compression ratio (tokens per compressed entry, 0 for window-only layers). Either may be
    # left empty: kinds are then derived from ratios by the official rule, ratios from kinds by
    # transformers' defaults (CSA 4, HCA 128); both empty gives transformers' default schedule.
    window_size: int = 128
    compress_ratios: tuple[int, ...] = ()
    layer_kinds: tuple[str, ...] = ()
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
        kinds = tuple(str(k) for k in self.layer_kinds)
        ratios = tuple(int(r) for r in self.compress_ratios)
        if not kinds and not ratios:
            kinds = _default_kinds(self.n_layers)
        if not ratios:
            ratios = tuple(_HF_DEFAULT_RATES.get(k, -1) for k in kinds)
        if not kinds:
            kinds = kinds_from_ratios(ratios)
        object.__setattr__(self, "compress_ratios", ratios)
        object.__setattr__(self, "layer_kinds", kinds)
        self.validate()

    # ---- derived ----------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def layer_kind(self, i: int) -> str:
        """'window', 'csa' or 'hca' for main layer i."""
        return self.layer_kinds[i]

    def is_hash_layer(self, i: int) -> bool:
        return i < self.n_hash_layers

    def ratios_of(self, kind: str) -> tuple[int, ...]:
        """The distinct compression ratios of the main layers of `kind`, ascending."""
        return tuple(sorted({r for r, k in zip(self.compress_ratios, self.layer_kinds) if k == kind}))

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Our own form: the official `ModelArgs` names plus our fields; `from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["compress_ratios"] = list(self.compress_ratios)
        d["layer_kinds"] = list(self.layer_kinds)
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
        need(len(self.layer_kinds) == self.n_layers,
             f"layer_kinds has {len(self.layer_kinds)} entries for {self.n_layers} layers")
        bad = sorted({k for k in self.layer_kinds if k not in LAYER_KINDS})
        need(not bad, f"unknown layer kinds {bad} (each layer is 'window', 'csa' or 'hca')")
        for i, (kind, r) in enumerate(zip(self.layer_kinds, self.compress_ratios)):
            # the CSA overlap, the indexer and HCA pooling work for any ratio >= 1 (the pooling and
            # visibility math is written in terms of the ratio), so only the pairing is checked
            need(r >= 0, f"layer {i}: compress ratio {r} must be >= 0")
            need((kind == "window") == (r == 0),
                 f"layer {i} is a {kind} layer with compress ratio {r}: window-only layers have "
                 f"ratio 0, csa and hca layers a ratio >= 1")
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
        ratios, kinds, n_extra = _hf_schedule(d, n)
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
            layer_kinds=tuple(kinds),
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
        """DeepSeek's `inference/config.json` (ModelArgs names), and our own `to_dict` form, which
        uses the same names plus our fields. Keys neither knows are ignored, as the reference does
        with the serving options (max_batch_size, ...) such files carry."""
        n = int(d["n_layers"])
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("extra", "compress_ratios", "layer_kinds"):
                cast = _CAST.get(str(f.type))
                kw[f.name] = cast(d[f.name]) if cast is not None and d[f.name] is not None else d[f.name]
        raw = [int(r) for r in d.get("compress_ratios") or ()]
        n_extra = len(raw) - n if raw else 0   # the official list has one more entry per MTP block
        kinds = tuple(d.get("layer_kinds") or ())
        if not kinds and raw:
            # `csa_ratio`: the rule's ratio in dicts from our earlier `to_dict`, which had that field
            kinds = kinds_from_ratios(raw[:n], int(d.get("csa_ratio", OFFICIAL_CSA_RATIO)))
        if "weight_dtype" not in d:
            kw["weight_dtype"] = "fp8" if d.get("dtype", "bf16") == "fp8" else "bf16"
        kw.setdefault("n_hash_layers", 0)     # ModelArgs' defaults where they differ from ours
        kw.setdefault("route_scale", 1.0)
        kw["n_mtp_layers"] = 0 if n_extra > 1 else int(d.get("n_mtp_layers", 1))
        kw["name"] = str(d.get("name", name))
        return cls(compress_ratios=tuple(raw[:n]), layer_kinds=kinds, extra={"dspark": n_extra > 1,
                   "mtp_entries": n_extra}, **kw)

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        """A transformers config.json (it names its model_type / architectures), or DeepSeek's
        inference config and our own `to_dict` (ModelArgs names); anything else is refused."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config is a JSON object, got {type(d).__name__}")
        if "model_type" in d or "architectures" in d:
            return cls.from_hf_dict(d, name=name)
        if _OFFICIAL_KEYS <= d.keys():
            return cls.from_official_dict(d, name=name)
        raise ConfigError("not a DeepSeek-V4 config: neither a transformers config.json (no model_type or "
                          "architectures) nor DeepSeek's inference config (needs " + ", ".join(sorted(_OFFICIAL_KEYS))
                          + ")")

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
                    return _from_file(cls, os.path.join(p, cand), os.path.basename(p.rstrip("/")))
            raise ConfigError(f"{p}: no config.json or inference/config.json in this directory")
        if os.path.isfile(p):
            return _from_file(cls, p, os.path.splitext(os.path.basename(p))[0])
        raise ConfigError(f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESET_NAMES)}) "
                          f"and not a checkpoint directory or config file")


_CAST = {"int": int, "float": float, "str": str}


def kinds_from_ratios(ratios, csa_ratio: int = OFFICIAL_CSA_RATIO) -> tuple[str, ...]:
    """The official rule for configs that state only ratios: 0 window-only, `csa_ratio` CSA, else HCA."""
    return tuple("window" if r == 0 else "csa" if r == csa_ratio else "hca" for r in ratios)


def _from_file(cls, path: str, name: str) -> ModelConfig:
    try:
        return cls.from_dict(_read_json(path), name=name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _refuse_non_v4(d: dict) -> None:
    mt = d.get("model_type")
    if mt is not None and mt != "deepseek_v4":
        hint = " (DeepSeek-V4.1 is a different architecture)" if str(mt).startswith("deepseek_v41") else ""
        raise ConfigError(f"model_type {mt!r} is not DeepSeek-V4{hint}; batchv4 runs model_type 'deepseek_v4'")
    archs = d.get("architectures") or []
    if mt is None and "DeepseekV4ForCausalLM" not in archs:
        raise ConfigError(f"architectures {archs} is not DeepSeek-V4; batchv4 runs DeepseekV4ForCausalLM")


def _hf_schedule(d: dict, n: int) -> tuple[list[int], list[str], int]:
    """(ratio per main layer, kind per main layer, entries of compress_ratios past the main layers).

    Kinds come from `layer_types` when the file has them (transformers' rule), else from
    `compress_ratios` by the official rule; ratios from `compress_ratios` when present (it also
    counts the MTP / DSpark entries), else from the kinds and `compress_rates`."""
    rates = dict(_HF_DEFAULT_RATES)
    for hf, kind in HF_LAYER_TYPES.items():
        if hf in (d.get("compress_rates") or {}):
            rates[kind] = int(d["compress_rates"][hf])
    for key, kind in (("compress_rate_csa", "csa"), ("compress_rate_hca", "hca")):
        if key in d:
            rates[kind] = int(d[key])
    kinds = None
    if d.get("layer_types"):
        types = list(d["layer_types"])
        if len(types) < n:
            raise ConfigError(f"layer_types has {len(types)} entries for {n} layers")
        for t in types[:n]:
            if t not in HF_LAYER_TYPES:
                raise ConfigError(f"unknown layer type {t!r} in layer_types ({', '.join(HF_LAYER_TYPES)})")
        kinds = [HF_LAYER_TYPES[t] for t in types[:n]]
    if d.get("compress_ratios") is not None:
        raw = [int(x) for x in d["compress_ratios"]]
        ratios, n_extra = raw[:n], len(raw) - n
    else:
        kinds = kinds if kinds is not None else list(_default_kinds(n))
        ratios, n_extra = [rates[k] for k in kinds], 1
    if kinds is None:
        kinds = list(kinds_from_ratios(ratios, rates["csa"]))
    return ratios, kinds, n_extra


def _default_kinds(n: int) -> tuple[str, ...]:
    # transformers' default schedule: two HCA layers, then HCA/CSA interleaved
    return tuple(["hca"] * min(n, 2) + ["hca" if (i - 2) % 2 == 0 else "csa" for i in range(2, n)])


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e})") from None
