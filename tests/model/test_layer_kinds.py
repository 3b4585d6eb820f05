"""Each layer's kind as the config states it, not inferred from its ratio: a CSA layer at ratio 8 and
HCA layers at ratio 4 build what they name, run (packed forward == reference == transformers), and
survive the config dialects and checkpoint writers; a file that is no config dialect is refused
in one line."""

import json

import pytest
import torch

from batchv4.config import ConfigError, ModelConfig
from batchv4.model.checkpoint import load_checkpoint, save_hf_checkpoint, save_official_checkpoint
from batchv4.model.checkpoint_writer import hf_config_dict
from batchv4.model.compressor import Compressor, Indexer
from batchv4.model.inventory import model_tensors
from batchv4.model.model import Transformer
from cache_harness import Harness
from hf_oracle import hf_model_like, require_transformers

# the official rule would read ratio 4 as CSA and 8 as HCA: the stated kinds say the opposite
KINDS = ("window", "hca", "csa", "hca", "csa")
CFG = ModelConfig.load("test").replace(compress_ratios=(0, 4, 8, 4, 8), layer_kinds=KINDS)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG).float().init_random(5, std=0.1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (41,), generator=torch.Generator().manual_seed(6)).tolist()


def test_stated_kinds_build_the_modules_they_name(model):
    assert CFG.layer_kinds == KINDS and CFG.ratios_of("csa") == (8,) and CFG.ratios_of("hca") == (4,)
    d, di = CFG.head_dim, CFG.index_head_dim
    csa, hca, win = model.layers["2"].attn, model.layers["1"].attn, model.layers["0"].attn
    assert (csa.kind, csa.ratio, hca.kind, hca.ratio, win.kind, win.ratio) == ("csa", 8, "hca", 4, "window", 0)
    assert isinstance(csa.compressor, Compressor) and csa.compressor.overlap and csa.compressor.ratio == 8
    assert csa.compressor.ape.shape == (8, 2 * d) and csa.compressor.wkv.weight.shape == (2 * d, CFG.dim)
    assert isinstance(csa.indexer, Indexer) and csa.indexer.ratio == 8
    assert csa.indexer.compressor.overlap and csa.indexer.compressor.ape.shape == (8, 2 * di)
    assert not hca.compressor.overlap and hca.compressor.ape.shape == (4, d) and not hasattr(hca, "indexer")
    assert not hasattr(win, "compressor")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(CFG).state_dict().items()}
    assert shapes == {k: s for k, s, _ in model_tensors(CFG)}


def test_cache_layout_pages_each_kind(model):
    layout = model.cache_layout(page_size=4)
    assert layout.ratios == (4, 8)
    entry, ikey = layout.entry_bytes(), layout.ikey_bytes()
    assert layout.bytes_per_page(4) == 4 * 2 * entry                 # two HCA layers, no indexer keys
    assert layout.bytes_per_page(8) == 4 * 2 * (entry + ikey)        # two CSA layers with their keys


def test_packed_forward_matches_reference(model, ids):
    ref = model.forward_reference(torch.tensor(ids))
    h = Harness(model)
    p = 0
    for c in [13, 3, 1, 9, 1, 1, 13]:      # chunks that start and end inside blocks of 4 and 8
        out = h.step([(0, ids[p:p + c])])[0]
        p += c
        assert (out - ref[p - 1]).abs().max() < 1e-4, p
    other = ids[::-1][:19]
    out = h.step([(1, other[:18]), (0, [7])])
    assert (out[0] - model.forward_reference(torch.tensor(other[:18]))[-1]).abs().max() < 1e-4
    assert (out[1] - model.forward_reference(torch.tensor(ids + [7]))[-1]).abs().max() < 1e-4


def test_reference_matches_transformers(model, ids):
    require_transformers()
    hf = hf_model_like(model)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    assert (model.forward_reference(torch.tensor(ids)) - theirs).abs().max() < 1e-4


def test_kinds_survive_dialects_and_writers(tmp_path, model):
    hf = hf_config_dict(CFG)
    assert hf["layer_types"][1:3] == ["heavily_compressed_attention", "compressed_sparse_attention"]
    assert hf["compress_rates"] == {"compressed_sparse_attention": 8, "heavily_compressed_attention": 4}
    assert ModelConfig.from_dict(hf).fingerprint_dict() == CFG.fingerprint_dict()
    assert ModelConfig.from_dict(CFG.to_dict()).fingerprint_dict() == CFG.fingerprint_dict()
    # transformers' own form: layer_types and compress_rates, no compress_ratios
    bare = {k: v for k, v in hf.items() if k != "compress_ratios"}
    assert ModelConfig.from_dict(bare).compress_ratios == CFG.compress_ratios
    for writer in (save_official_checkpoint, save_hf_checkpoint):
        path = tmp_path / writer.__name__
        writer(model, CFG, str(path))
        cfg = ModelConfig.load(str(path))
        assert (cfg.layer_kinds, cfg.compress_ratios) == (KINDS, CFG.compress_ratios)
        with torch.device("meta"):
            back = Transformer(cfg.replace(n_mtp_layers=0))
        load_checkpoint(back, str(path), dtype=torch.float32, strict=False)
        assert torch.equal(back.layers["2"].attn.indexer.compressor.ape, model.layers["2"].attn.indexer.compressor.ape)


def test_official_config_derives_kinds_from_ratios():
    official = {k: v for k, v in CFG.to_dict().items() if k not in ("layer_kinds", "name", "weight_dtype")}
    official.update(compress_ratios=[0, 4, 8, 4, 8, 0], dtype="bf16", max_batch_size=4)  # + MTP entry
    cfg = ModelConfig.from_dict(official)
    assert cfg.layer_kinds == ("window", "csa", "hca", "csa", "hca") and cfg.n_mtp_layers == 1


def test_kinds_and_ratios_must_agree():
    with pytest.raises(ConfigError, match="layer 1 is a window layer with compress ratio 4"):
        CFG.replace(layer_kinds=("window", "window", "csa", "hca", "csa"))
    with pytest.raises(ConfigError, match="unknown layer kinds"):
        CFG.replace(layer_kinds=("window", "mla", "csa", "hca", "csa"))
    with pytest.raises(ConfigError, match="unknown layer type 'linear_attention'"):
        ModelConfig.from_dict(dict(hf_config_dict(CFG), layer_types=["linear_attention"] * 5))


@pytest.mark.parametrize("content", [{"vocab": 5, "layers": 3}, {"hidden_size": 64, "num_hidden_layers": 2}, []])
def test_a_file_of_no_dialect_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as e:
        ModelConfig.load(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "not a DeepSeek-V4 config" in msg or "JSON object" in msg
