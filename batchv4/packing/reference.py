"""Slow, obviously correct counterparts of the planner, kept as test oracles and plan checkers.

Owns naive set- and pairwise-based answers (distinct prefixes, branch points, shared prefixes) and
`replay`, which walks a plan the way the engine would and raises ValueError at the first broken
rule. Quadratic or worse: for tests and small inputs only. Does not own any fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from batchv4.packing.types import PlannedRequest


def distinct_prefix_tokens(prompts: Iterable[Sequence[int]]) -> int:
    """Number of distinct non-empty prefixes: the nodes (tokens) of the exact prefix tree."""
    seen: set[tuple[int, ...]] = set()
    for prompt in prompts:
        p = tuple(prompt)
        seen.update(p[:i] for i in range(1, len(p) + 1))
    return len(seen)


def branch_points(prompts: Sequence[Sequence[int]], min_share: int = 1) -> dict[tuple[int, ...], int]:
    """Prefixes of length >= min_share where the paths continue in 2+ ways -> that many ways - 1.

    Ways: each prompt that ends exactly there, plus each distinct next token.
    """
    ends: dict[tuple[int, ...], int] = {}
    nexts: dict[tuple[int, ...], set[int]] = {}
    for prompt in prompts:
        p = tuple(prompt)
        ends[p] = ends.get(p, 0) + 1
        for i in range(len(p)):
            nexts.setdefault(p[:i], set()).add(p[i])
    out = {}
    for prefix in set(ends) | set(nexts):
        ways = ends.get(prefix, 0) + len(nexts.get(prefix, ()))
        if len(prefix) >= min_share and ways >= 2:
            out[prefix] = ways - 1
    return out


def snapshot_prefixes(prompts: Sequence[Sequence[int]], min_share: int) -> set[tuple[int, ...]]:
    """The branch points that get a snapshot: decided shortest first, each one if it is at least
    min_share tokens longer than the longest snapshot already chosen that is a prefix of it."""
    chosen: set[tuple[int, ...]] = set()
    for prefix in sorted(branch_points(prompts), key=len):
        above = max((len(q) for q in chosen if prefix[:len(q)] == q), default=0)
        if len(prefix) - above >= min_share:
            chosen.add(prefix)
    return chosen


def shared_with_earlier(prompts_in_order: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt, the longest prefix it shares with any earlier prompt (pairwise)."""
    out = []
    for i, prompt in enumerate(prompts_in_order):
        best = 0
        for earlier in prompts_in_order[:i]:
            n = 0
            while n < min(len(prompt), len(earlier)) and prompt[n] == earlier[n]:
                n += 1
            best = max(best, n)
        out.append(best)
    return out


@dataclass
class ReplaySummary:
    requests: int
    prefill_tokens: int
    hit_tokens: int
    snapshots: int
    max_live_snapshots: int
    groups: int


def replay(requests: Iterable[PlannedRequest]) -> ReplaySummary:
    """Walk a plan like the engine: every resume must find a snapshot saved earlier at exactly
    resume_pos from a prompt with the same first resume_pos tokens; saves ascend above resume_pos
    within the prompt; every snapshot is used exactly `uses` times; groups are contiguous runs that
    start at each request without a resume and keep their snapshots to themselves."""
    saved: dict[int, tuple[tuple[int, ...], int, int]] = {}  # id -> (prefix, uses left, group)
    ever: set[int] = set()
    live = max_live = prefill = hits = groups = snapshots = 0
    last_group: int | None = None
    count = 0
    for index, req in enumerate(requests):
        count += 1
        tokens = tuple(req.token_ids)
        where = f"request {index} (key {req.key!r})"
        if req.resume_snap is None:
            if req.resume_pos != 0:
                raise ValueError(f"{where}: resume_pos {req.resume_pos} without a snapshot")
            if last_group is not None and req.group <= last_group:
                raise ValueError(f"{where}: a request without a resume must start a new group")
            groups += 1
        else:
            if req.resume_snap not in saved:
                raise ValueError(f"{where}: snapshot {req.resume_snap} was not saved earlier (or is used up)")
            prefix, left, group = saved[req.resume_snap]
            if len(prefix) != req.resume_pos or tokens[:req.resume_pos] != prefix:
                raise ValueError(f"{where}: snapshot {req.resume_snap} holds another prefix")
            if group != req.group or req.group != last_group:
                raise ValueError(f"{where}: resumes across groups")
            if left == 1:
                del saved[req.resume_snap]
            else:
                saved[req.resume_snap] = (prefix, left - 1, group)
        last_group = req.group
        previous = req.resume_pos
        for save in req.saves:
            if save.snap_id in ever:
                raise ValueError(f"{where}: snapshot id {save.snap_id} saved twice")
            if not previous < save.pos <= len(tokens):
                raise ValueError(f"{where}: save at {save.pos} not ascending within ({req.resume_pos}, {len(tokens)}]")
            if save.uses < 1:
                raise ValueError(f"{where}: snapshot {save.snap_id} has uses {save.uses}")
            saved[save.snap_id] = (tokens[:save.pos], save.uses, req.group)
            snapshots += 1
            ever.add(save.snap_id)
            previous = save.pos
        live += len(req.saves)
        max_live = max(max_live, live)
        if req.resume_snap is not None and req.resume_snap not in saved:
            live -= 1
        prefill += len(tokens) - req.resume_pos
        hits += req.resume_pos
    if saved:
        raise ValueError(f"snapshots never used up: {sorted(saved)[:5]}")
    return ReplaySummary(count, prefill, hits, snapshots, max_live, groups)
