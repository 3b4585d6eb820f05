"""Shared-prefix cost shown amortized over the rows that reused the prefix (`cost_usd_amortized`).

Owns: redistributing, inside each prefix group, what was billed for the shared prefix so every
row pays the same per shared token. The sum over a group is unchanged. Does not own: forming the
groups (`batchv4.packing`) or pricing rows (`pricing`).

Under API cache semantics the first row of a group pays cache-miss input for the whole prefix and
the rows after it pay the cheap cache-hit price, so per-row costs depend on the processing order.
Here the group's shared prefix is S = the longest cache hit in the group; row r shares
s_r = min(S, prompt_r) tokens. What r was billed for its first s_r tokens (its hits, plus misses
for any of those tokens that missed) goes into a pool, and each row gets pool * s_r / sum(s).
Tokens after the prefix and completion tokens stay with their row.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from batchv4.accounting.pricing import RowCost, RowUsage


@dataclass(frozen=True)
class PricedRow:
    usage: RowUsage
    cost: RowCost | None  # None when the card has no token prices


def _shared_billed(row: PricedRow, shared: int) -> float:
    u, c = row.usage, row.cost
    extra_missed = shared - u.prompt_cache_hit_tokens  # >= 0: hits never exceed the group's longest hit
    if extra_missed <= 0:
        return c.hit_usd
    return c.hit_usd + c.miss_usd * extra_missed / u.prompt_cache_miss_tokens


def amortized_costs(rows: Sequence[PricedRow], prefix_groups: Sequence[Hashable | None]) -> list[float | None]:
    """`cost_usd_amortized` for each row; a row with group None keeps its own cost."""
    if len(rows) != len(prefix_groups):
        raise ValueError(f"rows ({len(rows)}) and prefix_groups ({len(prefix_groups)}) differ in length")
    out: list[float | None] = [None if r.cost is None else r.cost.total_usd for r in rows]
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(prefix_groups):
        if g is not None and rows[i].cost is not None:
            members.setdefault(g, []).append(i)
    for idx in members.values():
        longest = max(rows[i].usage.prompt_cache_hit_tokens for i in idx)
        shared = {i: min(longest, rows[i].usage.prompt_tokens) for i in idx}
        total_shared = sum(shared.values())
        if len(idx) < 2 or total_shared == 0:
            continue
        billed = {i: _shared_billed(rows[i], shared[i]) for i in idx}
        pool = sum(billed.values())
        for i in idx:
            out[i] = rows[i].cost.total_usd - billed[i] + pool * shared[i] / total_shared
    return out
