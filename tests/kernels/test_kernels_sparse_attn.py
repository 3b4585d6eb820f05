"""Sparse attention over the paged V4 cache (kernels/sparse_attn.py)."""

import pytest
import torch

from batchv4.kernels.sparse_attn import (
    sparse_attn_decode,
    sparse_attn_decode_ref,
    sparse_attn_prefill,
    sparse_attn_prefill_ref,
)

H, DH, W, P = 4, 64, 8, 4
SCALE = DH**-0.5


def _pools(num_slots=5, num_pages=12, dtype=torch.bfloat16):
    return (torch.randn(num_slots, W, DH).to(dtype), torch.randn(num_pages, P, DH).to(dtype),
            torch.randn(H) * 2)


def _naive(q_row, pos, keys_window, comp_rows, sink):
    """One query: candidate list by hand (window oldest first, then entries), dense softmax + sink."""
    keys = [keys_window(p) for p in range(max(0, pos - W + 1), pos + 1)] + comp_rows
    k = torch.stack(keys).float()  # [C, Dh]
    s = q_row.float() @ k.T * SCALE  # [H, C]
    p = torch.softmax(torch.cat([s, sink[:, None]], 1), 1)[:, :-1]
    return p @ k


def _decode_case(mode):
    win, comp, sink = _pools()
    page_table = torch.randperm(12)[:9].view(3, 3).int()
    slot = torch.tensor([4, 0, 2], dtype=torch.int32)
    pos = torch.tensor([3, 20, 9], dtype=torch.int32)  # seq 0 is shorter than the window
    q = torch.randn(3, H, DH).bfloat16()
    kw = {}
    if mode == "csa":  # fewer real candidates than K; -1 anywhere in the row
        kw["topk_idx"] = torch.tensor([[-1, -1, -1, -1, -1], [0, 3, -1, 4, 2], [1, 0, -1, -1, -1]]).int()
    elif mode == "hca":
        kw["n_comp"] = torch.tensor([0, 5, 2], dtype=torch.int32)
    return q, pos, win, slot, comp, page_table, sink, kw


@pytest.mark.parametrize("mode", ["window", "csa", "hca"])
def test_decode_matches_reference_and_hand_gathered_oracle(mode, bf16_close):
    q, pos, win, slot, comp, page_table, sink, kw = _decode_case(mode)
    out = sparse_attn_decode(q, pos, win, slot, comp, page_table, sink, SCALE, use_triton=True, **kw)
    ref = sparse_attn_decode_ref(q, pos, win, slot, comp, page_table, sink, SCALE, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    bf16_close(out, ref)
    for b in range(3):
        if mode == "csa":
            entries = [j for j in kw["topk_idx"][b].tolist() if j >= 0]
        else:
            entries = list(range(int(kw["n_comp"][b]))) if mode == "hca" else []
        comp_rows = [comp[page_table[b, j // P], j % P] for j in entries]
        want = _naive(q[b], int(pos[b]), lambda p, b=b: win[slot[b], p % W], comp_rows, sink)
        bf16_close(ref[b], want)


def test_decode_fp32_window_only_layer_without_compressed_pool():
    win, _, sink = _pools(dtype=torch.float32)
    q = torch.randn(2, H, DH)
    pos = torch.tensor([0, 30], dtype=torch.int32)
    slot = torch.tensor([1, 3], dtype=torch.int32)
    out = sparse_attn_decode(q, pos, win, slot, None, None, sink, SCALE, use_triton=True)
    ref = sparse_attn_decode_ref(q, pos, win, slot, None, None, sink, SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_prefill_chunks_read_new_kv_and_the_pool(mode, bf16_close):
    win, comp, sink = _pools()
    # Seq 0: a fresh prompt (positions 0..2); seq 1: empty; seq 2: a chunk continuing at 10, so
    # its window reaches back into the pool (positions 3..9) and forward into new_kv.
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    pos = torch.tensor([0, 1, 2, 10, 11, 12, 13, 14], dtype=torch.int32)
    slot = torch.tensor([4, 0, 2], dtype=torch.int32)
    page_table = torch.randperm(12)[:9].view(3, 3).int()
    q = torch.randn(8, H, DH).bfloat16()
    new_kv = torch.randn(8, DH).bfloat16()
    if mode == "csa":
        kw = dict(topk_idx=torch.randint(-1, 3, (8, 3)).int())
    else:
        kw = dict(n_comp=((pos + 1) // 4).int())
    args = (q, cu, pos, new_kv, win, slot, comp, page_table, sink, SCALE)
    out = sparse_attn_prefill(*args, use_triton=True, **kw)
    ref = sparse_attn_prefill_ref(*args, **kw)
    bf16_close(out, ref)
    seq_of = [0, 0, 0, 2, 2, 2, 2, 2]
    for t in range(8):
        s = seq_of[t]
        start, first = int(cu[s]), int(pos[int(cu[s])])

        def key(p, s=s, start=start, first=first):
            return new_kv[start + p - first] if p >= first else win[slot[s], p % W]

        if mode == "csa":
            entries = [j for j in kw["topk_idx"][t].tolist() if j >= 0]
        else:
            entries = list(range(int(kw["n_comp"][t])))
        comp_rows = [comp[page_table[s, j // P], j % P] for j in entries]
        bf16_close(ref[t], _naive(q[t], int(pos[t]), key, comp_rows, sink))


def test_sink_only_softmax_mass_matches_closed_form():
    # One key (position 0), no entries: o = k * e^s / (e^s + e^sink).
    win, comp, sink = _pools(dtype=torch.float32)
    q = torch.randn(1, H, DH)
    slot = torch.tensor([2], dtype=torch.int32)
    out = sparse_attn_decode(q, torch.tensor([0], dtype=torch.int32), win, slot, None, None, sink, SCALE,
                             use_triton=True)
    k = win[2, 0]
    s = q[0] @ k * SCALE
    want = (torch.exp(s) / (torch.exp(s) + torch.exp(sink)))[:, None] * k
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)


def test_rejects_bad_layouts():
    q, pos, win, slot, comp, page_table, sink, kw = _decode_case("csa")
    with pytest.raises(ValueError, match="not both"):
        sparse_attn_decode(q, pos, win, slot, comp, page_table, sink, SCALE, kw["topk_idx"],
                           torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="comp_kv and page_table are required"):
        sparse_attn_decode(q, pos, win, slot, None, None, sink, SCALE, **kw)
    with pytest.raises(ValueError, match="sink must have shape"):
        sparse_attn_decode(q, pos, win, slot, comp, page_table, sink[:2], SCALE, **kw)
    with pytest.raises(ValueError, match="window_kv must be"):
        sparse_attn_decode(q, pos, win[..., :32], slot, comp, page_table, sink, SCALE, **kw)
