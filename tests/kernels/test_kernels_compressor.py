"""Compressor softmax pooling, HCA and CSA layouts (kernels/compressor.py): the per-block
accumulator kernel the model runs, and whole-sequence pooling built on it."""

import math

import pytest
import torch

from batchv4.kernels.compressor import block_stats, block_stats_ref, compress_pool, compress_pool_ref, merge_stats


@pytest.mark.parametrize(
    "length, ratio, overlap, d",
    [(19, 4, True, 24), (17, 4, False, 64), (40, 8, False, 20), (24, 4, True, 64), (27, 8, True, 12)],
)
def test_pool_matches_reference(length, ratio, overlap, d):
    width = 2 * d if overlap else d
    a, g = torch.randn(length, width), torch.randn(length, width) * 3
    out = compress_pool(a, g, ratio, overlap, use_triton=True)
    assert out.shape == (length // ratio, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, compress_pool_ref(a, g, ratio, overlap), rtol=1e-5, atol=1e-6)


def test_hca_entry_is_the_per_channel_softmax_pool_by_hand():
    a, g = torch.randn(8, 3), torch.randn(8, 3)
    out = compress_pool(a, g, 4, overlap=False, use_triton=True)
    j, ch = 1, 2
    weights = [math.exp(g[t, ch]) for t in range(4, 8)]
    want = sum(wt * a[t, ch] for wt, t in zip(weights, range(4, 8))) / sum(weights)
    assert out[j, ch].item() == pytest.approx(float(want), rel=1e-5)


def test_csa_entries_overlap_previous_block_through_first_half_channels():
    d = 2
    a, g = torch.randn(12, 2 * d), torch.randn(12, 2 * d)
    out = compress_pool(a, g, 4, overlap=True, use_triton=True)
    # Entry 0: only block 0 with channels [d:]; entry 2: block 1 with [:d] + block 2 with [d:].
    ch = 1
    w0 = torch.softmax(g[0:4, d + ch], 0)
    assert out[0, ch].item() == pytest.approx(float((w0 * a[0:4, d + ch]).sum()), rel=1e-5)
    slots_g = torch.cat([g[4:8, ch], g[8:12, d + ch]])
    slots_a = torch.cat([a[4:8, ch], a[8:12, d + ch]])
    want = (torch.softmax(slots_g, 0) * slots_a).sum()
    assert out[2, ch].item() == pytest.approx(float(want), rel=1e-5)


def test_short_sequence_gives_no_entries_and_bad_layouts_raise():
    assert compress_pool(torch.randn(3, 8), torch.randn(3, 8), 4, True, use_triton=True).shape == (0, 4)
    with pytest.raises(ValueError, match="even channel count"):
        compress_pool(torch.randn(8, 5), torch.randn(8, 5), 4, overlap=True)
    with pytest.raises(ValueError, match="g must have shape"):
        compress_pool(torch.randn(8, 4), torch.randn(8, 6), 4, overlap=False)
    with pytest.raises(ValueError, match="a must have dtype"):
        compress_pool(torch.randn(8, 4).bfloat16(), torch.randn(8, 4), 4, overlap=False)


@pytest.mark.parametrize("length, ratio, offset, width", [(19, 4, 3, 24), (1, 8, 5, 20), (40, 16, 0, 70), (5, 1, 0, 8)])
def test_block_stats_match_reference(length, ratio, offset, width):
    a, g = torch.randn(length, width), torch.randn(length, width) * 3
    out = block_stats(a, g, ratio, offset, use_triton=True)
    ref = block_stats_ref(a, g, ratio, offset)
    assert out.shape == (-(-(offset + length) // ratio), 3, width)
    assert torch.equal(out[:, 0], ref[:, 0])
    torch.testing.assert_close(out[:, 1:], ref[:, 1:], rtol=1e-5, atol=1e-6)


def test_block_stats_of_a_chunk_resume_the_whole_sequence():
    # the streaming compressor's rule: stats of [0, 6) merged with those of [6, 11) (which starts
    # at slot 2 of block 1) are the stats of the whole sequence
    a, g = torch.randn(11, 5), torch.randn(11, 5)
    whole = block_stats(a, g, 4, 0, use_triton=True)
    first = block_stats(a[:6], g[:6], 4, 0, use_triton=True)      # blocks 0, 1 (1 partial)
    rest = block_stats(a[6:], g[6:], 4, 2, use_triton=True)       # blocks 1 (partial), 2
    joined = torch.cat([first[:1], merge_stats(first[1:], rest[:1]), rest[1:]])
    torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-6)
    assert block_stats(a[:0], g[:0], 4, 1, use_triton=True)[0, 0].eq(float("-inf")).all()
    with pytest.raises(ValueError, match="offset"):
        block_stats(a, g, 4, 4)
