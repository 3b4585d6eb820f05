"""Routing of prefix groups to engine replicas (the Ray executor), and the round-robin baseline.

Owns: the pure functions that decide which replica runs which rows. `Router` deals whole plan
groups (the rows that share a prefix, `PlannedRequest.group`), as they stream out of the plan, to
the replica with the fewest tokens so far, so a shared prefix is prefilled once and the replicas'
token loads stay within one group of each other. `split_group` cuts a group larger than a piece
(one system prompt over a whole dataset is one group) at branch points, so its pieces can go to
several replicas, each piece paying for the shared prefix it must compute again. `round_robin_blocks` is what a prefix-blind
dataset split does (consecutive blocks of rows dealt in turn). Does not own: planning
(`batchv4.packing`), Ray, or the job (`pipelines.ray_executor`). Never imports Ray or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Router", "group_cost", "round_robin_blocks", "route", "split_group"]


def group_cost(prompt_tokens: int, max_tokens: int, n: int = 1) -> int:
    """A request's work in tokens, as the router counts it: its prompt plus what it may generate."""
    return prompt_tokens + max_tokens * n


class Router:
    """Streaming least-loaded assignment of whole groups: `assign(tokens)` returns the replica
    (0..n-1) with the smallest load so far (ties: the lowest index) and adds `tokens` to it."""

    def __init__(self, n_replicas: int) -> None:
        if isinstance(n_replicas, bool) or not isinstance(n_replicas, int) or n_replicas < 1:
            raise ValueError(f"n_replicas must be an integer >= 1, got {n_replicas!r}")
        self.load = [0] * n_replicas

    def assign(self, tokens: int) -> int:
        r = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        self.load[r] += int(tokens)
        return r


def route(group_tokens: Sequence[int], n_replicas: int) -> list[int]:
    """The replica of each group (in plan order), given each group's tokens: `Router` applied in
    order. Every group goes whole to one replica; the loads differ by at most the largest group."""
    router = Router(n_replicas)
    return [router.assign(t) for t in group_tokens]


def split_group(resume: Sequence[int], work: Sequence[int], piece_rows: int,
                max_recompute: float = 0.25) -> list[tuple[int, int, int]]:
    """Consecutive pieces `(start, end, recompute)` of one plan group (rows in plan order): row i
    would prefill `work[i]` tokens (plus what it generates) after restoring the `resume[i]` tokens
    it shares with an earlier row. A piece holds at least `piece_rows` rows (the last may hold
    fewer) and is cut only before a row whose shared prefix is at most `max_recompute` of the work
    of the piece it closes: that prefix (`recompute`) is what a piece starting there computes again
    on another replica, so a cut is made where it costs little (near the root of the group's tree,
    between branches), and not at all in a group smaller than two pieces."""
    if piece_rows < 1:
        raise ValueError(f"piece_rows must be >= 1, got {piece_rows}")
    n = len(work)
    pieces: list[tuple[int, int, int]] = []
    start, acc, paid = 0, 0, 0
    for i in range(n):
        if i - start >= piece_rows and n - i >= piece_rows // 2 and resume[i] <= max_recompute * acc:
            pieces.append((start, i, paid))
            start, acc, paid = i, 0, resume[i]
        acc += work[i]
    pieces.append((start, n, paid))
    return pieces


def round_robin_blocks(n_rows: int, n_replicas: int, block_rows: int) -> list[int]:
    """The replica of each row (in input order) when blocks of `block_rows` consecutive rows are
    dealt in turn, blind to prefixes: the baseline prefix-affine routing is measured against."""
    if block_rows < 1 or n_replicas < 1:
        raise ValueError("block_rows and n_replicas must be >= 1")
    return [(i // block_rows) % n_replicas for i in range(n_rows)]
