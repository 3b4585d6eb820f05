"""Spill path at scale: bounded memory, temp-file cleanup, the key store, and a large smoke run."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from batchv4.packing import PackConfig, PackInput, PlanStats, plan
from batchv4.packing.keystore import KeyStore, decode_key, encode_key

SMALL = PackConfig(
    window_rows=200, window_tokens=1600, key_tokens=4, min_share=2, n_buckets=8, sort_rows=300,
    sort_tokens=2400, spill_buffer_rows=500, spill_buffer_tokens=4000,
)


def _rows(n: int):
    """8-token prompts in groups of 16 sharing a 5-token head, the groups interleaved."""
    groups = n // 16 + 1
    for i in range(n):
        g = i % groups
        yield PackInput(i, [g % 1000, g // 1000, 7, 7, 7, i % 13, i % 101, i % 7])


def _run(n: int, config: PackConfig) -> PlanStats:
    stats = PlanStats()
    seen = np.zeros(n, dtype=bool)
    for r in plan(_rows(n), config=config, stats=stats):
        assert not seen[r.key]
        seen[r.key] = True
    assert seen.all()
    return stats


def test_200k_rows_through_the_spill_path():
    cfg = PackConfig(window_rows=2000, window_tokens=16000, key_tokens=4, min_share=2, n_buckets=16,
                     sort_rows=4000, sort_tokens=32000)
    stats = _run(200_000, cfg)
    assert stats.spilled and stats.rows == 200_000 and stats.windows > 100
    assert stats.planned_prefill_tokens <= stats.tree_tokens + stats.rows  # shares below min_share
    assert stats.engine_hit_tokens > 0.5 * stats.prompt_tokens


def _peak(n: int) -> int:
    tracemalloc.start()
    try:
        _run(n, SMALL)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_heap_does_not_grow_with_the_input():
    small, double = _peak(5_000), _peak(10_000)
    # Bounded by the window, sort and buffer sizes (plus the test's own 1-byte-per-row array).
    assert small < 2**20 and double < 2**20
    assert double < small + 2**18


def test_spill_directory_is_removed_when_done_or_abandoned(tmp_path):
    cfg = PackConfig(**{**SMALL.__dict__, "spill_dir": str(tmp_path)})
    _run(3000, cfg)
    assert os.listdir(tmp_path) == []
    stream = plan(_rows(3000), config=cfg)
    next(stream)
    assert len(os.listdir(tmp_path)) == 1
    stream.close()
    assert os.listdir(tmp_path) == []


def test_one_huge_group_goes_through_the_external_sort():
    trunk = list(range(100, 140))
    # 5000 distinct rows (131 and 41 are coprime) in subgroups of about 38 rows sharing 41 tokens.
    items = [PackInput(i, trunk + [i % 131, i % 41]) for i in range(5000)]
    cfg = PackConfig(**{**SMALL.__dict__, "window_rows": 500, "window_tokens": 4000})
    stats = PlanStats()
    out = list(plan(items, config=cfg, stats=stats))
    assert sorted(r.key for r in out) == list(range(5000))
    # One bucket sorted as a whole (88 runs, merged in two passes): the windows together lose only
    # the trunk at each cut, and every cut falls between subgroups (lcp 40), never inside one.
    assert stats.windows >= 5000 * 42 // 4000
    assert stats.tree_tokens - stats.split_recompute_tokens == 40 + 131 + 5000
    assert stats.split_recompute_tokens == 40 * (stats.windows - 1)


KEYS = [
    0, -1, 2**63 - 1, -(2**63), 2**80, -(2**90), "", "row-1", "\udcff surrogate", "é漢", b"", b"\x00\xff",
    None, True, False, 1.5, float("inf"), (), (1, "a", (b"x", None)), ((),), (2**70, -3.25),
]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_key_codec_round_trips_type_and_value(key):
    encoded = encode_key(key)
    assert encoded is not None
    back = decode_key(encoded)
    assert back == key and type(back) is type(key)


def test_key_store_keeps_unsupported_keys_in_memory(tmp_path):
    odd = [frozenset({1}), object(), (1, [2])]
    store = KeyStore(str(tmp_path))
    for key in KEYS + odd:
        store.add(key)
        if len(store) % 5 == 0:
            store.flush()
    store.seal()
    ordinals = np.array([len(KEYS) + 1, 0, 3, len(KEYS), len(KEYS) + 2, 7], dtype=np.int64)
    got = store.get(ordinals)
    expected = [(KEYS + odd)[i] for i in ordinals.tolist()]
    assert got[0] is odd[1] and got[4] is odd[2] and got[3] is odd[0]
    assert got == expected
    store.close()
