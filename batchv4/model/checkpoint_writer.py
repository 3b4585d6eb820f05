"""Writing DeepSeek-V4 checkpoints from a float state dict: the official layout (per-expert tensors,
optionally FP8 linears and FP4 or FP8 experts, as the released files are) and the transformers
layout. Used to build test fixtures and small local models.

Owns: quantizing on the way out, the HF-format `config.json` written from a ModelConfig, sharding
and `model.safetensors.index.json`. Does not own: reading (`checkpoint.py`) or the number formats
(`quant.py`).
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file
from torch import nn

from batchv4.config import HF_LAYER_TYPES, ModelConfig
from batchv4.model import quant
from batchv4.model.checkpoint_files import INDEX_FILE
from batchv4.model.inventory import BF16, EXPERT, F32, I64, LINEAR, model_tensors, ours_to_hf

_MTP_ALIAS = re.compile(r"^mtp\.\d+\.(embed|head)\.")
_HF_LAYER_TYPE = {kind: hf for hf, kind in HF_LAYER_TYPES.items()}


def hf_config_dict(cfg: ModelConfig, *, fp8: bool = False, expert_dtype: str | None = None,
                   scale_format: str = "e8m0") -> dict:
    """The HF `config.json` of `cfg` (official keys, plus transformers' explicit schedules: each
    layer's kind in `layer_types`, so kinds and ratios that differ from the official ratio rule
    survive), describing the quantization actually written."""
    d = {
        "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_head_dim, "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "moe_intermediate_size": cfg.moe_inter_dim,
        "scoring_func": cfg.score_func, "routed_scaling_factor": cfg.route_scale, "norm_topk_prob": True,
        "topk_method": "noaux_tc", "num_hash_layers": cfg.n_hash_layers, "swiglu_limit": cfg.swiglu_limit,
        "sliding_window": cfg.window_size,
        "compress_ratios": list(cfg.compress_ratios) + [0] * cfg.n_mtp_layers,
        "layer_types": [_HF_LAYER_TYPE[cfg.layer_kind(i)] for i in range(cfg.n_layers)],
        "mlp_layer_types": ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.n_layers)],
        "compress_rope_theta": cfg.compress_rope_theta, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "yarn", "factor": cfg.rope_factor,
                         "original_max_position_embeddings": cfg.original_seq_len,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        "max_position_embeddings": cfg.max_position_embeddings,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": "bfloat16",
    }
    # transformers keeps one ratio per kind; with more, it cannot run the model (we still can)
    rates = {k: cfg.ratios_of(k) for k in ("csa", "hca")}
    if all(len(r) <= 1 for r in rates.values()) and any(rates.values()):
        d["compress_rates"] = {_HF_LAYER_TYPE[k]: r[0] for k, r in rates.items() if r}
    if fp8:
        d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}
        if scale_format == "e8m0":
            d["quantization_config"]["scale_fmt"] = "ue8m0"
    if expert_dtype is not None:
        d["expert_dtype"] = expert_dtype
    return d


def _float_state(state_dict_or_model) -> dict[str, torch.Tensor]:
    sd = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else dict(state_dict_or_model)
    out = {}
    for name, t in sd.items():
        if t is None or _MTP_ALIAS.match(name):
            continue
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device; write a materialized model")
        if t.dtype in (torch.float8_e4m3fn, torch.uint8) or name.endswith(("_scale", ".scale")) and \
                not name.endswith(("hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
            raise ValueError(f"{name}: pass a dequantized (float) state dict; the writer quantizes itself")
        out[name] = t.detach().cpu()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], cfg_dict: dict, path: str, shard_max_bytes: int) -> list[str]:
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nb
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        files.append(os.path.join(path, fname))
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f, indent=1)
    return files


def save_official_checkpoint(state_dict_or_model, cfg: ModelConfig, path: str, *, fp8: bool = False,
                             fp4_experts: bool = False, fp8_experts: bool = False, scale_format: str = "e8m0",
                             float_dtype: torch.dtype = torch.bfloat16, shard_max_bytes: int = 1 << 20
                             ) -> list[str]:
    """Write a float "ours" state dict (stacked experts) as an official-layout checkpoint directory.

    fp8: non-expert linears as F8_E4M3 + 128x128 block scales (`scale_format` "e8m0" or "f32");
    fp4_experts: routed experts as packed I8 + per-32 e8m0 scales; fp8_experts: experts as FP8 with
    block scales (the -Base format). Other tensors keep their role's dtype (F32, I64, or `float_dtype`);
    names the inventory does not know are written unchanged. Returns the shard paths.
    """
    if fp4_experts and fp8_experts:
        raise ValueError("choose at most one of fp4_experts and fp8_experts")
    roles = {n: r for n, _, r in model_tensors(cfg)}
    out: dict[str, torch.Tensor] = {}
    for name, t in _float_state(state_dict_or_model).items():
        role = roles.get(name)
        if role == EXPERT:
            base, w = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                stem = f"{base}.{e}.{w}"
                if fp4_experts:
                    out[f"{stem}.weight"], out[f"{stem}.scale"] = quant.quant_fp4(t[e])
                elif fp8_experts:
                    out[f"{stem}.weight"], out[f"{stem}.scale"] = quant.quant_fp8_block(t[e], scale_format=scale_format)
                else:
                    out[f"{stem}.weight"] = t[e].to(float_dtype)
        elif role == LINEAR and fp8:
            out[name], out[name[: -len("weight")] + "scale"] = quant.quant_fp8_block(t, scale_format=scale_format)
        else:
            out[name] = _role_cast(t, role, float_dtype)
    expert_dtype = "fp4" if fp4_experts else "fp8" if fp8_experts else "bf16" if fp8 else None
    return _write_shards(out, hf_config_dict(cfg, fp8=fp8, expert_dtype=expert_dtype, scale_format=scale_format),
                         path, shard_max_bytes)


def _role_cast(t: torch.Tensor, role: str | None, float_dtype: torch.dtype) -> torch.Tensor:
    if role == F32:
        return t.float()
    if role == I64:
        return t.long()
    if role in (BF16, LINEAR, EXPERT):
        return t.to(float_dtype)
    return t


def save_hf_checkpoint(state_dict_or_model, cfg: ModelConfig, path: str, *,
                       float_dtype: torch.dtype = torch.bfloat16, shard_max_bytes: int = 1 << 20) -> list[str]:
    """Write a float "ours" state dict in transformers' layout (`model.layers.N.self_attn...`, experts
    as `gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I]); MTP tensors are dropped, as in
    transformers. Returns the shard paths."""
    roles = {n: r for n, _, r in model_tensors(cfg)}
    sd = _float_state(state_dict_or_model)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        if name.endswith("ffn.experts.w3"):
            continue
        if name.endswith("ffn.experts.w1"):
            t = torch.cat([t, sd[name[:-2] + "w3"]], dim=1)
            name = name[:-2] + "gate_up_proj"
        hf = ours_to_hf(name)
        if hf is None:
            raise ValueError(f"{name} has no transformers name")
        out[hf] = _role_cast(t, roles.get(name, EXPERT if "experts" in name else None), float_dtype)
    return _write_shards(out, hf_config_dict(cfg), path, shard_max_bytes)
