"""Stage 1 of packing at scale: partition the row stream into spill buckets on local disk.

Owns `RowFiles` (rows on disk as raw arrays: flat uint32 tokens, int64 lengths, int64 input
ordinals; never pickle) and `Spiller`, which routes each row to the bucket of its grouping key
with bounded in-memory buffers and stores its key in a `KeyStore`. Does not own sorting
(extsort.py), windows or planning.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from batchv4.packing.keys import bucket_of_key, check_token_range, key_of_array
from batchv4.packing.keystore import KeyStore
from batchv4.packing.types import PackConfig

_LENS_BLOCK = 1 << 20  # rows of lengths read at once when walking a file in chunks


class RowFiles:
    """An append-only table of rows on disk; `.tok` little-endian uint32, `.len`/`.ord` int64."""

    def __init__(self, stem: str) -> None:
        self.paths = (stem + ".tok", stem + ".len", stem + ".ord")
        self.rows = 0
        self.tokens = 0
        for path in self.paths:
            open(path, "wb").close()

    def append(self, tokens: np.ndarray, lens: np.ndarray, ords: np.ndarray) -> None:
        """tokens: [sum(lens)] ids in [0, 2**32); lens, ords: [rows] int64."""
        arrays = (tokens.astype("<u4", copy=False), lens.astype("<i8", copy=False),
                  ords.astype("<i8", copy=False))
        for path, array in zip(self.paths, arrays):
            with open(path, "ab") as f:
                array.tofile(f)
        self.rows += len(lens)
        self.tokens += int(tokens.size)

    def read_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = np.fromfile(self.paths[0], dtype="<u4").astype(np.uint32, copy=False)
        lens = np.fromfile(self.paths[1], dtype="<i8").astype(np.int64, copy=False)
        ords = np.fromfile(self.paths[2], dtype="<i8").astype(np.int64, copy=False)
        return tokens, lens, ords

    def iter_chunks(self, max_rows: int, max_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Consecutive chunks of at most max_rows rows and max_tokens tokens (or one longer row)."""
        if self.rows == 0:
            return
        # An all-empty-prompt table has an empty token file, which cannot be mapped.
        tok_map = np.memmap(self.paths[0], dtype="<u4", mode="r") if self.tokens else np.zeros(0, np.uint32)
        len_map = np.memmap(self.paths[1], dtype="<i8", mode="r")
        ord_map = np.memmap(self.paths[2], dtype="<i8", mode="r")
        row = 0
        tok = 0
        while row < self.rows:
            lens = np.array(len_map[row:row + min(max_rows, _LENS_BLOCK)], dtype=np.int64)
            cum = np.cumsum(lens)
            take = max(1, int(np.searchsorted(cum, max_tokens, side="right")))
            used = int(cum[take - 1])
            tokens = np.array(tok_map[tok:tok + used], dtype=np.uint32)
            ords = np.array(ord_map[row:row + take], dtype=np.int64)
            yield tokens, lens[:take], ords
            row += take
            tok += used
        del tok_map, len_map, ord_map

    def delete(self) -> None:
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


class Spiller:
    """Routes rows to `n_buckets` RowFiles by grouping key; keys go to a KeyStore by ordinal."""

    def __init__(self, directory: str, config: PackConfig) -> None:
        self._dir = directory
        self._cfg = config
        self.keys = KeyStore(directory)
        self._buckets: dict[int, RowFiles] = {}
        self._pending: dict[int, tuple[list[np.ndarray], list[int]]] = {}
        self._pending_rows = 0
        self._pending_tokens = 0

    @property
    def rows(self) -> int:
        return len(self.keys)

    def add(self, key: object, tokens: np.ndarray) -> None:
        """tokens: [len] integer ids (range checked at the next flush)."""
        ordinal = self.keys.add(key)
        cfg = self._cfg
        bucket = bucket_of_key(key_of_array(tokens, cfg.key_tokens), cfg.n_buckets)
        pending = self._pending.get(bucket)
        if pending is None:
            pending = self._pending[bucket] = ([], [])
        pending[0].append(tokens)
        pending[1].append(ordinal)
        self._pending_rows += 1
        self._pending_tokens += len(tokens)
        if self._pending_rows >= cfg.spill_buffer_rows or self._pending_tokens >= cfg.spill_buffer_tokens:
            self.flush()

    def flush(self) -> None:
        for bucket in sorted(self._pending):
            arrays, ordinals = self._pending[bucket]
            flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            try:
                check_token_range(flat)
            except ValueError:
                for array, ordinal in zip(arrays, ordinals):
                    check_token_range(array, where=f"row {ordinal}")
                raise
            files = self._buckets.get(bucket)
            if files is None:
                files = self._buckets[bucket] = RowFiles(os.path.join(self._dir, f"b{bucket:010d}"))
            lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
            files.append(flat, lens, np.asarray(ordinals, dtype=np.int64))
        self._pending = {}
        self._pending_rows = 0
        self._pending_tokens = 0
        self.keys.flush()

    def finish(self) -> None:
        """Flush everything; buckets and keys can be read from now on."""
        self.flush()
        self.keys.seal()

    def buckets(self) -> list[tuple[int, RowFiles]]:
        """The non-empty buckets in ascending bucket order (the plan's order across buckets)."""
        return sorted(self._buckets.items())

    def close(self) -> None:
        self.keys.close()
