"""Stage 2b: cut a lexicographically sorted row stream into bounded windows.

Owns where windows end: a window holds at most `window_rows` rows and `window_tokens` tokens (or one
longer row), and is cut, among the positions in the second half of what fits, where adjacent rows
share the fewest tokens (at a group boundary when there is one), so a shared trunk is split over
two windows as rarely as possible. Does not own sorting or planning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from batchv4.packing.lcp import adjacent_lcp, lcp_of_rows


@dataclass
class Window:
    """Rows of one window in lexicographic order."""

    tokens: np.ndarray  # [num_tokens] uint32
    offsets: np.ndarray  # [num_rows + 1] int64
    ords: np.ndarray  # [num_rows] int64 input ordinals
    # [num_rows] int64; lcp[i] = LCP(row i-1, row i); lcp[0] = LCP with the last row of the
    # previous window of the same stream (0 for a stream's first window).
    lcp: np.ndarray

    @property
    def lens(self) -> np.ndarray:
        return np.diff(self.offsets)


def _offsets(lens: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets


class WindowCutter:
    """Feed sorted chunks of one stream; get complete windows back. Call `finish()` at the end."""

    def __init__(self, window_rows: int, window_tokens: int) -> None:
        self._max_rows = window_rows
        self._max_tokens = window_tokens
        self._tokens = np.zeros(0, dtype=np.uint32)
        self._lens = np.zeros(0, dtype=np.int64)
        self._ords = np.zeros(0, dtype=np.int64)
        self._lcp = np.zeros(0, dtype=np.int64)
        self._last: np.ndarray | None = None  # the stream's last row so far

    def feed(self, tokens: np.ndarray, lens: np.ndarray, ords: np.ndarray) -> Iterator[Window]:
        """tokens: [sum(lens)] uint32, lens/ords: [rows] int64, continuing the sorted stream."""
        if len(lens) == 0:
            return
        offsets = _offsets(lens)
        lcp = adjacent_lcp(tokens, offsets)
        if self._last is not None:
            lcp[0] = lcp_of_rows(self._last, tokens[offsets[0]:offsets[1]])
        self._last = tokens[offsets[-2]:offsets[-1]].copy()
        if len(self._lens):
            self._tokens = np.concatenate([self._tokens, tokens])
            self._lens = np.concatenate([self._lens, lens])
            self._ords = np.concatenate([self._ords, ords])
            self._lcp = np.concatenate([self._lcp, lcp])
        else:
            self._tokens, self._lens, self._ords, self._lcp = tokens, lens, ords, lcp
        while len(self._lens) > self._max_rows or self._tokens.size > self._max_tokens:
            yield self._take(self._cut())

    def finish(self) -> Iterator[Window]:
        if len(self._lens):
            yield self._take(len(self._lens))

    def _cut(self) -> int:
        cum = np.cumsum(self._lens)
        fits = min(self._max_rows, int(np.searchsorted(cum, self._max_tokens, side="right")))
        if fits <= 1:
            return 1
        low = (fits + 1) // 2
        # Cutting before row c costs lcp[c] recomputed tokens; take the last cheapest c.
        candidates = self._lcp[low:fits + 1][::-1]
        return fits - int(np.argmin(candidates))

    def _take(self, rows: int) -> Window:
        offsets = _offsets(self._lens[:rows])
        used = int(offsets[-1])
        window = Window(self._tokens[:used], offsets, self._ords[:rows], self._lcp[:rows])
        self._tokens = self._tokens[used:]
        self._lens = self._lens[rows:]
        self._ords = self._ords[rows:]
        self._lcp = self._lcp[rows:]
        return window
