"""What transformers lacks, checked by hand: the FP8/FP4 activation simulation and the MTP block."""

import torch

from batchv4.config import ModelConfig
from batchv4.model import quant
from batchv4.model.layers import hc_head
from batchv4.model.model import Transformer
from cache_harness import Harness


def model(sim: bool) -> Transformer:
    return Transformer(ModelConfig.load("test"), activation_sim=sim).float().init_random(3, std=0.1)


def test_simulation_stores_fp8_window_kv_and_fp4_indexer_keys():
    m = model(True)
    h = Harness(m)
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    h.step([(0, ids)])
    r = m.cfg.rope_head_dim
    for layer, ring in enumerate(h.pools.window):
        nope = ring[0, :, :-r]
        # the stored non-RoPE dims are exactly representable in FP8 e4m3 with power-of-two scales
        assert torch.equal(quant.fp8_qdq(nope, block=64), nope), layer
        assert not torch.equal(nope, torch.zeros_like(nope))
    for layer, keys in h.pools.ikey.items():
        k = keys[h.tables[0][4][0], : 24 // 4]
        assert torch.equal(quant.fp4_qdq(k, block=32), k), layer
    for layer, comp in h.pools.comp.items():
        ratio = m.cfg.compress_ratios[layer]
        e = comp[h.tables[0][ratio][0], : min(24 // ratio, 4), :-r]
        assert torch.equal(quant.fp8_qdq(e, block=64), e), layer


def test_simulation_is_a_small_perturbation_and_packed_equals_reference():
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(4))
    off, on = model(False), model(True)
    a, b = off.forward_reference(ids), on.forward_reference(ids)
    diff = (a - b).abs().max()
    assert 0 < diff < 0.5 * a.abs().max()
    h = Harness(on)
    out = h.step([(0, ids[:17].tolist())])[0]
    out = h.step([(0, ids[17:].tolist())])[0]
    assert (out - b[-1]).abs().max() < 1e-3


def test_mtp_block_equals_its_hand_written_composition():
    m = model(False)
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(5))
    _, streams = m.forward_reference(ids, return_streams=True)
    nxt = torch.roll(ids, -1)
    got = m.mtp_reference(streams, nxt)
    blk = m.mtp[0]
    with torch.no_grad():
        # e = enorm(embed(next)) @ e_proj^T; h = hnorm(streams) @ h_proj^T, broadcast over streams
        e = blk.enorm(m.embed.weight[nxt]) @ blk.e_proj.weight.T
        hh = blk.hnorm(streams) @ blk.h_proj.weight.T
        x = hh + e[:, None, :]
        x = blk.forward_reference(x, nxt)
        want = blk.norm(hc_head(x, blk.hc_head_fn, blk.hc_head_base, blk.hc_head_scale, m.cfg)) @ m.head.weight.T
    assert got.shape == (12, 512)
    assert (got - want).abs().max() < 1e-5
    # the draft depends on the next token, and only through it at that row
    nxt2 = nxt.clone()
    nxt2[5] = (nxt2[5] + 1) % 512
    got2 = m.mtp_reference(streams, nxt2)
    assert (got2[:5] - got[:5]).abs().max() < 1e-6 and (got2[5] - got[5]).abs().max() > 1e-6
