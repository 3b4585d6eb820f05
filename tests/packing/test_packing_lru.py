"""naive_lru_prefill (the vLLM-style baseline) on hand-made examples with exact numbers."""

from __future__ import annotations

import pytest

from batchv4.packing import PackInput, naive_lru_prefill


def _s(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_partial_last_block_is_recomputed():
    a = _s(0, 10)  # blocks of 4: two full blocks + 2 tokens
    assert naive_lru_prefill([a, a], block_size=4) == 10 + 2
    assert naive_lru_prefill([a, a + [99]], block_size=4) == 10 + 3


def test_fully_cached_prompt_recomputes_its_last_block():
    b = _s(0, 8)
    # Both blocks cached, but the hit is capped at len - 1 = 7 tokens: one whole block.
    assert naive_lru_prefill([b, b], block_size=4) == 8 + 4


def test_hits_need_the_whole_prefix_chain():
    first = [1, 1, 1, 1, 2, 2, 2, 2]
    second = [3, 3, 3, 3, 2, 2, 2, 2, 5]  # same second block, different parent: no hit
    assert naive_lru_prefill([first, second], block_size=4) == 8 + 9
    assert naive_lru_prefill([first, first[:4] + [9, 9, 9, 9, 9]], block_size=4) == 8 + 5


def test_lru_eviction_by_capacity():
    a, c = _s(0, 8), _s(100, 8)
    assert naive_lru_prefill([a, c, a], block_size=4, capacity_blocks=2) == 24
    assert naive_lru_prefill([a, c, a], block_size=4, capacity_blocks=4) == 8 + 8 + 4


def test_deeper_blocks_of_a_request_are_evicted_first():
    a, d = _s(0, 12), _s(500, 4)
    # After a: a3 is the least recent of a's blocks; d pushes it out, a1 and a2 survive.
    assert naive_lru_prefill([a, d, a + [7]], block_size=4, capacity_blocks=3) == 12 + 4 + 5


def test_accepts_pack_inputs_and_empty_prompts():
    items = [PackInput("x", _s(0, 5)), PackInput("y", []), PackInput("z", _s(0, 5))]
    assert naive_lru_prefill(items, block_size=2) == 5 + 0 + 1


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"capacity_blocks": 0}, {"block_size": True}])
def test_bad_sizes_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        naive_lru_prefill([[1, 2]], **kwargs)


def test_bad_row_names_the_row():
    with pytest.raises(ValueError, match="row 1: token ids must be non-negative"):
        naive_lru_prefill([[1], [-1]])
