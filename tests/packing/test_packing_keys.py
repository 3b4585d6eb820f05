"""Grouping keys and shards: stable, canonical, prefix-only; shards partition rows; no torch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchv4.packing import grouping_key, shard_of


def test_grouping_key_is_blake2b_of_little_endian_uint32_head():
    tokens = [1, 2, 3, 70000, 5]
    data = np.array(tokens[:4], dtype="<u4").tobytes()
    expected = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"bv4pack1").digest(), "little")
    assert grouping_key(tokens, 4) == expected
    # Pinned, so a change of the canonical form (which would reshuffle every spill) is noticed.
    assert grouping_key([1, 2, 3], 64) == grouping_key(np.array([1, 2, 3], dtype=np.uint32), 64)
    assert grouping_key(range(3), 2) == grouping_key((0, 1, 99), 2)


@settings(max_examples=100, deadline=None)
@given(head=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3), tail=st.lists(st.integers(0, 9)))
def test_grouping_key_depends_only_on_the_head_and_not_on_the_container(head, tail):
    key = grouping_key(head + tail, 3)
    assert key == grouping_key(np.array(head + [7], dtype=np.int64), 3)
    assert key == grouping_key(np.array(head, dtype=np.uint64), 3)
    assert 0 <= key < 2**64


prompts = st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=60)


@settings(max_examples=100, deadline=None)
@given(ps=prompts, n_shards=st.integers(1, 7), key_tokens=st.integers(1, 4))
def test_shards_partition_rows_and_keep_shared_heads_together(ps, n_shards, key_tokens):
    shards: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(ps):
        s = shard_of(p, n_shards, key_tokens)
        assert 0 <= s < n_shards
        assert s == shard_of(list(p), n_shards, key_tokens)  # deterministic
        shards[s].append(i)
    # Disjoint and covering: every row in exactly one shard.
    assert sorted(i for rows in shards.values() for i in rows) == list(range(len(ps)))
    by_head: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for p in ps:
        if len(p) >= key_tokens:
            by_head[tuple(p[:key_tokens])].add(shard_of(p, n_shards, key_tokens))
    assert all(len(s) == 1 for s in by_head.values())


def test_shards_spread_distinct_heads():
    counts = np.bincount([shard_of([i, i + 1], 8, 2) for i in range(4000)], minlength=8)
    assert counts.min() > 400


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: shard_of([1], 0), "n_shards must be an integer in"),
        (lambda: shard_of([1], True), "n_shards must be an integer in"),
        (lambda: grouping_key([1], 0), "key_tokens must be a positive integer"),
        (lambda: grouping_key([-1, 2], 4), "token ids must be non-negative"),
        (lambda: grouping_key(["a"], 4), "token ids must be integers"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_packing_never_imports_torch():
    code = (
        "import sys\n"
        "import batchv4.packing as p\n"
        "from batchv4.packing import extsort, keystore, lcp, lru, planner, reference, spill, tree, windows\n"
        "rows = [p.PackInput(i, [i % 3, 1, 2]) for i in range(40)]\n"
        "list(p.plan(rows, window_rows=5))\n"
        "p.naive_lru_prefill(rows, 2, 8)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
