"""The exact prefix tree of one window, its depth-first order, snapshots and predicted hits.

Input: the window's rows in lexicographic order, given only by their lengths and the LCP of each row
with the one before (that is all a compressed trie needs). Output: a `WindowPlan` in window-local
indices. Owns the ordering rule and the snapshot rule. Does not own tokens, keys, windows or ids
that are global to a plan (planner.py maps local ids to global ones).

Ordering: depth-first; at every node, first the requests that end there (a prompt that is a prefix
of others saves the snapshot at its full length), then the children by ascending number of
requests in their subtree, ties in token order. A snapshot is freed when its node's last child
starts, so visiting the largest child last keeps at most about log2(rows) snapshots live.

Snapshots: a node at depth d >= min_share whose path continues in two or more ways (children, or
requests ending there) gets one snapshot, saved at pos d by the first request that passes it;
every later item of the node resumes from it once, so uses = items - 1. In depth-first order the
node where a request leaves the previous request's path is the deepest node it shares with any
earlier request, so resuming there computes every tree token exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A node is a list for speed: [depth, items, subtree_requests, snap_id]; items are child nodes or
# ints (window-local rows of requests that end at this node).
_DEPTH, _ITEMS, _SIZE, _SNAP = 0, 1, 2, 3


@dataclass
class WindowPlan:
    """Per request in plan order, window-local: row (lexicographic index), resume, saves, hits."""

    rows: list[int]
    resume_snap: list[int]  # local snapshot id, -1 for none
    resume_pos: list[int]
    saves: list[list[tuple[int, int, int]]]  # (local snapshot id, pos, uses), ascending pos
    api_hit: list[int]
    tree_tokens: int
    planned_prefill: int
    snapshots: int
    snapshot_uses: int
    max_live: int
    groups: int


def _size(item: object) -> int:
    return 1 if type(item) is int else item[_SIZE]  # type: ignore[index]


def _finish(node: list) -> None:
    items = node[_ITEMS]
    if len(items) == 1:
        node[_SIZE] = _size(items[0])
        return
    node[_SIZE] = sum(map(_size, items))
    items.sort(key=_size)  # stable: ends first, then token order among equal sizes


def build_tree(lens: list[int], lcp: list[int]) -> list:
    """Compressed trie of rows in lexicographic order (lcp[0] is ignored); returns the root."""
    root: list = [0, [], 0, -1]
    stack = [root]
    for r, length in enumerate(lens):
        d = lcp[r] if r else 0
        popped = None
        while stack[-1][_DEPTH] > d:
            popped = stack.pop()
            _finish(popped)
        top = stack[-1]
        if top[_DEPTH] < d:
            # Row r leaves the previous row's path inside the edge to `popped`: split it at d.
            mid = [d, [popped], 0, -1]
            top[_ITEMS][-1] = mid
            stack.append(mid)
            top = mid
        if length == top[_DEPTH]:
            top[_ITEMS].append(r)
        else:
            leaf = [length, [r], 0, -1]
            top[_ITEMS].append(leaf)
            stack.append(leaf)
    while stack:
        _finish(stack.pop())
    return root


def plan_window(lens: np.ndarray, lcp: np.ndarray, min_share: int, api_unit: int) -> WindowPlan:
    """Plan one window. lens, lcp: [num_rows] int64 in lexicographic order; lcp[0] is the LCP with
    the previous window's last row of the same sorted stream (0 if none), used for API hits only."""
    lens_l = lens.tolist()
    # Longest prefix shared with any row of earlier windows of the same sorted stream.
    boundary = np.minimum.accumulate(lcp).tolist() if len(lcp) else []
    root = build_tree(lens_l, lcp.tolist())

    rows: list[int] = []
    resume_snap: list[int] = []
    resume_pos: list[int] = []
    saves: list[list[tuple[int, int, int]]] = []
    api_hit: list[int] = []
    pending: list[tuple[int, int, int]] = []
    tree_tokens = prefill = 0
    next_snap = uses_total = live = max_live = groups = 0
    branch = 0  # depth where the next request leaves the previous request's path
    resume, rpos, release = -1, 0, False

    frames = [[root, 0]]  # the root (depth 0) never holds a snapshot
    while frames:
        frame = frames[-1]
        node, k = frame
        items = node[_ITEMS]
        if k == len(items):
            frames.pop()
            continue
        frame[1] = k + 1
        if k:
            branch = node[_DEPTH]
            sid = node[_SNAP]
            if sid >= 0:
                resume, rpos, release = sid, branch, k == len(items) - 1
            else:
                resume, rpos, release = -1, 0, False
        item = items[k]
        if type(item) is not int:
            if item[_DEPTH] >= min_share and len(item[_ITEMS]) >= 2:
                uses = len(item[_ITEMS]) - 1
                item[_SNAP] = next_snap
                pending.append((next_snap, item[_DEPTH], uses))
                next_snap += 1
                uses_total += uses
            frames.append([item, 0])
            continue
        length = lens_l[item]
        rows.append(item)
        resume_snap.append(resume)
        resume_pos.append(rpos)
        saves.append(pending)
        live += len(pending)
        pending = []
        if live > max_live:
            max_live = live
        if release:
            live -= 1
            release = False
        if resume < 0:
            groups += 1
        tree_tokens += length - branch
        prefill += length - rpos
        shared = boundary[item]
        if branch > shared:
            shared = branch
        api_hit.append(shared - shared % api_unit)

    return WindowPlan(
        rows=rows, resume_snap=resume_snap, resume_pos=resume_pos, saves=saves, api_hit=api_hit,
        tree_tokens=tree_tokens, planned_prefill=prefill, snapshots=next_snap,
        snapshot_uses=uses_total, max_live=max_live, groups=groups,
    )
