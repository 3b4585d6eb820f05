import json
import logging
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from batchv4.config import ModelConfig
from batchv4.model import quant
from batchv4.model.checkpoint import (CheckpointError, assign_tensor, expected_inventory, load_checkpoint,
                                      save_hf_checkpoint, save_official_checkpoint)
from batchv4.model.inventory import model_tensors
from batchv4.model.model import Transformer
from hf_oracle import require_transformers

CFG = ModelConfig.load("test")


def meta_model(cfg=CFG, **kw):
    with torch.device("meta"):
        return Transformer(cfg, **kw)


@pytest.fixture(scope="module")
def ref_state():
    """A random float32 "ours" state dict whose floats are exactly representable in bf16."""
    sd = Transformer(CFG).init_random(seed=1).state_dict()
    return {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v.clone() for k, v in sd.items()}


def assert_loaded(model, want: dict):
    got = model.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# ---- inventory ---------------------------------------------------------------------------------

def test_inventory_flash_and_pro():
    flash = expected_inventory(ModelConfig.load("deepseek-v4-flash"))
    assert len(flash) == 69_187
    assert Counter(d for _, d in flash.values()) == {"BF16": 433, "F32": 417, "F8_E4M3": 375,
                                                     "F8_E8M0": 34_167, "I64": 3, "I8": 33_792}
    assert sum(k.startswith("mtp.") for k in flash) == 1_575
    assert "mtp.0.embed.weight" not in flash and "mtp.0.head.weight" not in flash
    assert flash["layers.3.ffn.experts.7.w2.weight"] == ((4096, 1024), "I8")
    assert flash["layers.3.ffn.experts.7.w2.scale"] == ((4096, 64), "F8_E8M0")
    assert flash["layers.2.attn.wo_a.scale"] == ((64, 32), "F8_E8M0")
    assert flash["layers.2.attn.compressor.ape"] == ((4, 1024), "F32")
    assert flash["layers.3.attn.compressor.ape"] == ((128, 512), "F32")
    assert flash["mtp.0.e_proj.scale"] == ((32, 32), "F8_E8M0")
    assert flash["layers.0.ffn.gate.tid2eid"] == ((129280, 6), "I64")
    assert len(expected_inventory(ModelConfig.load("deepseek-v4-pro"))) == 145_116


def test_inventory_bf16_has_no_scales():
    inv = expected_inventory(CFG)
    assert not any(k.endswith(".scale") for k in inv)
    assert {d for _, d in inv.values()} == {"BF16", "F32", "I64"}


@pytest.mark.parametrize("name", ["test", "deepseek-v4-flash", "deepseek-v4-pro"])
def test_inventory_matches_meta_model(name):
    cfg = ModelConfig.load(name)
    got = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    assert got == {k: s for k, s, _ in model_tensors(cfg)}


# ---- round trips -------------------------------------------------------------------------------

