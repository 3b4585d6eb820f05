"""The exact prefix tree of one window, its depth-first order, snapshots and predicted hits.

Input: the window's rows in lexicographic order, given only by their lengths and the LCP of each row
with the one before (that is all a compressed trie needs). Output: a `WindowPlan` in window-local
indices. Owns the ordering rule and the snapshot rule. Does not own tokens, keys, windows or ids
that are global to a plan (planner.py maps local ids to global ones).

Ordering: depth-first; at every node, first the requests that end there (a prompt that is a prefix
of others saves the snapshot at its full length), then the children by ascending number of
requests in their subtree, ties in token order. A snapshot can be freed once its subtree's last
branch has started, so visiting the largest child last keeps at most about log2(rows) + 1
snapshots live (each live one has us inside a child no larger than half its parent's subtree).

Snapshots: a branch point (a node whose path continues in two or more ways: children, or requests
ending there) gets one snapshot, saved at its depth by the first request that passes it, if it
saves at least `min_share` tokens over the nearest snapshot above it (over position 0 if none;
so never for a prefix shorter than min_share). Decided top-down. In depth-first order the node
where a request leaves the previous request's path is the deepest node it shares with any earlier
request; the request resumes from the nearest snapshot at or above that node, which is the deepest
snapshot on its path saved earlier. With min_share = 1 every branch point has a snapshot, and
every tree token is computed exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A node is a list for speed: [depth, items, subtree_requests]; items are child nodes or ints
# (window-local rows of requests that end at this node).
_DEPTH, _ITEMS, _SIZE = 0, 1, 2


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
    root: list = [0, [], 0]
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
            mid = [d, [popped], 0]
            top[_ITEMS][-1] = mid
            stack.append(mid)
            top = mid
        if length == top[_DEPTH]:
            top[_ITEMS].append(r)
        else:
            leaf = [length, [r], 0]
            top[_ITEMS].append(leaf)
            stack.append(leaf)
    while stack:
        _finish(stack.pop())
    return root


def _max_live(saved_at: list[int], last_use: list[int], requests: int) -> int:
    """Most snapshots held at once: each from its saver's request through its last user's."""
    if not saved_at:
        return 0
    delta = np.zeros(requests + 1, dtype=np.int64)
    np.add.at(delta, np.asarray(saved_at), 1)
    np.add.at(delta, np.asarray(last_use) + 1, -1)
    return int(np.cumsum(delta).max())


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
    save_ids: list[list[int]] = []
    api_hit: list[int] = []
    snap_pos: list[int] = []  # per local snapshot id
    saved_at: list[int] = []  # request index (plan order) of the saver, per snapshot
    last_use: list[int] = []
    uses: list[int] = []
    pending: list[int] = []
    tree_tokens = prefill = groups = 0
    branch = 0  # depth where the next request leaves the previous request's path
    resume, rpos = -1, 0

    # Frame: [node, next item, nearest snapshot at or above the node (-1: none), its depth].
    frames = [[root, 0, -1, 0]]
    while frames:
        frame = frames[-1]
        node, k, anc, anc_depth = frame
        items = node[_ITEMS]
        if k == len(items):
            frames.pop()
            continue
        frame[1] = k + 1
        if k:
            branch = node[_DEPTH]
            resume, rpos = anc, anc_depth
        item = items[k]
        if type(item) is not int:
            depth = item[_DEPTH]
            if len(item[_ITEMS]) >= 2 and depth - anc_depth >= min_share:
                sid = len(snap_pos)
                snap_pos.append(depth)
                uses.append(0)
                last_use.append(0)
                pending.append(sid)
                frames.append([item, 0, sid, depth])
            else:
                frames.append([item, 0, anc, anc_depth])
            continue
        index = len(rows)
        length = lens_l[item]
        rows.append(item)
        resume_snap.append(resume)
        resume_pos.append(rpos)
        save_ids.append(pending)
        for sid in pending:
            saved_at.append(index)  # ids are handed out and saved in the same order
        pending = []
        if resume >= 0:
            uses[resume] += 1
            last_use[resume] = index
        else:
            groups += 1
        tree_tokens += length - branch
        prefill += length - rpos
        shared = boundary[item]
        if branch > shared:
            shared = branch
        api_hit.append(shared - shared % api_unit)

    saves = [[(sid, snap_pos[sid], uses[sid]) for sid in ids] for ids in save_ids]
    return WindowPlan(
        rows=rows, resume_snap=resume_snap, resume_pos=resume_pos, saves=saves, api_hit=api_hit,
        tree_tokens=tree_tokens, planned_prefill=prefill, snapshots=len(snap_pos),
        snapshot_uses=sum(uses), max_live=_max_live(saved_at, last_use, len(rows)), groups=groups,
    )
