"""Lexicographic sort and vectorized LCPs on long rows (several doubling rounds), against Python."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchv4.packing import PackInput, plan_with_stats
from batchv4.packing.lcp import adjacent_lcp, lex_sorted, pair_lcp
from batchv4.packing.reference import distinct_prefix_tokens, replay


@st.composite
def long_rows(draw):
    """Rows cut from a few long bases, plus a short tail: long shared prefixes of any length."""
    bases = draw(st.lists(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 2), min_size=1, max_size=300),
                          min_size=1, max_size=3))
    rows = []
    for _ in range(draw(st.integers(0, 25))):
        base = draw(st.sampled_from(bases))
        cut = draw(st.integers(0, len(base)))
        rows.append(base[:cut] + draw(st.lists(st.integers(0, 2), max_size=3)))
    return rows


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    tokens = np.array([t for r in rows for t in r], dtype=np.uint32)
    return tokens, offsets


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=150, deadline=None)
@given(rows=long_rows())
def test_lex_sorted_and_adjacent_lcp_match_python(rows):
    tokens, offsets = _flat(rows)
    order, sorted_tokens = lex_sorted(tokens, offsets)
    expected = sorted(range(len(rows)), key=lambda i: rows[i])  # stable, like the fast path
    assert order.tolist() == expected
    ordered = [rows[i] for i in expected]
    assert sorted_tokens.tolist() == [t for r in ordered for t in r]
    sorted_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in ordered], out=sorted_offsets[1:])
    lcp = adjacent_lcp(sorted_tokens, sorted_offsets)
    assert lcp.tolist() == ([0] if rows else []) + [_lcp(a, b) for a, b in zip(ordered, ordered[1:])]


@settings(max_examples=100, deadline=None)
@given(rows=long_rows(), data=st.data())
def test_pair_lcp_respects_limits(rows, data):
    tokens, offsets = _flat(rows)
    n = len(rows)
    if n == 0:
        return
    a = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10))
    b = data.draw(st.lists(st.integers(0, n - 1), min_size=len(a), max_size=len(a)))
    full = [min(len(rows[i]), len(rows[j])) for i, j in zip(a, b)]
    limit = [data.draw(st.integers(0, f)) for f in full]
    got = pair_lcp(tokens, offsets[a], offsets[b], np.array(limit, dtype=np.int64))
    assert got.tolist() == [min(_lcp(rows[i], rows[j]), m) for i, j, m in zip(a, b, limit)]


@settings(max_examples=100, deadline=None)
@given(rows=long_rows())
def test_plan_of_long_rows_computes_each_tree_token_once(rows):
    reqs, stats = plan_with_stats([PackInput(i, r) for i, r in enumerate(rows)], min_share=1)
    replay(reqs)
    assert stats.tree_tokens == stats.planned_prefill_tokens == distinct_prefix_tokens(rows)


def test_pair_lcp_with_a_tiny_compare_budget():
    from unittest import mock

    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, 200).tolist()
    rows = [base[:c] + rng.integers(0, 3, 2).tolist() for c in rng.integers(0, 200, 40)]
    tokens, offsets = _flat(rows)
    a, b = np.arange(39), np.arange(1, 40)
    limit = np.minimum(np.diff(offsets)[:-1], np.diff(offsets)[1:])
    expected = [_lcp(rows[i], rows[i + 1]) for i in range(39)]
    with mock.patch("batchv4.packing.lcp._MAX_COMPARE", 7):  # forces 1-token-wide rounds
        assert pair_lcp(tokens, offsets[a], offsets[b], limit).tolist() == expected
