"""Property tests of the planner against naive oracles (sets of prefixes, pairwise comparisons)."""

from __future__ import annotations

import math
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchv4.packing import PackConfig, PackInput, plan, plan_with_stats
from batchv4.packing.keys import bucket_of_key, grouping_key
from batchv4.packing.reference import (
    branch_points,
    distinct_prefix_tokens,
    replay,
    shared_with_earlier,
    snapshot_prefixes,
)

# A tiny vocabulary and short prompts, so that prefixes collide a lot.
prompt = st.lists(st.integers(0, 3), max_size=12)
prompts = st.lists(prompt, max_size=30)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _items(ps: list[list[int]]) -> list[PackInput]:
    return [PackInput(i, p) for i, p in enumerate(ps)]


def _check_every_row_once(ps: list[list[int]], reqs: list) -> None:
    assert sorted(r.key for r in reqs) == list(range(len(ps)))
    for r in reqs:
        assert list(r.token_ids) == ps[r.key]


def _deepest_earlier_snapshot(reqs: list) -> list[int]:
    """Per request: length of the deepest snapshot saved before it that its prompt starts with."""
    saved: set[tuple[int, ...]] = set()
    out = []
    for r in reqs:
        t = tuple(r.token_ids)
        out.append(max((len(s) for s in saved if t[:len(s)] == s), default=0))
        saved.update(t[:s.pos] for s in r.saves)
    return out


@SETTINGS
@given(ps=prompts, min_share=st.integers(1, 4), api_unit=st.integers(1, 5))
def test_single_window_matches_oracle(ps, min_share, api_unit):
    reqs, stats = plan_with_stats(_items(ps), min_share=min_share, api_unit=api_unit)
    _check_every_row_once(ps, reqs)
    summary = replay(reqs)  # snapshot rules: saved earlier, same prefix, uses exact, groups
    distinct = distinct_prefix_tokens(ps)

    assert stats.tree_tokens == distinct
    if min_share == 1:
        assert sum(len(r.token_ids) - r.resume_pos for r in reqs) == distinct
    # One snapshot per branch point that saves >= min_share tokens over the snapshot above it;
    # with min_share 1 that is every branch point, used once per further way the path goes.
    saved = {tuple(r.token_ids[:s.pos]): s.uses for r in reqs for s in r.saves}
    assert set(saved) == snapshot_prefixes(ps, min_share)
    if min_share == 1:
        assert saved == branch_points(ps)
    # Each request resumes from the deepest snapshot on its path saved earlier ...
    assert [r.resume_pos for r in reqs] == _deepest_earlier_snapshot(reqs)
    # ... the deepest snapshot within the longest prefix it shares with an earlier request.
    shared = shared_with_earlier([r.token_ids for r in reqs])
    for r, s in zip(reqs, shared):
        head = tuple(r.token_ids[:s])
        assert r.resume_pos == max((len(q) for q in saved if head[:len(q)] == q), default=0)
    assert [r.api_hit_tokens for r in reqs] == [s - s % api_unit for s in shared]

    assert stats.rows == len(ps) == summary.requests
    assert stats.prompt_tokens == sum(map(len, ps))
    assert stats.planned_prefill_tokens == summary.prefill_tokens
    assert stats.engine_hit_tokens == summary.hit_tokens
    assert stats.planned_prefill_tokens + stats.engine_hit_tokens == stats.prompt_tokens
    assert stats.api_hit_tokens == sum(r.api_hit_tokens for r in reqs)
    assert stats.snapshots == summary.snapshots == len(saved)
    assert stats.snapshot_uses == sum(saved.values())
    assert stats.max_live_snapshots == summary.max_live_snapshots
    assert stats.groups == summary.groups
    assert stats.windows == (1 if ps else 0) and not stats.spilled
    assert stats.split_recompute_tokens == 0
    if ps:
        # Largest child last: at most about log2(rows) snapshots are ever live.
        assert stats.max_live_snapshots <= int(math.log2(len(ps))) + 1


