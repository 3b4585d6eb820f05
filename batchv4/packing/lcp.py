"""Lexicographic order and longest common prefixes of token rows stored flat.

A set of rows is held as one flat token array plus offsets (`offsets[i]:offsets[i+1]` is row i).
Owns sorting such rows (a proper prefix sorts before its extensions) and vectorized LCPs of row
pairs. Does not own the tree built from them (tree.py) or where rows come from.
"""

from __future__ import annotations

import numpy as np

# Cap on the elements of one vectorized comparison, to bound temporary memory.
_MAX_COMPARE = 1 << 20
_FIRST_BLOCK = 16


def sort_keys(tokens: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """One bytes object per row whose bytewise order is the rows' lexicographic token order.

    Big-endian fixed-width ids compare like the integers, and a shorter bytes prefix sorts first.
    """
    # tokens: [num_tokens] integer ids in [0, 2**32); offsets: [num_rows + 1] int64
    be = tokens.astype(">u4").tobytes()
    bounds = (offsets * 4).tolist()
    return [be[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def lex_sorted(tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable lexicographic order of the rows ([num_rows] int64) and the tokens in that order
    ([num_tokens] uint32)."""
    keys = sort_keys(tokens, offsets)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    joined = b"".join([keys[i] for i in order])
    return np.array(order, dtype=np.int64), np.frombuffer(joined, dtype=">u4").astype(np.uint32)


def pair_lcp(tokens: np.ndarray, a_start: np.ndarray, b_start: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """LCP of the pairs (tokens[a_start[k]:], tokens[b_start[k]:]), capped at limit[k].

    Compares growing blocks (16, 32, 64, ... tokens) of the still-equal pairs only, so the work is
    about the sum of the LCPs plus 16 tokens per pair, not the sum of the row lengths.
    """
    # a_start, b_start, limit: [num_pairs] int64 -> [num_pairs] int64
    out = np.zeros(len(limit), dtype=np.int64)
    active = np.flatnonzero(limit > 0)
    pos = 0
    block = _FIRST_BLOCK
    while active.size:
        width = max(1, min(block, _MAX_COMPARE // active.size))
        cols = np.arange(width, dtype=np.int64)
        remaining = limit[active] - pos  # > 0 for every active pair
        valid = cols[None, :] < remaining[:, None]
        ia = np.where(valid, a_start[active, None] + pos + cols[None, :], 0)
        ib = np.where(valid, b_start[active, None] + pos + cols[None, :], 0)
        differs = (tokens[ia] != tokens[ib]) | ~valid
        stopped = differs.any(axis=1)
        out[active[stopped]] = pos + np.argmax(differs[stopped], axis=1)
        active = active[~stopped]
        pos += width
        exhausted = limit[active] <= pos
        out[active[exhausted]] = limit[active[exhausted]]
        active = active[~exhausted]
        block *= 2
    return out


def adjacent_lcp(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[num_rows] int64: lcp[0] = 0 and lcp[i] = LCP(row i-1, row i)."""
    starts = offsets[:-1]
    lens = np.diff(offsets)
    lcp = np.zeros(len(lens), dtype=np.int64)
    if len(lens) > 1:
        lcp[1:] = pair_lcp(tokens, starts[:-1], starts[1:], np.minimum(lens[:-1], lens[1:]))
    return lcp


def lcp_of_rows(a: np.ndarray, b: np.ndarray) -> int:
    """LCP of two single rows (1-D arrays)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if differs.size else n
