"""What a DeepSeek-V4 checkpoint contains: every tensor's name, shape and on-disk dtype, derived from a
ModelConfig, and the renaming between the name dialects.

Dialects: "official" (the reference module names, no `model.` prefix, one tensor per routed expert),
"hf" (transformers' `DeepseekV4ForCausalLM` names, experts stacked as `gate_up_proj`/`down_proj`,
no MTP), "hf-reverted" (what transformers' `save_pretrained` writes: `model.` + official names with a
few HF leftovers), and "ours" (official names with routed experts stacked per layer, as the
`Transformer` module holds them).

Owns: the per-tensor table of deepseek-v4.md §1.3 and the name maps. Does not own: reading or
writing files (see `checkpoint.py`, `checkpoint_writer.py`) or size reports (see `info.py`).
"""

from __future__ import annotations

import re
from typing import Iterator

from batchv4.config import ModelConfig

# roles of "ours" tensors: how each is stored on disk
LINEAR = "linear"   # FP8 block-scaled when weight_dtype == "fp8"
EXPERT = "expert"   # routed experts [E, out, in]: FP4 / FP8 / BF16 per expert_dtype
BF16 = "bf16"       # norms, compressor projections, indexer weights_proj, gate weight, embed, head
F32 = "f32"         # hc_*, attn_sink, ape, gate.bias
I64 = "i64"         # tid2eid

_F32_NAME = re.compile(r"(^|\.)(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|ape|gate\.bias)$")


def is_f32_tensor(name: str) -> bool:
    """True for tensors the reference keeps in float32 (official or ours name)."""
    return bool(_F32_NAME.search(name))


def expert_format(cfg: ModelConfig) -> str:
    """'fp4', 'fp8' or 'bf16': how routed experts are stored in this config's checkpoints."""
    return cfg.expert_dtype or cfg.weight_dtype


def _block(cfg: ModelConfig, p: str, kind: str, ratio: int, hash_layer: bool) -> Iterator[tuple[str, tuple, str]]:
    """One block's tensors; kind "window" (ratio 0), "csa" or "hca"."""
    d, hc, hd = cfg.dim, cfg.hc_mult, cfg.head_dim
    mix = hc * (hc + 2)
    for site in ("attn", "ffn"):
        yield f"{p}hc_{site}_fn", (mix, hc * d), F32
        yield f"{p}hc_{site}_base", (mix,), F32
        yield f"{p}hc_{site}_scale", (3,), F32
    yield f"{p}attn_norm.weight", (d,), BF16
    yield f"{p}ffn_norm.weight", (d,), BF16
    a = f"{p}attn."
    yield f"{a}attn_sink", (cfg.n_heads,), F32
    yield f"{a}wq_a.weight", (cfg.q_lora_rank, d), LINEAR
    yield f"{a}q_norm.weight", (cfg.q_lora_rank,), BF16
    yield f"{a}wq_b.weight", (cfg.n_heads * hd, cfg.q_lora_rank), LINEAR
    yield f"{a}wkv.weight", (hd, d), LINEAR
    yield f"{a}kv_norm.weight", (hd,), BF16
    yield f"{a}wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * hd // cfg.o_groups), LINEAR
    yield f"{a}wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank), LINEAR
    if kind != "window":
        yield from _compressor(cfg, f"{a}compressor.", ratio, hd, overlap=kind == "csa")
    if kind == "csa":
        ix = f"{a}indexer."
        yield f"{ix}wq_b.weight", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), LINEAR
        yield f"{ix}weights_proj.weight", (cfg.index_n_heads, d), BF16
        yield from _compressor(cfg, f"{ix}compressor.", ratio, cfg.index_head_dim, overlap=True)
    f = f"{p}ffn."
    e, inter = cfg.n_routed_experts, cfg.moe_inter_dim
    yield f"{f}gate.weight", (e, d), BF16
    if hash_layer:
        yield f"{f}gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), I64
    else:
        yield f"{f}gate.bias", (e,), F32
    yield f"{f}experts.w1", (e, inter, d), EXPERT
    yield f"{f}experts.w2", (e, d, inter), EXPERT
    yield f"{f}experts.w3", (e, inter, d), EXPERT
    if cfg.n_shared_experts:
        si = inter * cfg.n_shared_experts
        yield f"{f}shared_experts.w1.weight", (si, d), LINEAR
        yield f"{f}shared_experts.w2.weight", (d, si), LINEAR
        yield f"{f}shared_experts.w3.weight", (si, d), LINEAR


