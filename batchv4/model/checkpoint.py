"""Loading DeepSeek-V4 safetensors checkpoints into a `Transformer` built on the meta device.

Owns: reading shard headers, recognising the layout (official, transformers, transformers'
half-reverted `save_pretrained` output), matching every checkpoint tensor to a model parameter
(per-expert tensors into slices of the stacked expert weights; transformers' `gate_up_proj` split
into w1 and w3), validating names and shapes before any data is read, and materializing tensors one
at a time — dequantized to the requested dtype or kept quantized (raw weight + float32 scale).
Loading by rank (`expert_shard=(rank, world)`): only that rank's routed experts are read, plus
every replicated tensor; the other ranks' expert tensors are never touched.
Does not own: the tensor inventory and name maps (`inventory.py`), the number formats
(`quant.py`), or writing checkpoints (`checkpoint_writer.py`).

Safetensors are read through `safe_open` only (never pickle), one tensor at a time, so the extra
host memory is about one tensor (plus the mapped pages of at most two open shards), not the model.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from batchv4.config import ConfigError, ModelConfig
from batchv4.model import quant
from batchv4.model.checkpoint_files import CheckpointError, ShardReader, TensorInfo, read_headers
from batchv4.model.inventory import (detect_layout, expected_inventory, hf_to_ours, is_f32_tensor,
                                     ours_to_hf, reverted_to_official)
from batchv4.model.checkpoint_writer import save_hf_checkpoint, save_official_checkpoint

__all__ = ["CheckpointError", "LoadReport", "assign_tensor", "expected_inventory", "load_checkpoint",
           "save_hf_checkpoint", "save_official_checkpoint"]

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
_STACKED = re.compile(r"\.ffn\.experts\.w[123]$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_SCALE_DTYPES = ("F8_E8M0", "U8", "F32", "BF16", "F16")


@dataclass
class LoadReport:
    layout: str
    files: int
    tensors_read: int = 0
    bytes_read: int = 0
    skipped: list[str] = field(default_factory=list)
    other_ranks_expert_tensors: int = 0    # expert tensors (weights and scales) left to other ranks


@dataclass
class _Piece:
    """One checkpoint weight (and its scale sidecar) destined for a model tensor or one slice of it."""
    weight: TensorInfo
    scale: TensorInfo | None = None
    rows: tuple[int, int] | None = None    # a stacked [E, ...] tensor of which this rank reads rows lo:hi


@dataclass
class _Target:
    name: str                      # "ours" name in the model
    shape: tuple[int, ...]         # logical (dequantized) shape
    pieces: dict = field(default_factory=dict)   # slot -> _Piece; slot None = whole tensor


def assign_tensor(module: nn.Module, name: str, tensor: torch.Tensor | None, *, create: bool = False) -> None:
    """Replace parameter or buffer `name` of `module` (meta or not) by `tensor`.

    Parameters become `nn.Parameter(tensor, requires_grad=False)`; buffers are replaced as they are
    (None clears a buffer slot). With `create`, a missing name is registered as a buffer.
    """
    path, _, leaf = name.rpartition(".")
    try:
        sub = module.get_submodule(path) if path else module
    except AttributeError:
        raise CheckpointError(f"{name}: the model has no module {path!r}") from None
    if leaf in sub._parameters:
        sub._parameters[leaf] = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
    elif leaf in sub._buffers:
        sub._buffers[leaf] = tensor
    elif create:
        sub.register_buffer(leaf, tensor)
    else:
        raise CheckpointError(f"{name}: no such parameter or buffer in the model")


def _scale_name(weight_name: str) -> str:
    """Model name of the float32 scale that goes with a quantized weight."""
    if _STACKED.search(weight_name):
        return weight_name + "_scale"
    return weight_name[: -len("weight")] + "scale"


def _model_targets(model: nn.Module) -> dict[str, _Target]:
    """Main tensors of the model (name -> logical shape); scale slots and aliases excluded."""
    sd = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    targets: dict[str, _Target] = {}
    for name, t in sd.items():
        if id(t) in seen:  # a shared module (e.g. MTP's embed/head): loaded through its first name
            continue
        seen[id(t)] = name
        if name.endswith("_scale") and _STACKED.search(name[: -len("_scale")]) or \
                name.endswith(".scale") and name[: -len("scale")] + "weight" in sd:
            continue  # filled together with its weight
        shape = tuple(t.shape)
        if _STACKED.search(name) and t.dtype in (torch.uint8, torch.int8):
            shape = (*shape[:-1], shape[-1] * 2)  # packed FP4 in the model: two values per byte
        targets[name] = _Target(name, shape)
    return targets


def _layer_map(targets: dict[str, _Target], layers: list[int] | None) -> dict[int, int] | None:
    """Checkpoint layer index -> model layer index (None: every layer maps to itself)."""
    if layers is None:
        return None
    ids = sorted({int(m.group(1)) for n in targets if (m := _LAYER.match(n))})
    want = sorted(set(int(i) for i in layers))
    if ids == want:
        return {i: i for i in want}
    if ids == list(range(len(want))):
        return {i: k for k, i in enumerate(want)}
    raise CheckpointError(f"layers={want} but the model holds layers {ids}; build it with the same layers")


def _ours_name(key: str, layout: str) -> tuple[str | None, object, str]:
    """Checkpoint key -> ("ours" weight name or None, slot, 'weight' | 'scale')."""
    if layout == "hf":
        if (name := hf_to_ours(key)) is not None:
            return name, None, "weight"
        for suffix in (".weight_scale_inv", ".scale"):
            if key.endswith(suffix):
                return hf_to_ours(key[: -len(suffix)] + ".weight"), None, "scale"
        return None, None, "weight"
    name = reverted_to_official(key) if layout == "hf-reverted" else key
    m = _EXPERT.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2)), m.group(4)
    if name.endswith(".scale"):
        return name[: -len("scale")] + "weight", None, "scale"
    return name, None, "weight"


def _ckpt_name(target: str, slot, layout: str) -> str:
    """How a missing model tensor (or expert slice) is called in this checkpoint's layout."""
    if layout == "hf":
        return ours_to_hf(target.replace("experts.w1", "experts.gate_up_proj")
                          .replace("experts.w3", "experts.gate_up_proj")) or target
    if slot is not None:
        base, w = target.rsplit(".", 1)
        return f"{base}.{slot}.{w}.weight"
    return target


