"""Lightning-indexer top-k over paged keys (kernels/indexer.py)."""

import pytest
import torch

from batchv4.kernels.indexer import indexer_topk, indexer_topk_ref, indexer_topk_triton

HI, DI, P = 4, 32, 4


def _case(integer: bool, dtype=torch.float32):
    # Seq 0 owns tokens 0-1, seq 1 tokens 2-4 (cu_seqlens); small integers make every score exact,
    # so ties are real and the tie rule is tested, not float noise.
    def draw(*shape, lo, hi):
        return torch.randint(lo, hi, shape).float() if integer else torch.randn(*shape)

    index_k = draw(16, P, DI, lo=-2, hi=3).to(dtype)
    q = draw(5, HI, DI, lo=-2, hi=3).to(dtype)
    w = draw(5, HI, lo=-1, hi=3)
    page_table = torch.randperm(16)[:16].view(2, 8).int()
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    pos = torch.tensor([2, 21, 3, 40, 100], dtype=torch.int32)  # 0, 5, 1, 10, 25 visible entries
    seq = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    return q, w, index_k, page_table, pos, cu, seq


@pytest.mark.parametrize("topk", [3, 20])
@pytest.mark.parametrize("splits", [1, 3])
def test_exact_scores_match_reference_including_ties_and_padding(topk, splits):
    q, w, index_k, page_table, pos, cu, seq = _case(integer=True)
    out = indexer_topk_triton(q, w, index_k, page_table, pos, topk, seq, num_splits=splits)
    ref = indexer_topk_ref(q, w, index_k, page_table, pos, topk, cu)
    assert out.dtype == torch.int32 and out.shape == (5, topk)
    assert torch.equal(out, ref)
    assert (ref[0] == -1).all()  # token at position 2 sees no entry yet
    if topk == 20:
        assert (ref[1, 5:] == -1).all() and (ref[1, :5] >= 0).all()  # fewer visible than k


def test_ties_go_to_the_lower_index():
    index_k = torch.zeros(4, P, DI)
    index_k[:, :, 0] = 1.0  # every entry scores the same
    q = torch.ones(1, HI, DI)
    w = torch.ones(1, HI)
    page_table = torch.tensor([[3, 1, 0, 2]], dtype=torch.int32)
    out = indexer_topk(q, w, index_k, page_table, torch.tensor([35], dtype=torch.int32), 5, use_triton=True)
    assert out.tolist() == [[0, 1, 2, 3, 4]]


def test_random_scores_select_the_same_top_set(bf16_close):
    q, w, index_k, page_table, pos, cu, seq = _case(integer=False, dtype=torch.bfloat16)
    out = indexer_topk(q, w, index_k, page_table, pos, 6, cu_seqlens=cu, use_triton=True)
    ref = indexer_topk_ref(q, w, index_k, page_table, pos, 6, cu)
    assert torch.equal(out, ref)


def test_visibility_rule_uses_ratio():
    q, w, index_k, page_table, pos, cu, seq = _case(integer=True)
    out = indexer_topk(q, w, index_k, page_table, pos, 64, cu_seqlens=cu, ratio=8, use_triton=True)
    visible = ((pos + 1) // 8).tolist()
    for t in range(5):
        picked = out[t][out[t] >= 0]
        assert picked.numel() == visible[t] and (picked < visible[t]).all()


def test_decode_form_one_sequence_per_token():
    q, w, index_k, page_table, pos, cu, seq = _case(integer=True)
    table = page_table[seq.long()]  # [T, max_pages]: token t is sequence t
    out = indexer_topk(q, w, index_k, table, pos, 4, use_triton=True)
    assert torch.equal(out, indexer_topk_ref(q, w, index_k, page_table, pos, 4, cu))


def test_rejects_bad_layouts():
    q, w, index_k, page_table, pos, cu, seq = _case(integer=True)
    with pytest.raises(ValueError, match="one row per sequence"):
        indexer_topk(q, w, index_k, page_table, pos, 4)  # decode form needs T rows
    with pytest.raises(ValueError, match="weights must have shape"):
        indexer_topk(q, w[:, :2], index_k, page_table, pos, 4, cu_seqlens=cu)
    with pytest.raises(ValueError, match="index_k must be"):
        indexer_topk(q, w, index_k[..., :16], page_table, pos, 4, cu_seqlens=cu)