def _compressor(cfg: ModelConfig, c: str, ratio: int, width: int, overlap: bool) -> Iterator[tuple[str, tuple, str]]:
    halves = 2 if overlap else 1  # CSA projects to two overlapping halves
    yield f"{c}ape", (ratio, halves * width), F32
    yield f"{c}wkv.weight", (halves * width, cfg.dim), BF16
    yield f"{c}wgate.weight", (halves * width, cfg.dim), BF16
    yield f"{c}norm.weight", (width,), BF16


def model_tensors(cfg: ModelConfig, layers: list[int] | None = None, mtp: bool = True
                  ) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """("ours" name, logical shape, role) for every stored tensor of the model (no scales).

    `layers` restricts the main blocks (default all); `mtp=False` drops the MTP block.
    """
    d, hc = cfg.dim, cfg.hc_mult
    yield "embed.weight", (cfg.vocab_size, d), BF16
    for i in (range(cfg.n_layers) if layers is None else layers):
        yield from _block(cfg, f"layers.{i}.", cfg.layer_kind(i), cfg.compress_ratios[i], cfg.is_hash_layer(i))
    yield "norm.weight", (d,), BF16
    yield "head.weight", (cfg.vocab_size, d), BF16
    yield "hc_head_fn", (hc, hc * d), F32
    yield "hc_head_base", (hc,), F32
    yield "hc_head_scale", (1,), F32
    if mtp:
        for j in range(cfg.n_mtp_layers):
            p = f"mtp.{j}."
            yield from _block(cfg, p, "window", 0, False)
            yield f"{p}e_proj.weight", (d, d), LINEAR
            yield f"{p}h_proj.weight", (d, d), LINEAR
            for n in ("enorm", "hnorm", "norm"):
                yield f"{p}{n}.weight", (d,), BF16
            yield f"{p}hc_head_fn", (hc, hc * d), F32
            yield f"{p}hc_head_base", (hc,), F32
            yield f"{p}hc_head_scale", (1,), F32


