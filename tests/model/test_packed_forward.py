"""The packed forward (ForwardBatch over cache pools) against the one-sequence reference forward:
full prefill, uneven chunks, token-by-token decode, several sequences per call, snapshots."""

import pytest
import torch

from batchv4.config import ModelConfig
from batchv4.model.model import Transformer
from cache_harness import Harness

LENGTHS = [1, 3, 4, 5, 8, 9, 15, 16, 17, 20, 37, 64, 70]
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.load("test")).float().init_random(0, std=0.1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def ref(model, ids):
    return model.forward_reference(torch.tensor(ids[:70]))          # [70, V]


def test_full_prefill_every_length(model, ids, ref):
    for n in LENGTHS:
        h = Harness(model)
        out = h.step([(0, ids[:n])])[0]
        assert (out - ref[n - 1]).abs().max() < TOL, n


@pytest.mark.parametrize("chunks", [[21, 29, 20], [1, 1, 2, 5, 3, 16, 17, 25], [7, 9, 54], [64, 6]])
def test_chunked_prefill(model, ids, ref, chunks):
    h = Harness(model)
    p = 0
    for c in chunks:
        out = h.step([(0, ids[p:p + c])])[0]
        p += c
        assert (out - ref[p - 1]).abs().max() < TOL, p


@pytest.mark.parametrize("prefill", [1, 5, 16, 33])
def test_prefill_then_decode(model, ids, ref, prefill):
    h = Harness(model)
    out = h.step([(0, ids[:prefill])])[0]
    assert (out - ref[prefill - 1]).abs().max() < TOL
    for p in range(prefill, 70):
        out = h.step([(0, ids[p:p + 1])])[0]
        assert (out - ref[p]).abs().max() < TOL, p


def test_two_sequences_one_call(model, ids):
    other = ids[::-1][:37]
    ref_b = model.forward_reference(torch.tensor(other))
    ref_a = model.forward_reference(torch.tensor(ids[:50]))
    h = Harness(model)
    out = h.step([(0, ids[:20]), (1, other[:9])])
    assert (out[0] - ref_a[19]).abs().max() < TOL and (out[1] - ref_b[8]).abs().max() < TOL
    out = h.step([(1, other[9:37]), (0, ids[20:21])])
    assert (out[0] - ref_b[36]).abs().max() < TOL and (out[1] - ref_a[20]).abs().max() < TOL
    out = h.step([(0, ids[21:50]), (1, [other[0]])])   # seq 1 continues with a token of our choice
    assert (out[0] - ref_a[49]).abs().max() < TOL
    ref_b2 = model.forward_reference(torch.tensor(other[:37] + [other[0]]))
    assert (out[1] - ref_b2[-1]).abs().max() < TOL


@pytest.mark.parametrize("split", [3, 16, 18, 33])
def test_snapshot_restore_mid_prompt(model, ids, split):
    """A snapshot saved at `split` and restored into another sequence that continues differently
    equals computing that sequence's whole prompt from scratch."""
    tail = [7, 99, 3, 250, 11, 42, 5, 17, 301, 2, 77, 13, 8, 400, 9, 1, 66, 31, 12, 500, 4, 6]
    h = Harness(model)
    h.step([(0, ids[:split])], saves=[(0, 5)])             # save seq 0's state into slot 5
    h.step([(0, ids[split:split + 30])])                  # seq 0 goes on and changes its slot
    h.length[2] = split
    h.tables[2] = {}
    for r in h.layout.ratios:
        pages = list(h.tables[0][r][: h.layout.pages_for(r, split)])
        if (split // r) % h.layout.page_size and pages:
            new = h.next_page[r]
            h.next_page[r] += 1
            h.pools.copy_page(r, pages[-1], new)
            pages[-1] = new
        h.tables[2][r] = pages
    out = h.step([(2, tail)], restores=[(5, 2)])[0]
    want = model.forward_reference(torch.tensor(ids[:split] + tail))[-1]
    assert (out - want).abs().max() < TOL


@pytest.mark.parametrize("batched", [True, False])
def test_batched_decode_of_many_sequences(model, batched):
    """Several single-token sequences in one call take the batched compressor and attention paths
    (or, with `batched_decode` off, the per-sequence attention); each equals its own reference,
    across entry boundaries of both ratios, from before the window fills (position 1) and before
    any entry exists, to past the indexer's top-k."""
    g = torch.Generator().manual_seed(12)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (13, 15, 16, 30, 9, 8, 11, 47)]
    refs = [model.forward_reference(torch.tensor(s)) for s in seqs]
    h = Harness(model)
    start = [1, 9, 10, 24, 3, 2, 5, 37]
    steps = min(len(s) - st for s, st in zip(seqs, start))
    try:
        for blk in model.layers.values():
            blk.attn.batched_decode = batched
        h.step([(i, s[:start[i]]) for i, s in enumerate(seqs)])
        for k in range(steps):
            out = h.step([(i, [s[start[i] + k]]) for i, s in enumerate(seqs)])
            for i in range(len(seqs)):
                assert (out[i] - refs[i][start[i] + k]).abs().max() < TOL, (i, k)
    finally:
        for blk in model.layers.values():
            blk.attn.batched_decode = True


def test_fp8_cache_layout_equals_the_native_one_under_simulation(model):
    """With the activation simulation on, pools in the packed FP8/FP4 layout (window rings,
    entries, indexer keys) give the same logits as native pools (the packed formats hold the simulated values exactly), through chunked
    prefill, several sequences and decode; and their pages take fewer bytes."""
    from batchv4.model.forward_batch import CachePools

    g = torch.Generator().manual_seed(21)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (41, 23, 30)]
    model = with_sim(model)
    outs = []
    for fmt in ("native", "fp8"):
        h = Harness(model)
        h.layout = model.cache_layout(page_size=4, kv_format=fmt)
        h.pools = CachePools.allocate(h.layout, 8, {r: 64 for r in h.layout.ratios})
        got = [h.step([(0, seqs[0][:17]), (1, seqs[1][:9])]), h.step([(0, seqs[0][17:33]), (2, seqs[2][:20])])]
        for k in range(8):
            got.append(h.step([(0, [seqs[0][33 + k]]), (1, [seqs[1][9 + k]]), (2, [seqs[2][20 + k]])]))
        outs.append(torch.cat(got))
        if fmt == "fp8":
            assert all(t.dtype == torch.uint8 for t in list(h.pools.comp.values()) + h.pools.window)
            native = model.cache_layout(page_size=4)
            assert h.layout.bytes_per_token() < 0.6 * native.bytes_per_token()
            assert h.layout.bytes_per_slot() < native.bytes_per_slot()
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    # against the one-sequence reference with the same simulation: a float difference of 1e-7
    # can move a value across an FP8/FP4 rounding boundary, hence the looser bound
    ref = model.forward_reference(torch.tensor(seqs[2][:28]))[-1]
    assert (outs[1][-1] - ref).abs().max() < 1e-3


def with_sim(model: Transformer) -> Transformer:
    """The same weights with the activation simulation on (it is chosen when a model is built)."""
    sim = Transformer(model.cfg, activation_sim=True).float()
    sim.load_state_dict(model.state_dict())
    return sim
