"""Exact expectations on hand-made plans: documents with questions, shared trunks, prefixes, duplicates."""

from __future__ import annotations

import re

import pytest

from batchv4.packing import PackConfig, PackInput, PlanStats, SavePoint, plan, plan_with_stats
from batchv4.packing.reference import replay


def _seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def _view(reqs):
    return [(r.key, r.group, r.resume_snap, r.resume_pos, r.saves) for r in reqs]


def test_document_with_eight_questions():
    doc = _seq(1000, 500)
    items = [PackInput(f"q{i}", doc + _seq(5000 + 100 * i, 20)) for i in (3, 0, 7, 1, 6, 2, 5, 4)]
    other = PackInput("other", _seq(9000, 30))
    reqs, stats = plan_with_stats([items[0], other, *items[1:]])
    assert [r.key for r in reqs] == ["other"] + [f"q{i}" for i in range(8)]
    assert _view(reqs[:2]) == [
        ("other", 0, None, 0, ()),
        ("q0", 1, None, 0, (SavePoint(0, 500, 7),)),
    ]
    assert all(r.resume_snap == 0 and r.resume_pos == 500 and r.saves == () for r in reqs[2:])
    assert [r.api_hit_tokens for r in reqs] == [0, 0] + [448] * 7  # 500 rounded down to 64s
    assert stats == PlanStats(
        rows=9, prompt_tokens=30 + 8 * 520, tree_tokens=30 + 500 + 8 * 20, split_recompute_tokens=0,
        planned_prefill_tokens=30 + 500 + 8 * 20, engine_hit_tokens=7 * 500, api_hit_tokens=7 * 448,
        snapshots=1, snapshot_uses=7, max_live_snapshots=1, groups=2, windows=1, spilled=False,
    )
    assert stats.reuse_ratio == pytest.approx((30 + 8 * 520) / 690)


def test_system_prompt_with_two_few_shot_trunks():
    system, shots_a, shots_b = _seq(100, 100), _seq(1000, 200), _seq(2000, 150)
    rows = {f"a{i}": system + shots_a + _seq(5000 + 100 * i, 30) for i in range(4)}
    rows.update({f"b{j}": system + shots_b + _seq(7000 + 100 * j, 25) for j in range(2)})
    order = ["a2", "b1", "a0", "a3", "b0", "a1"]
    reqs, stats = plan_with_stats([PackInput(k, rows[k]) for k in order])
    # The smaller subtree (b, 2 requests) first; the largest child last frees the system snapshot early.
    assert _view(reqs) == [
        ("b0", 0, None, 0, (SavePoint(0, 100, 1), SavePoint(1, 250, 1))),
        ("b1", 0, 1, 250, ()),
        ("a0", 0, 0, 100, (SavePoint(2, 300, 3),)),
        ("a1", 0, 2, 300, ()),
        ("a2", 0, 2, 300, ()),
        ("a3", 0, 2, 300, ()),
    ]
    assert stats.tree_tokens == stats.planned_prefill_tokens == 100 + 150 + 2 * 25 + 200 + 4 * 30
    assert (stats.snapshots, stats.snapshot_uses, stats.max_live_snapshots, stats.groups) == (3, 5, 2, 1)
    assert [r.api_hit_tokens for r in reqs] == [0, 192, 64, 256, 256, 256]
    replay(reqs)


def test_prompt_that_is_a_prefix_of_others():
    trunk = _seq(10, 40)
    items = [PackInput("long-y", trunk + [7, 8]), PackInput("short", trunk), PackInput("long-x", trunk + [5])]
    reqs, stats = plan_with_stats(items)
    assert _view(reqs) == [
        ("short", 0, None, 0, (SavePoint(0, 40, 2),)),
        ("long-x", 0, 0, 40, ()),
        ("long-y", 0, 0, 40, ()),
    ]
    assert stats.tree_tokens == stats.planned_prefill_tokens == 43


def test_duplicates_resume_at_full_length_in_input_order():
    prompt = _seq(300, 70)
    reqs, stats = plan_with_stats([PackInput(k, prompt) for k in ("x", "y", "z")])
    assert _view(reqs) == [
        ("x", 0, None, 0, (SavePoint(0, 70, 2),)),
        ("y", 0, 0, 70, ()),
        ("z", 0, 0, 70, ()),
    ]
    assert [r.prefill_tokens for r in reqs] == [70, 0, 0]
    assert [r.api_hit_tokens for r in reqs] == [0, 64, 64]
    assert stats.tree_tokens == 70


def test_min_share_skips_short_shared_prefixes_but_tree_tokens_stays_ideal():
    items = [PackInput("a", _seq(0, 10) + [100] * 5), PackInput("b", _seq(0, 10) + [200] * 5)]
    reqs, stats = plan_with_stats(items, min_share=11)
    assert [(r.resume_snap, r.saves) for r in reqs] == [(None, ()), (None, ())]
    assert (stats.tree_tokens, stats.planned_prefill_tokens, stats.groups) == (20, 30, 2)
    reqs, stats = plan_with_stats(items, min_share=10)
    assert [(r.resume_pos, r.saves) for r in reqs] == [(0, (SavePoint(0, 10, 1),)), (10, ())]
    assert (stats.tree_tokens, stats.planned_prefill_tokens, stats.groups) == (20, 20, 1)


