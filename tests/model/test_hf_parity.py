"""Parity with transformers==5.23.0 `DeepseekV4ForCausalLM` (fp32, activation simulation off):
window 8, CSA 4, HCA 16, lengths crossing the window and both compression boundaries."""

import pytest
import torch

from batchv4.config import ModelConfig
from batchv4.model.model import Transformer
from cache_harness import Harness

from hf_oracle import hf_model_like, require_transformers

transformers = require_transformers()

LENGTHS = [1, 3, 4, 5, 8, 9, 15, 16, 17, 20, 37, 64, 70]
TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    m = Transformer(ModelConfig.load("test")).float().init_random(7, std=0.1)
    return m, hf_model_like(m)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(11)).tolist()


def hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.tensor([toks])).logits[0].float()


def test_reference_forward_matches_transformers(pair, ids):
    m, hf = pair
    for n in LENGTHS:
        ours = m.forward_reference(torch.tensor(ids[:n]))
        theirs = hf_logits(hf, ids[:n])
        assert (ours - theirs).abs().max() < TOL, n


def test_packed_prefill_chunks_and_decode_match_transformers(pair, ids):
    m, hf = pair
    full = {n: hf_logits(hf, ids[:n])[-1] for n in LENGTHS}
    h = Harness(m)
    p = 0
    for c in [3, 1, 1, 4, 7, 1, 21, 2, 30]:            # uneven chunks, then single tokens, to 70
        out = h.step([(0, ids[p:p + c])])[0]
        p += c
        if p in full:
            assert (out - full[p]).abs().max() < TOL, p


def test_two_sequences_packed_match_transformers(pair, ids):
    m, hf = pair
    other = list(reversed(ids))[:37]
    h = Harness(m)
    out = h.step([(0, ids[:20]), (1, other[:17])])
    assert (out[0] - hf_logits(hf, ids[:20])[-1]).abs().max() < TOL
    assert (out[1] - hf_logits(hf, other[:17])[-1]).abs().max() < TOL
    out = h.step([(1, other[17:37]), (0, ids[20:64])])
    assert (out[0] - hf_logits(hf, other)[-1]).abs().max() < TOL
    assert (out[1] - hf_logits(hf, ids[:64])[-1]).abs().max() < TOL


def test_snapshot_restore_matches_transformers(pair, ids):
    m, hf = pair
    h = Harness(m)
    h.step([(0, ids[:17])], saves=[(0, 6)])
    h.fork(0, 3, snap_slot=7)
    tail = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    out = h.step([(3, tail)])[0]
    assert (out - hf_logits(hf, ids[:17] + tail)[-1]).abs().max() < TOL
    h.step([(0, ids[17:40])])                           # the source goes on unaffected
    h.pools.copy_slot(6, 4)                             # restore the saved snapshot elsewhere
    h.length[4] = 17
    h.tables[4] = {r: list(h.tables[0][r][: h.layout.pages_for(r, 17)]) for r in h.layout.ratios}
    for r in h.layout.ratios:
        if (17 // r) % h.layout.page_size and h.tables[4][r]:
            new = h.next_page[r]
            h.next_page[r] += 1
            h.pools.copy_page(r, h.tables[4][r][-1], new)
            h.tables[4][r][-1] = new
    out = h.step([(4, ids[17:40])])[0]
    assert (out - hf_logits(hf, ids[:40])[-1]).abs().max() < TOL