def _piece_problem(p: _Piece, shape: tuple[int, ...]) -> str | None:
    """Why a checkpoint tensor cannot fill a model tensor of logical `shape` (None when it can)."""
    w, s = p.weight, p.scale
    got = tuple(w.shape)
    if w.dtype in ("I8", "U8") and len(shape) >= 1 and got == (*shape[:-1], shape[-1] // 2) and shape[-1] % 32 == 0:
        want_s = (*shape[:-1], shape[-1] // 32)  # packed FP4 with per-32 scales
    elif w.dtype == "F8_E4M3" and got == shape and len(shape) == 2:
        want_s = (-(-shape[0] // 128), -(-shape[1] // 128))
    elif got == shape and (w.dtype in _FLOAT_DTYPES or w.dtype in ("I64", "I32")):
        return None if s is None else f"{s.name}: a scale for the unquantized {w.name}"
    else:
        return f"{w.name}: expected {shape}, got {got} {w.dtype}"
    if s is None:
        return f"{w.name}: quantized ({w.dtype}) without its scale tensor"
    if tuple(s.shape) != want_s or s.dtype not in _SCALE_DTYPES:
        return f"{s.name}: expected scale {want_s}, got {tuple(s.shape)} {s.dtype}"
    return None


def _checkpoint_cfg(path: str, model: nn.Module) -> ModelConfig | None:
    """The checkpoint directory's own config when it has a readable one, else the model's."""
    if os.path.isdir(path):
        try:
            return ModelConfig.load(path)
        except (ConfigError, OSError, ValueError, KeyError, TypeError):
            pass
    cfg = getattr(model, "cfg", None)
    return cfg if isinstance(cfg, ModelConfig) else None


def _plan(model: nn.Module, infos: dict[str, TensorInfo], layout: str, layers: list[int] | None,
          strict: bool, dspark: bool, report: LoadReport, experts: tuple[int, int] | None = None
          ) -> tuple[dict[str, _Target], set[str]]:
    """Match checkpoint tensors to model tensors; raise on missing, unexpected or misshapen ones.
    Returns the targets and the model names deliberately left unloaded (a skipped draft module)."""
    targets = _model_targets(model)
    lmap = _layer_map(targets, layers)
    unexpected: list[str] = []
    mtp_bad: list[str] = []
    mtp_keys = []
    scales: dict[tuple[str, object], TensorInfo] = {}
    for key, info in infos.items():
        name, slot, part = _ours_name(key, layout)
        if name is None:
            unexpected.append(key)
            continue
        m = _LAYER.match(name)
        if m and lmap is not None:
            if int(m.group(1)) not in lmap:
                report.skipped.append(key)
                continue
            name = f"layers.{lmap[int(m.group(1))]}.{m.group(2)}"
        is_mtp = name.startswith("mtp.")
        if is_mtp:
            mtp_keys.append(key)
        if experts is not None and isinstance(slot, int):      # global expert id -> this rank's slot
            if not experts[0] <= slot < experts[1]:
                report.other_ranks_expert_tensors += 1
                continue
            slot -= experts[0]
        stacked = slot is None and (_STACKED.search(name) or name.endswith("experts.gate_up_proj"))
        if experts is not None and stacked and info.shape:
            # transformers stacks a layer's experts: this rank reads its rows of the stack
            info = replace(info, shape=(experts[1] - experts[0], *info.shape[1:]))
        if part == "scale":
            scales[(name, slot)] = info
            continue
        rows = experts if experts is not None and stacked else None
        if name.endswith("experts.gate_up_proj"):  # transformers: w1 rows then w3 rows
            w1, w3 = name[: -len("gate_up_proj")] + "w1", name[: -len("gate_up_proj")] + "w3"
            if w1 in targets and w3 in targets:
                targets[w1].pieces["gate_up"] = _Piece(info, rows=rows)
                continue
        t = targets.get(name)
        if t is None or (slot is not None and not (_STACKED.search(name) and 0 <= slot < t.shape[0])):
            (mtp_bad if is_mtp else unexpected).append(key)
            continue
        t.pieces[slot] = _Piece(info, rows=rows)
    for (name, slot), info in scales.items():
        t = targets.get(name)
        if t is not None and slot in t.pieces:
            t.pieces[slot].scale = info
        else:
            (mtp_bad if name.startswith("mtp.") else unexpected).append(info.name)

    misshapen, missing = [], []
    for t in targets.values():
        if "gate_up" in t.pieces:
            e, i, d = t.shape
            gu = t.pieces["gate_up"].weight
            if tuple(gu.shape) != (e, 2 * i, d) or gu.dtype not in _FLOAT_DTYPES:
                misshapen.append(f"{gu.name}: expected {(e, 2 * i, d)}, got {tuple(gu.shape)} {gu.dtype}")
            continue
        if t.name.endswith("experts.w3") and "gate_up" in targets[t.name[:-2] + "w1"].pieces:
            continue
        if _STACKED.search(t.name) and None not in t.pieces:
            slots = [(k, t.shape[1:]) for k in range(t.shape[0])]
        else:
            slots = [(None, t.shape)]
        for slot, shape in slots:
            p = t.pieces.get(slot)
            if p is None:
                missing.append(_ckpt_name(t.name, slot, layout))
            elif (why := _piece_problem(p, shape)) is not None:
                (mtp_bad if t.name.startswith("mtp.") else misshapen).append(why)
    left: set[str] = set()
    model_mtp = [n for n in targets if n.startswith("mtp.")]
    if mtp_keys and not model_mtp:
        (log.warning if dspark else log.info)(
            "the model has no MTP block; %d mtp.* tensors skipped%s", len(mtp_keys),
            " (a DSpark draft module)" if dspark else "")
        report.skipped.extend(mtp_keys)
    elif model_mtp and (dspark or mtp_bad or not mtp_keys):
        if mtp_keys:
            log.warning("checkpoint's mtp.* (%d tensors) is not the classic MTP block (%s); skipped, the main "
                        "model loads; the model's mtp.* stays unloaded (build it with n_mtp_layers=0)",
                        len(mtp_keys), "a DSpark draft" if dspark else f"e.g. {mtp_bad[0]}")
        else:
            log.warning("checkpoint has no MTP block; the model's mtp.* stays unloaded")
        report.skipped.extend(mtp_keys)
        left = set(model_mtp)
    if left:
        missing = [n for n in missing if not n.startswith("mtp.")]
        for n in left:
            targets.pop(n)
    _raise_if("misshapen tensors", misshapen, True)
    _raise_if("missing tensors", missing, strict)
    _raise_if("unexpected tensors", unexpected, strict)
    return targets, left


def _raise_if(what: str, names: list[str], strict: bool) -> None:
    if not names:
        return
    shown = "; ".join(sorted(names)[:5])
    msg = f"{what} ({len(names)}): {shown}" + (" ..." if len(names) > 5 else "")
    if strict:
        raise CheckpointError(msg)
    log.warning("%s (ignored, strict=False)", msg)


def _check_tid2eid(name: str, t: torch.Tensor, n_experts: int | None) -> None:
    """t [V, k] int: every row must route to k distinct experts in range."""
    if t.numel() == 0:
        return
    if n_experts is not None and (int(t.min()) < 0 or int(t.max()) >= n_experts):
        raise CheckpointError(f"{name}: expert ids outside 0..{n_experts - 1}")
    srt = t.sort(dim=-1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=-1)
    if bool(dup.any()):
        row = int(dup.nonzero()[0, 0])
        raise CheckpointError(f"{name}: row {row} routes token {row} to the same expert twice "
                              f"({t[row].tolist()}); routing tables need distinct experts per row")


def _convert(w: torch.Tensor, s: torch.Tensor | None, name: str, dtype: torch.dtype, keep: bool,
             device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw checkpoint tensor (+ scale) -> (model tensor, float32 scale or None) on `device`, in
    memory of its own: safetensors hands out views of the file's mmap, which must not outlive it."""
    raw = w
    w = w.to(device)
    if w.dtype == torch.float8_e4m3fn:
        s = quant.scale_to_float(s.to(device))
        out, sc = (w, s) if keep else (quant.dequant_fp8_block(w, s).to(dtype), None)
    elif w.dtype in (torch.int8, torch.uint8):
        s = quant.scale_to_float(s.to(device))
        out, sc = (w.view(torch.uint8), s) if keep else (quant.dequant_fp4(w, s).to(dtype), None)
    elif not w.is_floating_point():
        out, sc = w.to(torch.int64), None
    else:
        out, sc = w.to(torch.float32 if is_f32_tensor(name) else dtype), None
    if out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        out = out.clone()
    return out, sc


def load_checkpoint(model: nn.Module, path: str, *, layers: list[int] | None = None,
                    dtype: torch.dtype = torch.bfloat16, keep_quantized: bool = False,
                    device: str | torch.device = "cpu", strict: bool = True,
                    expert_shard: tuple[int, int] | None = None) -> LoadReport:
    """Fill `model` (usually built on the meta device) from the checkpoint at `path` (a directory
    of `*.safetensors` shards, or one file) and return what was read and what was skipped.

    Names and shapes are validated from the headers before any tensor is read. Quantized tensors
    are dequantized to `dtype` (fp32-role tensors stay fp32), or with `keep_quantized` assigned raw
    with a float32 `scale` / `w*_scale` buffer. `layers` loads a subset of the main layers (the model
    holds exactly those). strict=False tolerates missing and unexpected tensors (logged); misshapen
    ones, and model tensors left on the meta device, always fail. `expert_shard=(rank, world)`: the
    model was built with the same shard; only that rank's block of routed experts is read: its
    per-expert tensors (official and hf-reverted layouts), or its rows of each stacked tensor
    (transformers' layout; a view of the mapped file, so only those rows' pages are read).
    """
    infos, files = read_headers(path)
    layout = detect_layout(list(infos))
    report = LoadReport(layout=layout, files=len(files))
    cfg = _checkpoint_cfg(path, model)
    dspark = bool(cfg is not None and cfg.extra.get("dspark"))
    experts = None
    if expert_shard is not None:
        from batchv4.model.moe import expert_range

        experts = expert_range(model.cfg.n_routed_experts, expert_shard)
    targets, left = _plan(model, infos, layout, layers, strict, dspark, report, experts)
    n_experts = getattr(getattr(model, "cfg", None), "n_routed_experts", None)
    for name in targets:  # scale slots are refilled below only for weights that stay quantized
        if _has(model, _scale_name(name)):
            assign_tensor(model, _scale_name(name), None)
    stacks: dict[str, torch.Tensor] = {}

    def put(name: str, slot, t: torch.Tensor, n_slots: int) -> None:
        if slot is None:
            assign_tensor(model, name, t, create=name not in targets)
            return
        full = stacks.get(name)
        if full is None:
            full = stacks[name] = torch.empty((n_slots, *t.shape), dtype=t.dtype, device=t.device)
            assign_tensor(model, name, full, create=name not in targets)
        elif full.shape[1:] != t.shape or full.dtype != t.dtype:
            raise CheckpointError(f"{name}: experts stored in mixed formats ({full.dtype} {tuple(full.shape[1:])} "
                                  f"vs {t.dtype} {tuple(t.shape)})")
        full[slot].copy_(t)

    work = sorted(((p.weight.file, t.name, -1 if not isinstance(slot, int) else slot, slot, p)
                   for t in targets.values() for slot, p in t.pieces.items()), key=lambda x: x[:3])
    with ShardReader() as rd:
        for _, name, _, slot, p in work:
            w = rd.get(p.weight)
            s = rd.get(p.scale) if p.scale is not None else None
            if p.rows is not None:      # a view of this rank's rows of the mapped stack: only they are read
                w = w[p.rows[0]:p.rows[1]]
                s = s[p.rows[0]:p.rows[1]] if s is not None else None
            report.tensors_read += 1 + (s is not None)
            report.bytes_read += p.weight.nbytes + (p.scale.nbytes if p.scale is not None else 0)
            if slot == "gate_up":  # transformers' [E, 2I, D]: w1 rows, then w3 rows
                inter = targets[name].shape[1]
                w3 = name[:-2] + "w3"
                for half, rows in ((name, w[:, :inter]), (w3, w[:, inter:])):
                    put(half, None, _convert(rows.contiguous(), None, half, dtype, keep_quantized, device)[0], 0)
                continue
            if name.endswith("tid2eid"):
                _check_tid2eid(p.weight.name, w, n_experts)
            tw, ts = _convert(w, s, name, dtype, keep_quantized, device)
            n_slots = targets[name].shape[0] if slot is not None else 0
            put(name, slot, tw, n_slots)
            if ts is not None:
                put(_scale_name(name), slot, ts, n_slots)
            del w, s, tw, ts
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items()
                  if t is not None and t.is_meta and not (left and n.startswith("mtp."))]
    if still_meta:
        raise CheckpointError(f"parameters still on the meta device after loading ({len(still_meta)}): "
                              + ", ".join(still_meta[:5]) + (" ..." if len(still_meta) > 5 else ""))
    return report


def _has(model: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    try:
        sub = model.get_submodule(path) if path else model
    except AttributeError:
        return False
    return leaf in sub._buffers or leaf in sub._parameters