def test_no_snapshot_that_saves_fewer_than_min_share_tokens_over_the_one_above():
    trunk = _seq(1, 100)
    items = [PackInput("a0", trunk + [1, 2, 3] + [10] * 5), PackInput("a1", trunk + [1, 2, 3] + [11] * 5),
             PackInput("b", trunk + [9] * 5)]
    reqs, stats = plan_with_stats(items)  # min_share 16: the branch at 103 gains only 3 tokens
    assert _view(reqs) == [
        ("b", 0, None, 0, (SavePoint(0, 100, 2),)),
        ("a0", 0, 0, 100, ()),
        ("a1", 0, 0, 100, ()),
    ]
    assert (stats.tree_tokens, stats.planned_prefill_tokens, stats.max_live_snapshots) == (118, 121, 1)
    reqs, stats = plan_with_stats(items, min_share=3)
    assert _view(reqs)[1:] == [("a0", 0, 0, 100, (SavePoint(1, 103, 1),)), ("a1", 0, 1, 103, ())]
    assert (stats.planned_prefill_tokens, stats.max_live_snapshots) == (118, 2)


def test_group_split_over_windows_recomputes_the_trunk_once_per_window():
    trunk = _seq(1, 80)
    items = [PackInput(i, trunk + [1000 + i] * 3) for i in range(10)]
    cfg = PackConfig(window_rows=4, key_tokens=64, n_buckets=8)
    reqs, stats = plan_with_stats(items, config=cfg)
    windows = [r.window for r in reqs]
    assert stats.spilled and stats.windows == 3 and windows == sorted(windows)
    assert [sum(1 for w in windows if w == i) for i in range(3)] == [4, 4, 2]
    assert stats.split_recompute_tokens == 2 * 80
    assert stats.tree_tokens == 3 * 80 + 10 * 3
    assert stats.planned_prefill_tokens == stats.tree_tokens
    # The provider's cache still holds the trunk from the first window: 80 -> 64 for every row but one.
    assert [r.api_hit_tokens for r in reqs] == [0] + [64] * 9
    replay(reqs)


def test_empty_input_and_empty_prompts():
    stats = PlanStats()
    assert list(plan([], stats=stats)) == [] and stats == PlanStats()
    reqs, stats = plan_with_stats([PackInput("e", []), PackInput("f", ())])
    assert _view(reqs) == [("e", 0, None, 0, ()), ("f", 1, None, 0, ())]
    assert (stats.tree_tokens, stats.prompt_tokens, stats.groups) == (0, 0, 2)


def test_tokens_come_back_as_tuples_of_ints():
    import numpy as np

    reqs = list(plan([PackInput(1, np.array([5, 6, 7], dtype=np.int32)), PackInput(2, range(3))]))
    assert [r.token_ids for r in reqs] == [(0, 1, 2), (5, 6, 7)]
    assert all(type(t) is int for r in reqs for t in r.token_ids)


@pytest.mark.parametrize(
    "item, message",
    [
        (("k", [1, 2]), "row 0: expected a PackInput, got tuple"),
        (PackInput("k", [1, -2]), "row 0 (key 'k'): token ids must be non-negative, found -2"),
        (PackInput("k", [1, 2**32]), "below 2**32"),
        (PackInput("k", [1.5, 2.0]), "must be integers, got dtype float64"),
        (PackInput("k", [[1], [2]]), "must be a flat sequence"),
        (PackInput("k", [2**70]), "must be integers"),
    ],
)
def test_bad_rows_raise_value_error_naming_the_row(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        list(plan([item]))


def test_bad_row_in_spill_path_is_named():
    items = [PackInput(i, [i % 7, 1, 2]) for i in range(50)] + [PackInput("bad", [3, -1])]
    with pytest.raises(ValueError, match="row 50: token ids must be non-negative, found -1"):
        list(plan(items, window_rows=4))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"window_rows": 0}, "window_rows must be a positive integer, got 0"),
        ({"min_share": True}, "min_share must be a positive integer, got True"),
        ({"api_unit": 1.5}, "api_unit must be a positive integer"),
        ({"spill_dir": "/nonexistent/dir"}, "spill_dir is not a directory"),
        ({"config": PackConfig(), "min_share": 3}, "pass either config or options"),
        ({"stats": {}}, "stats must be a PlanStats"),
    ],
)
def test_bad_options_raise_value_error_at_call_time(options, message):
    with pytest.raises(ValueError, match=message):
        plan([], **options)


def test_replay_rejects_broken_plans():
    from dataclasses import replace

    trunk = _seq(10, 40)
    good = list(plan([PackInput(k, trunk + [k]) for k in range(3)]))
    replay(good)
    first, second, third = good
    broken = {
        "was not saved earlier": [second, first, third],
        "holds another prefix": [first, replace(second, resume_pos=39), third],
        "never used up": [first, second],
        "saved twice": [first, replace(second, saves=first.saves), third],
        "not ascending": [replace(first, saves=(SavePoint(0, 42, 2),)), second, third],
        "must start a new group": [first, second, replace(third, resume_snap=None, resume_pos=0)],
    }
    for message, requests in broken.items():
        with pytest.raises(ValueError, match=message):
            replay(requests)
