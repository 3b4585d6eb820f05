"""Stage 2a: a bucket's rows as a lexicographically sorted stream of bounded chunks.

A bucket within `sort_rows`/`sort_tokens` is sorted in memory. A larger one (a skewed input where
most rows share a long prefix) gets an external merge sort: sorted runs of that size on disk, merged
`merge_fan_in` at a time (several passes if needed), so memory stays bounded whatever the bucket's
size. Ties (identical prompts) keep input order. Owns only sorting; does not own windows.
"""

from __future__ import annotations

import heapq
import os
from typing import Iterator

import numpy as np

from batchv4.packing.lcp import lex_sorted
from batchv4.packing.spill import RowFiles
from batchv4.packing.types import PackConfig

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens [T] uint32, lens [R] int64, ords [R] int64


def sort_chunk(tokens: np.ndarray, lens: np.ndarray, ords: np.ndarray) -> Chunk:
    """The rows of one in-memory chunk in stable lexicographic order."""
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    order, sorted_tokens = lex_sorted(tokens, offsets)
    return sorted_tokens, lens[order], ords[order]


def _run_entries(run: RowFiles, block_rows: int, block_tokens: int) -> Iterator[tuple[bytes, int]]:
    """(big-endian token bytes, ordinal) per row of a sorted run, read block by block."""
    for tokens, lens, ords in run.iter_chunks(block_rows, block_tokens):
        data = tokens.astype(">u4").tobytes()
        pos = 0
        for size, ordinal in zip((lens * 4).tolist(), ords.tolist()):
            yield data[pos:pos + size], ordinal
            pos += size


def _merge(runs: list[RowFiles], config: PackConfig, out_rows: int, out_tokens: int) -> Iterator[Chunk]:
    block_rows = max(1, config.sort_rows // len(runs))
    block_tokens = max(1, config.sort_tokens // len(runs))
    streams = [_run_entries(run, block_rows, block_tokens) for run in runs]
    keys: list[bytes] = []
    ords: list[int] = []
    tokens = 0
    # (bytes, ordinal) tuples: ordinals are unique, so ties between equal rows keep input order.
    for data, ordinal in heapq.merge(*streams):
        keys.append(data)
        ords.append(ordinal)
        tokens += len(data) >> 2
        if len(keys) >= out_rows or tokens >= out_tokens:
            yield _chunk(keys, ords)
            keys, ords, tokens = [], [], 0
    if keys:
        yield _chunk(keys, ords)


def _chunk(keys: list[bytes], ords: list[int]) -> Chunk:
    tokens = np.frombuffer(b"".join(keys), dtype=">u4").astype(np.uint32)
    lens = np.fromiter((len(k) >> 2 for k in keys), dtype=np.int64, count=len(keys))
    return tokens, lens, np.asarray(ords, dtype=np.int64)


def sorted_stream(bucket: RowFiles, config: PackConfig, stem: str) -> Iterator[Chunk]:
    """The bucket's rows in stable lexicographic order, in chunks of about one window or less.

    `stem` prefixes the run files of an external sort; they are deleted when the stream ends.
    """
    if bucket.rows <= config.sort_rows and bucket.tokens <= config.sort_tokens:
        yield sort_chunk(*bucket.read_all())
        return
    runs: list[RowFiles] = []
    counter = 0
    try:
        for chunk in bucket.iter_chunks(config.sort_rows, config.sort_tokens):
            run = RowFiles(f"{stem}.run{counter}")
            counter += 1
            runs.append(run)
            run.append(*sort_chunk(*chunk))
        while len(runs) > config.merge_fan_in:
            merged: list[RowFiles] = []
            for start in range(0, len(runs), config.merge_fan_in):
                group = runs[start:start + config.merge_fan_in]
                if len(group) == 1:
                    merged.append(group[0])
                    continue
                out = RowFiles(f"{stem}.run{counter}")
                counter += 1
                merged.append(out)
                for chunk in _merge(group, config, config.sort_rows, config.sort_tokens):
                    out.append(*chunk)
                for run in group:
                    run.delete()
            runs = merged
        # Quarter-window chunks: the window cutter then holds little more than one window.
        yield from _merge(runs, config, max(1, config.window_rows // 4), max(1, config.window_tokens // 4))
    finally:
        for leftover in range(counter):
            for suffix in (".tok", ".len", ".ord"):
                path = f"{stem}.run{leftover}{suffix}"
                if os.path.exists(path):
                    os.remove(path)