def _scale_dtype(cfg: ModelConfig) -> str:
    return "F8_E8M0" if (cfg.scale_fmt or "").lower() in ("ue8m0", "e8m0") else "F32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expected_inventory(cfg: ModelConfig, layout: str = "official") -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of a checkpoint of `cfg`: name -> (shape, safetensors dtype string).

    layout "official": the released files (FP8 linears with `.scale`, FP4/FP8 per-expert tensors,
    MTP included, `mtp.0.embed/head` absent; FP8 experts, as in -Base checkpoints, carry F32 block
    scales). With weight_dtype "bf16" linears and experts are BF16 without scales, while the F32 and
    I64 tensors keep their dtypes. layout "hf": transformers' names, unquantized, experts stacked,
    no MTP.
    """
    if layout not in ("official", "hf"):
        raise ValueError(f"unknown checkpoint layout {layout!r} (official or hf)")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    plain = {BF16: "BF16", F32: "F32", I64: "I64"}
    if layout == "hf":
        for name, shape, role in model_tensors(cfg, mtp=False):
            dt = plain.get(role, "BF16")
            if name.endswith("experts.w3"):
                continue
            if name.endswith("experts.w1"):
                e, i, dd = shape
                out[ours_to_hf(name.replace("experts.w1", "experts.gate_up_proj"))] = ((e, 2 * i, dd), dt)
                continue
            out[ours_to_hf(name)] = (shape, dt)
        return out
    lin_fp8 = cfg.weight_dtype == "fp8"
    efmt = expert_format(cfg)
    for name, shape, role in model_tensors(cfg):
        if role in plain:
            out[name] = (shape, plain[role])
        elif role == LINEAR:
            if lin_fp8:
                out[name] = (shape, "F8_E4M3")
                out[name[: -len("weight")] + "scale"] = ((_cdiv(shape[0], 128), _cdiv(shape[1], 128)),
                                                         _scale_dtype(cfg))
            else:
                out[name] = (shape, "BF16")
        else:  # routed experts, one tensor (+ scale) per expert
            e, o, i = shape
            base, w = name.rsplit(".", 1)
            for k in range(e):
                stem = f"{base}.{k}.{w}"
                if efmt == "fp4":
                    out[f"{stem}.weight"] = ((o, i // 2), "I8")
                    out[f"{stem}.scale"] = ((o, i // 32), "F8_E8M0")
                elif efmt == "fp8":
                    out[f"{stem}.weight"] = ((o, i), "F8_E4M3")
                    out[f"{stem}.scale"] = ((_cdiv(o, 128), _cdiv(i, 128)), "F32")
                else:
                    out[f"{stem}.weight"] = ((o, i), "BF16")
    return out


# ---- name dialects -------------------------------------------------------------------------------

# (ours suffix inside a block, transformers suffix); gate_up_proj is handled by the checkpoint code
_BLOCK_HF = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.experts.gate_up_proj", "mlp.experts.gate_up_proj"),
    ("ffn.experts.w2", "mlp.experts.down_proj"),
)
_TOP_HF = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
)
_OURS_TO_HF_BLOCK = dict(_BLOCK_HF)
_HF_TO_OURS_BLOCK = {h: o for o, h in _BLOCK_HF}
_OURS_TO_HF_TOP = dict(_TOP_HF)
_HF_TO_OURS_TOP = {h: o for o, h in _TOP_HF}
_LAYER = re.compile(r"^(layers\.\d+\.)(.*)$")
_HF_LAYER = re.compile(r"^model\.(layers\.\d+\.)(.*)$")


def ours_to_hf(name: str) -> str | None:
    """An "ours" name (stacked experts; `ffn.experts.gate_up_proj` for the w1|w3 pair) -> its
    transformers name, or None when transformers has no such tensor (MTP, single w1/w3)."""
    if name in _OURS_TO_HF_TOP:
        return _OURS_TO_HF_TOP[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _OURS_TO_HF_BLOCK:
        return f"model.{m.group(1)}{_OURS_TO_HF_BLOCK[m.group(2)]}"
    return None


def hf_to_ours(name: str) -> str | None:
    """A transformers name -> its "ours" name (`…ffn.experts.gate_up_proj` for the stacked pair), or None."""
    if name in _HF_TO_OURS_TOP:
        return _HF_TO_OURS_TOP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_TO_OURS_BLOCK:
        return m.group(1) + _HF_TO_OURS_BLOCK[m.group(2)]
    return None


_REVERTED_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                 "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
                 "model.hc_head.hc_scale": "hc_head_scale", "head.weight": "head.weight",
                 "lm_head.weight": "head.weight"}
_REVERTED_KV_NORM = re.compile(r"^(layers\.\d+\.attn\.)norm\.weight$")


def reverted_to_official(name: str) -> str:
    """transformers' half-reverted `save_pretrained` name -> the official name."""
    if name in _REVERTED_TOP:
        return _REVERTED_TOP[name]
    n = name[len("model."):] if name.startswith("model.") else name
    return _REVERTED_KV_NORM.sub(r"\1kv_norm.weight", n)


def detect_layout(names: list[str]) -> str:
    """'hf', 'hf-reverted' or 'official' from a checkpoint's tensor names."""
    if any(".self_attn." in n or ".mlp." in n or n == "lm_head.weight" for n in names):
        return "hf"
    if any(n.startswith("model.") for n in names):
        return "hf-reverted"
    return "official"
