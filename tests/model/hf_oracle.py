"""The transformers==5.23.0 oracle: builds `DeepseekV4ForCausalLM` with the same config and weights
as one of our models (test-only)."""

from __future__ import annotations

import torch

from batchv4.config import HF_LAYER_TYPES, ModelConfig

_HF_LAYER_TYPE = {kind: hf for hf, kind in HF_LAYER_TYPES.items()}
_HF_DEFAULT_RATE = {"csa": 4, "hca": 128}

_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv": "kv_proj",
         "kv_norm": "kv_norm", "wo_a": "o_a_proj", "wo_b": "o_b_proj"}
_COMP = {"wkv": "kv_proj", "wgate": "gate_proj", "ape": "position_bias", "norm": "kv_norm"}
_SHARED = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def require_transformers():
    """transformers is pinned in the `test` extra: without it the run fails, it never skips."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("tests/model need transformers==5.23.0, the model's numerical oracle (pinned in the "
                          "'test' extra: pip install -e '.[test]')") from e
    transformers.logging.set_verbosity_error()
    return transformers


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV4Config

    rates = {k: cfg.ratios_of(k) for k in ("csa", "hca")}
    if any(len(r) > 1 for r in rates.values()):
        raise ValueError("transformers supports one ratio per layer kind")
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=1,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.n_activated_experts,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        sliding_window=cfg.window_size, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        rms_norm_eps=cfg.norm_eps, routed_scaling_factor=cfg.route_scale, swiglu_limit=cfg.swiglu_limit,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        layer_types=[_HF_LAYER_TYPE[cfg.layer_kind(i)] for i in range(cfg.n_layers)],
        compress_rates={_HF_LAYER_TYPE[k]: r[0] if r else _HF_DEFAULT_RATE[k] for k, r in rates.items()},
        rope_parameters={"rope_type": "yarn", "factor": cfg.rope_factor,
                         "original_max_position_embeddings": cfg.original_seq_len,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim,
        mlp_layer_types=["hash_moe"] * cfg.n_hash_layers + ["moe"] * (cfg.n_layers - cfg.n_hash_layers),
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, tie_word_embeddings=False,
    )


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("mtp."):
            continue
        p = k.split(".")
        if k == "embed.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "head.weight":
            out["lm_head.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif p[0].startswith("hc_head_"):
            out[f"model.hc_head.hc_{p[0][len('hc_head_'):]}"] = v
        elif p[0] == "layers":
            i, rest = p[1], p[2:]
            pre = f"model.layers.{i}."
            if rest[0].startswith(("hc_attn_", "hc_ffn_")):
                site, what = rest[0][3:].split("_")
                out[f"{pre}{site}_hc.{what}"] = v
            elif rest[0] == "attn_norm":
                out[pre + "input_layernorm.weight"] = v
            elif rest[0] == "ffn_norm":
                out[pre + "post_attention_layernorm.weight"] = v
            elif rest[0] == "attn":
                a = pre + "self_attn."
                if rest[1] == "attn_sink":
                    out[a + "sinks"] = v
                elif rest[1] in _ATTN:
                    out[a + _ATTN[rest[1]] + ".weight"] = v
                elif rest[1] == "compressor":
                    out[a + "compressor." + _COMP[rest[2]] + (".weight" if rest[2] != "ape" else "")] = v
                elif rest[1] == "indexer":
                    if rest[2] == "wq_b":
                        out[a + "compressor.indexer.q_b_proj.weight"] = v
                    elif rest[2] == "weights_proj":
                        out[a + "compressor.indexer.scorer.weights_proj.weight"] = v
                    else:
                        out[a + "compressor.indexer." + _COMP[rest[3]] + (".weight" if rest[3] != "ape" else "")] = v
                else:
                    raise KeyError(k)
            elif rest[0] == "ffn":
                m = pre + "mlp."
                if rest[1] == "gate":
                    name = {"weight": "weight", "bias": "e_score_correction_bias", "tid2eid": "tid2eid"}[rest[2]]
                    out[m + "gate." + name] = v
                elif rest[1] == "shared_experts":
                    out[m + "shared_experts." + _SHARED[rest[2]] + ".weight"] = v
                elif rest[1] == "experts":
                    stacked.setdefault(m, {})[rest[2]] = v
                else:
                    raise KeyError(k)
            else:
                raise KeyError(k)
        else:
            raise KeyError(k)
    for m, w in stacked.items():
        out[m + "experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        out[m + "experts.down_proj"] = w["w2"]
    return out


def hf_model_like(model) -> "torch.nn.Module":
    from transformers import DeepseekV4ForCausalLM

    hf = DeepseekV4ForCausalLM(hf_config(model.cfg)).float().eval()
    sd = to_hf_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m and "inv_freq" not in m]
    if missing or unexpected:
        raise KeyError(f"missing {missing[:5]} unexpected {unexpected[:5]}")
    return hf
