"""Value types of packing: inputs, planned requests, save points, statistics and options.

Owns the dataclasses that cross the packing boundary (to the engine, the pipelines and the estimate)
and the validation of packing options. Does not own any planning logic, I/O or hashing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

# Defaults, chosen for prompts of a few hundred to a few thousand tokens.
DEFAULT_WINDOW_ROWS = 65_536
DEFAULT_WINDOW_TOKENS = 4 * 2**20
# 64 = DEFAULT_API_UNIT: rows in different buckets then share fewer tokens than one API unit, so the
# predicted API hits are exact across buckets (see planner.py).
DEFAULT_KEY_TOKENS = 64
# Snapshots are megabytes each; a prefix shorter than this is cheaper to recompute.
DEFAULT_MIN_SHARE = 16
# DeepSeek does not publish the size of its fixed-interval cache prefix units; 64 is an assumption.
DEFAULT_API_UNIT = 64
DEFAULT_BUCKETS = 256
DEFAULT_SORT_ROWS = 262_144
DEFAULT_SORT_TOKENS = 4 * 2**20
DEFAULT_SPILL_BUFFER_ROWS = 65_536
DEFAULT_SPILL_BUFFER_TOKENS = 2 * 2**20
DEFAULT_MERGE_FAN_IN = 16

MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class PackInput:
    """One prompt to plan. `key` is opaque to packing and comes back unchanged."""

    key: object
    token_ids: Sequence[int]


@dataclass(frozen=True)
class SavePoint:
    """A snapshot the request must save after prefilling `pos` of its prompt tokens.

    `uses` later requests of the plan resume from it; after the last of them it can be freed.
    """

    snap_id: int
    pos: int
    uses: int


@dataclass(frozen=True)
class PlannedRequest:
    """One request in plan order.

    `token_ids` is a tuple of Python ints. The engine restores snapshot `resume_snap` (saved by an
    earlier request of the plan at exactly `resume_pos` tokens, whose prompt starts with the same
    `resume_pos` tokens), prefills `token_ids[resume_pos:]`, and saves each of `saves` (ascending
    `pos`) on the way. `resume_pos == len(token_ids)` happens for duplicates: the snapshot then has
    to carry the last position's logits. Groups and snapshots never span two windows.
    """

    key: object
    token_ids: tuple[int, ...]
    group: int
    resume_snap: int | None
    resume_pos: int
    saves: tuple[SavePoint, ...]
    api_hit_tokens: int = 0
    window: int = 0

    @property
    def prefill_tokens(self) -> int:
        return len(self.token_ids) - self.resume_pos


@dataclass
class PlanStats:
    """Totals of a plan; filled while `plan()` streams and complete once it is exhausted."""

    rows: int = 0
    prompt_tokens: int = 0
    # Distinct non-empty prefixes summed over windows: the least prefill work for this windowing.
    tree_tokens: int = 0
    # Part of tree_tokens caused by cutting a bucket into windows (trunks recomputed per window).
    split_recompute_tokens: int = 0
    # What the plan makes the engine prefill: prompt_tokens - engine_hit_tokens. Above tree_tokens
    # only where min_share kept a snapshot out (it would have saved fewer than min_share tokens).
    planned_prefill_tokens: int = 0
    engine_hit_tokens: int = 0
    api_hit_tokens: int = 0
    snapshots: int = 0
    snapshot_uses: int = 0
    max_live_snapshots: int = 0
    groups: int = 0
    windows: int = 0
    spilled: bool = False

    @property
    def reuse_ratio(self) -> float:
        """prompt_tokens / tree_tokens: the predicted reuse of the ideal plan."""
        return self.prompt_tokens / self.tree_tokens if self.tree_tokens else 1.0

    @property
    def planned_reuse_ratio(self) -> float:
        """prompt_tokens / planned_prefill_tokens: the reuse this plan gives the engine."""
        if not self.planned_prefill_tokens:
            return 1.0
        return self.prompt_tokens / self.planned_prefill_tokens

    @property
    def api_hit_ratio(self) -> float:
        return self.api_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PackConfig:
    """Packing options.

    window_rows / window_tokens: the exact prefix tree is built over at most this many rows or
        tokens at once (a single longer row still forms a window of its own).
    key_tokens: rows are grouped (bucketed, sharded) by a hash of their first key_tokens tokens.
    min_share: a branch point gets a snapshot only if it saves at least this many tokens over the
        nearest snapshot above it (so never for a shared prefix shorter than this); the tokens it
        would have saved are recomputed.
    api_unit: size of a provider cache unit, for the API hit prediction.
    n_buckets: spill buckets when the input exceeds one window.
    sort_rows / sort_tokens: a bucket up to this size is sorted in memory; larger ones, and the runs
        of their external merge sort, are cut to it.
    spill_buffer_rows / spill_buffer_tokens: rows buffered in memory before a write to the buckets.
    merge_fan_in: runs merged at once by the external sort.
    spill_dir: where the temporary spill directory is created (None: the system temp dir).

    Memory is bounded by these sizes, not by the input: roughly 20 bytes per token of
    max(window_tokens, sort_tokens) while sorting and planning, 4-8 bytes per token of
    spill_buffer_tokens and of the first window, and a few hundred bytes per row of a window
    (about 100 MiB with the defaults). Disk holds the whole input's tokens (4 bytes each).
    """

    window_rows: int = DEFAULT_WINDOW_ROWS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    key_tokens: int = DEFAULT_KEY_TOKENS
    min_share: int = DEFAULT_MIN_SHARE
    api_unit: int = DEFAULT_API_UNIT
    n_buckets: int = DEFAULT_BUCKETS
    sort_rows: int = DEFAULT_SORT_ROWS
    sort_tokens: int = DEFAULT_SORT_TOKENS
    spill_buffer_rows: int = DEFAULT_SPILL_BUFFER_ROWS
    spill_buffer_tokens: int = DEFAULT_SPILL_BUFFER_TOKENS
    merge_fan_in: int = DEFAULT_MERGE_FAN_IN
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "window_rows", "window_tokens", "key_tokens", "min_share", "api_unit", "n_buckets",
            "sort_rows", "sort_tokens", "spill_buffer_rows", "spill_buffer_tokens",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("merge_fan_in", self.merge_fan_in)
        if self.merge_fan_in < 2:
            raise ValueError(f"merge_fan_in must be at least 2, got {self.merge_fan_in}")
        if self.n_buckets > 2**32:
            raise ValueError(f"n_buckets must be at most 2**32, got {self.n_buckets}")
        if self.spill_dir is not None and not os.path.isdir(self.spill_dir):
            raise ValueError(f"spill_dir is not a directory: {self.spill_dir!r}")
