"""The indexer's top-k (linear in the entries) against the obvious stable sort, ties included, and
the packed prefill's bounded query blocks against the unbounded ones."""

import pytest
import torch

from batchv4.config import ModelConfig
from batchv4.model.compressor import Indexer
from batchv4.model.model import Transformer
from cache_harness import Harness


def sorted_top(score: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
    """The slow obvious rule: a stable descending sort of the visible scores, the first k, as a set."""
    out = []
    for row, lim in zip(score.tolist(), limit.tolist()):
        order = sorted(range(lim), key=lambda j: (-row[j], j))[:k]
        out.append(sorted(order) + [-1] * (k - len(order)))
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_top_equals_stable_sort_with_ties_and_short_rows(k):
    g = torch.Generator().manual_seed(k)
    score = torch.randint(-3, 4, (64, 40), generator=g).float()      # few values: many exact ties
    score[:8] = 0.0                                                 # whole rows tied (ReLU zeros)
    limit = torch.randint(0, 41, (64,), generator=g)
    limit[:3] = torch.tensor([0, 1, 40])
    assert torch.equal(Indexer._top(score, limit, k), sorted_top(score, limit, k))


def test_select_blocks_do_not_change_the_selection():
    g = torch.Generator().manual_seed(0)
    ind = Indexer.__new__(Indexer)
    ind.topk, ind.ratio = 5, 4
    q, w = torch.randn(70, 8, 16, generator=g), torch.randn(70, 8, generator=g)
    keys, pos = torch.randn(17, 16, generator=g), torch.arange(70)
    whole = Indexer.select(ind, q, w, keys, pos, block=256)
    assert torch.equal(Indexer.select(ind, q, w, keys, pos, block=256, budget=8 * 17 * 3), whole)


def test_packed_prefill_with_a_tiny_score_budget_matches():
    """One query per block (the budget forces it) gives the logits of the default blocks, over
    two chunks of a document that every compressed kind has entries for."""
    model = Transformer(ModelConfig.load("test")).float().init_random(3, std=0.1)
    ids = torch.randint(2, 512, (150,), generator=torch.Generator().manual_seed(1)).tolist()

    def logits():
        h = Harness(model)
        return torch.cat([h.step([(0, ids[:97])]), h.step([(0, ids[97:])])])

    want = logits()
    for layer in model.layers.values():
        layer.attn.score_budget = 1
    try:
        got = logits()
    finally:
        for layer in model.layers.values():
            layer.attn.score_budget = 1 << 20
    assert (got - want).abs().max() < 1e-5