@SETTINGS
@given(ps=prompts, data=st.data())
def test_order_depends_only_on_content(ps, data):
    shuffled = data.draw(st.permutations(list(range(len(ps)))))
    first = [r.token_ids for r in plan(_items(ps), min_share=1)]
    again = [r.token_ids for r in plan([PackInput(i, ps[i]) for i in shuffled], min_share=1)]
    assert first == again


@st.composite
def spill_configs(draw):
    return PackConfig(
        window_rows=draw(st.integers(1, 6)),
        window_tokens=draw(st.integers(1, 40)),
        key_tokens=draw(st.integers(1, 4)),
        min_share=draw(st.integers(1, 3)),
        api_unit=draw(st.integers(1, 5)),
        n_buckets=draw(st.integers(1, 4)),
        sort_rows=draw(st.integers(1, 8)),
        sort_tokens=draw(st.integers(1, 60)),
        spill_buffer_rows=draw(st.integers(1, 5)),
        spill_buffer_tokens=draw(st.integers(1, 50)),
        merge_fan_in=draw(st.integers(2, 3)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps=prompts, cfg=spill_configs())
def test_windows_and_spill(ps, cfg):
    reqs, stats = plan_with_stats(_items(ps), config=cfg)
    _check_every_row_once(ps, reqs)
    summary = replay(reqs)
    assert stats.spilled == (len(ps) > cfg.window_rows or sum(map(len, ps)) > cfg.window_tokens)
    assert stats.planned_prefill_tokens == summary.prefill_tokens
    assert stats.max_live_snapshots == summary.max_live_snapshots

    by_window: dict[int, list] = defaultdict(list)
    for r in reqs:
        by_window[r.window].append(r)
    assert sorted(by_window) == list(range(stats.windows))
    for rows in by_window.values():
        tokens = sum(len(r.token_ids) for r in rows)
        assert len(rows) <= cfg.window_rows
        assert tokens <= cfg.window_tokens or len(rows) == 1
    # The exact tree per window; windows of one bucket together lose exactly split_recompute.
    assert stats.tree_tokens == sum(distinct_prefix_tokens([r.token_ids for r in w]) for w in by_window.values())
    if cfg.min_share == 1:
        assert stats.planned_prefill_tokens == stats.tree_tokens
    by_bucket: dict[int, list] = defaultdict(list)
    for p in ps:
        by_bucket[bucket_of_key(grouping_key(p, cfg.key_tokens), cfg.n_buckets)].append(p)
    bucket_ideal = sum(distinct_prefix_tokens(b) for b in by_bucket.values())
    ideal = bucket_ideal if stats.spilled else distinct_prefix_tokens(ps)
    assert stats.tree_tokens - stats.split_recompute_tokens == ideal

    # Rows with one grouping key: consecutive windows, and adjacent within each window.
    positions: dict[int, list[int]] = defaultdict(list)
    for index, r in enumerate(reqs):
        positions[grouping_key(r.token_ids, cfg.key_tokens)].append(index)
    for indexes in positions.values():
        windows = sorted({reqs[i].window for i in indexes})
        assert windows == list(range(windows[0], windows[-1] + 1))
        for w in windows:
            inside = [i for i in indexes if reqs[i].window == w]
            assert inside == list(range(inside[0], inside[-1] + 1))

    # API hits: exact against all earlier requests when key_tokens <= api_unit, else a lower bound.
    shared = shared_with_earlier([r.token_ids for r in reqs])
    oracle = [s - s % cfg.api_unit for s in shared]
    got = [r.api_hit_tokens for r in reqs]
    if cfg.key_tokens <= cfg.api_unit or not stats.spilled:
        assert got == oracle
    else:
        assert all(g <= o for g, o in zip(got, oracle))
    assert stats.api_hit_tokens == sum(got)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps=prompts, cfg=spill_configs(), buffer_rows=st.integers(1, 40))
def test_spill_plan_is_deterministic(ps, cfg, buffer_rows):
    first = [(r.key, r.resume_pos, r.saves) for r in plan(_items(ps), config=cfg)]
    other = PackConfig(**{**cfg.__dict__, "spill_buffer_rows": buffer_rows})
    assert [(r.key, r.resume_pos, r.saves) for r in plan(_items(ps), config=other)] == first