def test_roundtrip_bf16_official(tmp_path, ref_state):
    files = save_official_checkpoint(ref_state, CFG, str(tmp_path), shard_max_bytes=256 << 10)
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert ModelConfig.load(str(tmp_path)).fingerprint_dict() == CFG.fingerprint_dict()
    m = meta_model()
    report = load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    assert report.layout == "official" and report.tensors_read == len(expected_inventory(CFG))
    assert_loaded(m, ref_state)
    m16 = meta_model()
    load_checkpoint(m16, str(tmp_path))  # default bf16; the reference's fp32 tensors stay fp32
    sd = m16.state_dict()
    assert sd["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    assert sd["layers.0.hc_attn_fn"].dtype == torch.float32 and sd["layers.2.ffn.gate.bias"].dtype == torch.float32
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def _linear_names():
    return [n for n, _, r in model_tensors(CFG) if r == "linear"]


@pytest.mark.parametrize("scale_format", ["e8m0", "f32"])
def test_roundtrip_fp8(tmp_path, ref_state, scale_format):
    save_official_checkpoint(ref_state, CFG, str(tmp_path), fp8=True, scale_format=scale_format)
    cfg_disk = ModelConfig.load(str(tmp_path))
    assert cfg_disk.weight_dtype == "fp8"
    inv = expected_inventory(cfg_disk)
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"]) == set(inv)
    want = dict(ref_state)
    for n in _linear_names():
        want[n] = quant.dequant_fp8_block(*quant.quant_fp8_block(ref_state[n], scale_format=scale_format))
    m = meta_model()
    load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    assert_loaded(m, want)
    mq = meta_model()
    load_checkpoint(mq, str(tmp_path), dtype=torch.float32, keep_quantized=True)
    lin = mq.get_submodule("layers.2.attn.wq_a")
    w8, s = quant.quant_fp8_block(ref_state["layers.2.attn.wq_a.weight"], scale_format=scale_format)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.dtype == torch.float32
    assert torch.equal(lin.weight.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(lin.scale, quant.scale_to_float(s))
    assert torch.equal(lin.dense_weight(torch.float32), want["layers.2.attn.wq_a.weight"])
    assert mq.get_submodule("layers.2.attn.q_norm").weight.dtype == torch.float32
    assert mq.get_submodule("layers.2.ffn.experts").w1_scale is None


def test_roundtrip_fp4_experts(tmp_path, ref_state):
    state = dict(ref_state)
    w1 = state["layers.2.ffn.experts.w1"].clone()
    w1[3, 0, :] = 0.0
    w1[3, 0, :3] = torch.tensor([0.5, 1.0, 6.0])    # amax 6 in the first block: scale byte 127
    state["layers.2.ffn.experts.w1"] = w1
    save_official_checkpoint(state, CFG, str(tmp_path), fp8=True, fp4_experts=True)
    inv = expected_inventory(ModelConfig.load(str(tmp_path)))
    assert inv["layers.2.ffn.experts.3.w1.weight"] == ((CFG.moe_inter_dim, CFG.dim // 2), "I8")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    with safe_open(str(tmp_path / index["layers.2.ffn.experts.3.w1.weight"]), "pt") as f:
        raw = f.get_tensor("layers.2.ffn.experts.3.w1.weight")
    assert raw.dtype == torch.int8 and raw.view(torch.uint8)[0, :2].tolist() == [0x21, 0x07]
    m = meta_model()
    load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    got = m.get_submodule("layers.2.ffn.experts").w1
    assert got[3, 0, :4].tolist() == [0.5, 1.0, 6.0, 0.0]
    for n in ("w1", "w2", "w3"):
        full = state[f"layers.4.ffn.experts.{n}"]
        want = torch.stack([quant.dequant_fp4(*quant.quant_fp4(full[e])) for e in range(full.shape[0])])
        assert torch.equal(getattr(m.get_submodule("layers.4.ffn.experts"), n), want)
    mq = meta_model()
    load_checkpoint(mq, str(tmp_path), keep_quantized=True)
    ex = mq.get_submodule("layers.2.ffn.experts")
    assert ex.w1.dtype == torch.uint8 and ex.w1.shape == (8, 32, 32) and ex.w1_scale.shape == (8, 32, 2)
    assert torch.equal(ex.expert_weight("w1", 3, torch.float32), got[3])


def test_fp8_experts_with_f32_scales(tmp_path, ref_state):
    save_official_checkpoint(ref_state, CFG, str(tmp_path), fp8=True, fp8_experts=True, scale_format="f32")
    m = meta_model()
    load_checkpoint(m, str(tmp_path), dtype=torch.float32, keep_quantized=True)
    ex = m.get_submodule("layers.3.ffn.experts")
    assert ex.w2.dtype == torch.float8_e4m3fn and ex.w2_scale.shape == (8, 1, 1)
    w = ref_state["layers.3.ffn.experts.w2"][5]
    assert torch.equal(ex.expert_weight("w2", 5, torch.float32), quant.dequant_fp8_block(*quant.quant_fp8_block(w, scale_format="f32")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(tmp_path, ref_state):
    save_official_checkpoint(ref_state, CFG, str(tmp_path), fp8=True, fp4_experts=True)
    cpu, gpu = meta_model(), meta_model()
    load_checkpoint(cpu, str(tmp_path), keep_quantized=True)
    load_checkpoint(gpu, str(tmp_path), keep_quantized=True, device="cuda")
    sg = gpu.state_dict()
    for k, v in cpu.state_dict().items():
        assert sg[k].device.type == "cuda" and torch.equal(sg[k].cpu().view(torch.uint8), v.view(torch.uint8)), k
    deq = meta_model()
    load_checkpoint(deq, str(tmp_path), device="cuda", dtype=torch.float32)
    assert torch.equal(deq.get_submodule("layers.2.ffn.experts").w1.cpu(),
                       torch.stack([cpu.get_submodule("layers.2.ffn.experts").expert_weight("w1", e, torch.float32)
                                    for e in range(8)]))


def test_hf_layout_from_our_writer(tmp_path, ref_state, caplog):
    save_hf_checkpoint(ref_state, CFG, str(tmp_path))
    cfg = ModelConfig.load(str(tmp_path))
    assert cfg.n_mtp_layers == 1
    m = meta_model(cfg.replace(n_mtp_layers=0))
    assert load_checkpoint(m, str(tmp_path), dtype=torch.float32).layout == "hf"
    assert_loaded(m, {k: v for k, v in ref_state.items() if not k.startswith("mtp.")})
    with_mtp = meta_model(cfg)   # transformers stores no MTP block: the main model still loads
    with caplog.at_level(logging.WARNING):
        load_checkpoint(with_mtp, str(tmp_path), dtype=torch.float32)
    assert "no MTP block" in caplog.text and with_mtp.mtp[0].e_proj.weight.is_meta


def test_transformers_layouts(tmp_path):
    """A real transformers model, saved as its state dict and through save_pretrained (the
    half-reverted hybrid), loads into the same weights."""
    transformers = require_transformers()
    from batchv4.model.checkpoint_writer import hf_config_dict

    torch.manual_seed(0)
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_config_dict(CFG)))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_()
        for n, b in hf.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(b.shape[0])]))
    sd = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, (s, _) in expected_inventory(CFG, "hf").items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    hf.save_pretrained(str(tmp_path / "saved"))
    cfg = CFG.replace(n_mtp_layers=0)
    a, b = meta_model(cfg), meta_model(cfg)
    assert load_checkpoint(a, str(tmp_path / "model.safetensors"), dtype=torch.float32).layout == "hf"
    assert load_checkpoint(b, str(tmp_path / "saved"), dtype=torch.float32).layout == "hf-reverted"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(sa["layers.2.ffn.experts.w3"], sd["model.layers.2.mlp.experts.gate_up_proj"][:, 32:])
    assert torch.equal(sa["layers.2.attn.kv_norm.weight"], sd["model.layers.2.self_attn.kv_norm.weight"])
    assert torch.equal(sa["layers.2.attn.indexer.compressor.norm.weight"],
                       sd["model.layers.2.self_attn.compressor.indexer.kv_norm.weight"])


def test_layer_subset(tmp_path, ref_state):
    save_official_checkpoint(ref_state, CFG, str(tmp_path))
    m = meta_model(layers=[0, 2])
    report = load_checkpoint(m, str(tmp_path), layers=[0, 2], dtype=torch.float32)
    assert_loaded(m, {k: v for k, v in ref_state.items() if not k.startswith(("layers.1.", "layers.3.", "layers.4."))})
    assert any(k.startswith("layers.4.") for k in report.skipped)
    assert not any(k.startswith(("layers.0.", "layers.2.")) for k in report.skipped)
    with pytest.raises(CheckpointError, match="layers"):
        load_checkpoint(meta_model(layers=[0, 2]), str(tmp_path), layers=[1, 3])


# ---- errors --------------------------------------------------------------------------------------

def test_missing_unexpected_misshapen(tmp_path, ref_state):
    missing = {k: v for k, v in ref_state.items() if k not in ("layers.1.attn.wq_b.weight", "layers.3.ffn.experts.w2")}
    save_official_checkpoint(missing, CFG, str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(9\): layers.1.attn.wq_b.weight; "
                                              r"layers.3.ffn.experts.0.w2.weight"):
        load_checkpoint(meta_model(), str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="still on the meta device.*layers.1.attn.wq_b.weight"):
        load_checkpoint(meta_model(), str(tmp_path / "a"), strict=False)

    extra = dict(ref_state, **{"layers.1.attn.bogus.weight": torch.zeros(2), "layers.9.norm.weight": torch.zeros(2)})
    save_official_checkpoint(extra, CFG, str(tmp_path / "b"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(2\): layers.1.attn.bogus.weight; layers.9"):
        load_checkpoint(meta_model(), str(tmp_path / "b"))
    load_checkpoint(meta_model(), str(tmp_path / "b"), strict=False)

    bad = dict(ref_state, **{"layers.2.attn.wkv.weight": torch.zeros(64, 32)})
    save_official_checkpoint(bad, CFG, str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match=r"misshapen tensors \(1\): layers.2.attn.wkv.weight: "
                                              r"expected \(128, 64\), got \(64, 32\)"):
        load_checkpoint(meta_model(), str(tmp_path / "c"))


def test_truncated_and_corrupt_files(tmp_path, ref_state):
    files = save_official_checkpoint(ref_state, CFG, str(tmp_path))
    data = open(files[1], "rb").read()
    open(files[1], "wb").write(data[:-1000])
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(files[1])}: not a readable safetensors file") as e:
        load_checkpoint(meta_model(), str(tmp_path))
    assert "\n" not in str(e.value)
    bad = bytearray(data)
    bad[8:16] = b"{{{{{{{{"
    open(files[1], "wb").write(bytes(bad))
    with pytest.raises(CheckpointError, match=os.path.basename(files[1])):
        load_checkpoint(meta_model(), str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(meta_model(), str(tmp_path / "nope"))


def test_tid2eid_duplicates_refused(tmp_path, ref_state):
    t = ref_state["layers.1.ffn.gate.tid2eid"].clone()
    t[7] = torch.tensor([5, 5])
    save_official_checkpoint(dict(ref_state, **{"layers.1.ffn.gate.tid2eid": t}), CFG, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"layers.1.ffn.gate.tid2eid: row 7 .* same expert twice"):
        load_checkpoint(meta_model(), str(tmp_path))


# ---- draft modules -------------------------------------------------------------------------------

def test_dspark_config_skips_draft(tmp_path, ref_state, caplog):
    draft = {k: v for k, v in ref_state.items() if not k.startswith("mtp.")}
    draft.update({"mtp.0.markov_head.weight": torch.zeros(4, 4), "mtp.2.confidence.weight": torch.zeros(3)})
    save_official_checkpoint(draft, CFG, str(tmp_path))
    conf = json.load(open(tmp_path / "config.json"))
    conf["compress_ratios"] = conf["compress_ratios"][: CFG.n_layers] + [0, 0, 0]
    json.dump(conf, open(tmp_path / "config.json", "w"))
    cfg = ModelConfig.load(str(tmp_path))
    assert cfg.extra["dspark"] and cfg.n_mtp_layers == 0
    m = meta_model(cfg)
    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    assert "DSpark" in caplog.text
    assert set(report.skipped) == {"mtp.0.markov_head.weight", "mtp.2.confidence.weight"}
    assert_loaded(m, {k: v for k, v in ref_state.items() if not k.startswith("mtp.")})


def test_foreign_mtp_tensors_skip_draft(tmp_path, ref_state, caplog):
    save_official_checkpoint(dict(ref_state, **{"mtp.0.markov_head.weight": torch.zeros(4, 4)}), CFG, str(tmp_path))
    m = meta_model()
    with caplog.at_level(logging.WARNING):
        load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    assert "not the classic MTP block" in caplog.text and "mtp.0.markov_head.weight" in caplog.text
    assert_loaded(m, {k: v for k, v in ref_state.items() if not k.startswith("mtp.")})
    assert m.mtp[0].e_proj.weight.is_meta


def test_model_without_mtp_ignores_checkpoint_mtp(tmp_path, ref_state, caplog):
    save_official_checkpoint(ref_state, CFG, str(tmp_path))
    m = meta_model(CFG.replace(n_mtp_layers=0))
    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(m, str(tmp_path), dtype=torch.float32)
    assert report.skipped and all(k.startswith("mtp.") for k in report.skipped)
    assert caplog.text == ""


# ---- helpers -------------------------------------------------------------------------------------

def test_assign_tensor():
    m = meta_model()
    assign_tensor(m, "layers.0.attn.wq_a.weight", torch.ones(64, 64))
    p = m.get_submodule("layers.0.attn.wq_a").weight
    assert isinstance(p, torch.nn.Parameter) and not p.requires_grad and not p.is_meta
    assign_tensor(m, "layers.0.ffn.gate.tid2eid", torch.zeros(512, 2, dtype=torch.int64))
    assert "tid2eid" in m.get_submodule("layers.0.ffn.gate")._buffers
    assign_tensor(m, "layers.0.attn.wq_a.scale", torch.ones(1, 1))
    assert m.get_submodule("layers.0.attn.wq_a").scale.shape == (1, 1)
    with pytest.raises(CheckpointError, match="no such parameter"):
        assign_tensor(m, "layers.0.attn.nope", torch.ones(1))



_MEMORY_CHILD = """
import json, sys, torch
from batchv4.model.checkpoint import load_checkpoint
n = int(sys.argv[2])
with torch.device("meta"):
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(1024, 1024, bias=False) for _ in range(n))
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (peak RSS)
before = vm("VmRSS")
load_checkpoint(model, sys.argv[1], dtype=torch.float32)
assert model.blocks[n - 1].weight[0, 0] == n - 1
print(json.dumps({"peak": vm("VmHWM") - before}))
"""


def test_load_memory_is_bounded(tmp_path):
    """Peak RSS while loading is about the model itself plus a few tensors and open shards (measured
    in a fresh process, so memory freed by the test itself does not hide the loader's)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS on this system")
    n = 32  # tensors of 4 MiB in fp32: a 128 MiB model in 8 shards of 16 MiB
    for k in range(8):
        save_file({f"blocks.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(4 * k, 4 * k + 4)},
                  str(tmp_path / f"s{k}.safetensors"))
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path), str(n)], capture_output=True,
                         text=True, check=True)
    peak = json.loads(out.stdout)["peak"]
    model_bytes = n * 4 << 20
    # the model, at most two open shards' pages, and slack
    assert model_bytes <= peak < model_bytes + (64 << 20), f"peak {peak >> 20} MiB for a {model_bytes >> 20} MiB model"
