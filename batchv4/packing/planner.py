"""`plan()`: stream PackInputs in, PlannedRequests out, in bounded memory.

Owns the flow and the plan-global numbering (snapshot ids, group ids, window ids) and the stats.
An input that fits one window is planned in memory as one window. A larger one goes through two
stages: (1) rows are partitioned by grouping key into spill buckets on local disk (spill.py);
(2) each bucket, in ascending bucket order, is sorted (extsort.py), cut into windows (windows.py),
and each window is planned on its exact prefix tree (tree.py). Rows that share their first
`key_tokens` tokens share a bucket and are adjacent in its sorted stream, so they land in the same
window or in consecutive ones.

API hits: a request is credited the longest prefix, rounded down to `api_unit`, that it shares
with any earlier request of the plan. Within a bucket this is exact (earlier windows of a bucket
hold exactly its lexicographically smaller rows). Rows of different buckets share fewer than
`key_tokens` tokens, so with key_tokens <= api_unit (the defaults) it is exact for the whole plan;
otherwise it is a lower bound.
"""

from __future__ import annotations

import tempfile
from typing import Iterable, Iterator

import numpy as np

from batchv4.packing.extsort import sorted_stream
from batchv4.packing.keys import as_token_array, check_token_range
from batchv4.packing.lcp import adjacent_lcp, lex_sorted
from batchv4.packing.spill import Spiller
from batchv4.packing.tree import plan_window
from batchv4.packing.types import PackConfig, PackInput, PlannedRequest, PlanStats, SavePoint
from batchv4.packing.windows import Window, WindowCutter


def _config(config: PackConfig | None, options: dict[str, object]) -> PackConfig:
    given = {name: value for name, value in options.items() if value is not None}
    if config is None:
        return PackConfig(**given)  # type: ignore[arg-type]
    if not isinstance(config, PackConfig):
        raise ValueError(f"config must be a PackConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config or options, not both (got {', '.join(sorted(given))})")
    return config


def plan(
    items: Iterable[PackInput],
    *,
    window_rows: int | None = None,
    window_tokens: int | None = None,
    key_tokens: int | None = None,
    min_share: int | None = None,
    api_unit: int | None = None,
    n_buckets: int | None = None,
    spill_dir: str | None = None,
    config: PackConfig | None = None,
    stats: PlanStats | None = None,
) -> Iterator[PlannedRequest]:
    """Plan `items` and yield every one of them exactly once, as PlannedRequests in plan order.

    Options left as None take PackConfig's defaults; or pass a whole `config`. If `stats` is given
    it is updated as the plan streams and is complete once the iterator is exhausted. Options are
    checked now; rows are checked before the first request is yielded (ValueError naming the row).
    """
    cfg = _config(config, {
        "window_rows": window_rows, "window_tokens": window_tokens, "key_tokens": key_tokens,
        "min_share": min_share, "api_unit": api_unit, "n_buckets": n_buckets, "spill_dir": spill_dir,
    })
    if stats is not None and not isinstance(stats, PlanStats):
        raise ValueError(f"stats must be a PlanStats, got {type(stats).__name__}")
    return _Planner(cfg, stats if stats is not None else PlanStats()).run(items)


def plan_counts(items: Iterable[PackInput], *, stats: PlanStats | None = None,
                **options: object) -> Iterator[tuple[object, int, int, int]]:
    """`plan()`'s requests as `(key, prompt tokens, resume_pos, api_hit_tokens)`, in plan order,
    for callers that only count (the estimate): the same plan and stats, without building each
    request's token tuple, save points and object, which take most of planning's time. Takes
    plan()'s keyword options."""
    if stats is not None and not isinstance(stats, PlanStats):
        raise ValueError(f"stats must be a PlanStats, got {type(stats).__name__}")
    config = options.pop("config", None)
    return _Planner(_config(config, options), stats if stats is not None else PlanStats(),  # type: ignore[arg-type]
                    counts_only=True).run(items)


def plan_with_stats(items: Iterable[PackInput], **options: object) -> tuple[list[PlannedRequest], PlanStats]:
    """The whole plan as a list, and its stats. Takes plan()'s keyword options."""
    if "stats" in options:
        raise ValueError("plan_with_stats makes its own stats; do not pass stats")
    stats = PlanStats()
    requests = list(plan(items, stats=stats, **options))  # type: ignore[arg-type]
    return requests, stats


def _row(item: object, ordinal: int) -> tuple[object, np.ndarray]:
    if not isinstance(item, PackInput):
        raise ValueError(f"row {ordinal}: expected a PackInput, got {type(item).__name__}")
    try:
        return item.key, as_token_array(item.token_ids)
    except ValueError as exc:
        raise ValueError(f"row {ordinal} (key {item.key!r}): {exc}") from None


