"""Compressor softmax pooling, HCA and CSA layouts (kernels/compressor.py)."""

import math

import pytest
import torch

from batchv4.kernels.compressor import compress_pool, compress_pool_ref


@pytest.mark.parametrize(
    "length, ratio, overlap, d",
    [(19, 4, True, 24), (17, 4, False, 64), (40, 8, False, 20), (24, 4, True, 64)],
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