class _Planner:
    def __init__(self, config: PackConfig, stats: PlanStats, counts_only: bool = False) -> None:
        self._cfg = config
        self._stats = stats
        self._counts_only = counts_only
        # Ids start at 0 for every plan, even when a caller's stats object accumulates several.
        self._next_group = 0
        self._next_snap = 0
        self._next_window = 0

    def run(self, items: Iterable[PackInput]) -> Iterator[PlannedRequest]:
        cfg = self._cfg
        source = iter(items)
        buffered: list[tuple[object, np.ndarray]] = []
        tokens = 0
        for item in source:
            key, array = _row(item, len(buffered))
            buffered.append((key, array))
            tokens += len(array)
            if len(buffered) > cfg.window_rows or tokens > cfg.window_tokens:
                break
        else:
            yield from self._in_memory(buffered)
            return
        self._stats.spilled = True
        with tempfile.TemporaryDirectory(prefix="batchv4-pack-", dir=cfg.spill_dir) as workdir:
            spiller = Spiller(workdir, cfg)
            try:
                for key, array in buffered:
                    spiller.add(key, array)
                del buffered
                for item in source:
                    spiller.add(*_row(item, spiller.rows))
                spiller.finish()
                for index, bucket in spiller.buckets():
                    cutter = WindowCutter(cfg.window_rows, cfg.window_tokens)
                    for chunk in sorted_stream(bucket, cfg, f"{workdir}/s{index:010d}"):
                        for window in cutter.feed(*chunk):
                            yield from self._emit(window, spiller.keys.get(window.ords))
                    for window in cutter.finish():
                        yield from self._emit(window, spiller.keys.get(window.ords))
                    bucket.delete()
            finally:
                spiller.close()

    def _in_memory(self, rows: list[tuple[object, np.ndarray]]) -> Iterator[PlannedRequest]:
        if not rows:
            return
        lens = np.fromiter((len(a) for _, a in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.concatenate([a for _, a in rows])
        try:
            check_token_range(flat)
        except ValueError:
            for ordinal, (key, array) in enumerate(rows):
                check_token_range(array, where=f"row {ordinal} (key {key!r})")
            raise
        order, sorted_tokens = lex_sorted(flat.astype(np.uint32), offsets)
        sorted_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens[order], out=sorted_offsets[1:])
        window = Window(sorted_tokens, sorted_offsets, order, adjacent_lcp(sorted_tokens, sorted_offsets))
        keys = [rows[i][0] for i in order.tolist()]
        del rows
        yield from self._emit(window, keys)

    def _emit(self, window: Window, keys: list[object]) -> Iterator[PlannedRequest]:
        """keys: per window row (lexicographic index)."""
        cfg = self._cfg
        stats = self._stats
        lens = window.lens
        wp = plan_window(lens, window.lcp, cfg.min_share, cfg.api_unit)
        snap_base = self._next_snap
        window_id = self._next_window
        first_group = self._next_group
        self._next_snap += wp.snapshots
        self._next_window += 1
        self._next_group += wp.groups

        stats.rows += len(lens)
        stats.prompt_tokens += int(lens.sum())
        stats.tree_tokens += wp.tree_tokens
        stats.split_recompute_tokens += int(window.lcp[0]) if len(lens) else 0
        stats.planned_prefill_tokens += wp.planned_prefill
        stats.engine_hit_tokens += sum(wp.resume_pos)
        stats.api_hit_tokens += sum(wp.api_hit)
        stats.snapshots += wp.snapshots
        stats.snapshot_uses += wp.snapshot_uses
        stats.max_live_snapshots = max(stats.max_live_snapshots, wp.max_live)
        stats.groups += wp.groups
        stats.windows += 1

        if self._counts_only:
            lens_l = lens.tolist()
            yield from zip([keys[r] for r in wp.rows], [lens_l[r] for r in wp.rows], wp.resume_pos, wp.api_hit)
            return
        tokens = window.tokens
        offsets = window.offsets.tolist()
        group = first_group - 1
        for row, snap, pos, saves, api in zip(wp.rows, wp.resume_snap, wp.resume_pos, wp.saves, wp.api_hit):
            if snap < 0:
                group += 1
            yield PlannedRequest(
                key=keys[row],
                token_ids=tuple(tokens[offsets[row]:offsets[row + 1]].tolist()),
                group=group,
                resume_snap=None if snap < 0 else snap_base + snap,
                resume_pos=pos,
                saves=tuple(SavePoint(snap_base + s, p, u) for s, p, u in saves),
                api_hit_tokens=api,
                window=window_id,
            )
