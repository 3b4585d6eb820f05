"""Reading an input by fragments, for readers in other processes (the Ray executor's read tasks):
`fragments` cuts an `InputSource` into pieces (a Parquet file's row groups, an uncompressed JSON
lines file's byte ranges, any other file whole), `read_fragment` parses one with the readers' own
rules (a bad line is a row with its reason), numbered within the fragment, and `place` makes them
the RawRows `InputSource.iter_rows` gives, once the rows and lines before the fragment are known.

Owns: the fragments and their numbering. Does not own: parsing rules (`batchv4.io.readers`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from batchv4.io.readers import (_READ_ERRORS, InputReadError, InputSource, RawRow, _json_type, _line_parts,
                                _load_json_array)
from batchv4.io.urls import first_line

__all__ = ["Fragment", "fragments", "place", "read_fragment"]


@dataclass(frozen=True)
class Fragment:
    """A piece of one input file: `kind` "parquet" (row group `start`), "jsonl"/"openai" (the
    lines starting in bytes [start, end), end -1 = the whole file) or "json" (the whole array)."""

    file: int
    kind: str
    start: int
    end: int


def _range_rows(f: IO[bytes], start: int, end: int) -> tuple[list[tuple], int]:
    """The JSON lines that start in bytes [start, end) of `f` (end -1: to the end), numbered from
    1 within the range: ([(line, data, text, why)], lines read)."""
    if start:
        f.seek(start - 1)
        f.readline()            # the line holding byte start-1 belongs to the range before
    pos = f.tell() if start else 0
    out: list[tuple] = []
    n = 0
    while end < 0 or pos < end:
        line = f.readline()
        if not line:
            break
        pos += len(line)
        n += 1
        if n == 1 and start == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        data, text, why = _line_parts(line)
        out.append((n, data, text, why))
    return out, n


def fragments(src: InputSource, target_bytes: int = 16 << 20) -> list[Fragment]:
    """The input cut into pieces another process can read on its own, in input order: a
    Parquet file's row groups, an uncompressed JSON-lines file's byte ranges of about
    `target_bytes` (each holding the lines that start in it), any other file whole."""
    out: list[Fragment] = []
    for i, (path, fmt) in enumerate(zip(src.files, src.file_formats)):
        if fmt == "parquet":
            try:
                with src._open(path) as f:
                    groups = pq.ParquetFile(f).metadata.num_row_groups if f.read(4) else 0
            except (OSError, pa.ArrowException) as e:
                raise OSError(f"cannot read parquet {src._name(path)}: {first_line(e)}") from e
            out.extend(Fragment(i, "parquet", g, -1) for g in range(groups))
            continue
        size = src._fs.size(path) if fmt != "json" and infer_compression(path) is None else None
        if not size:
            out.append(Fragment(i, fmt, 0, -1))
            continue
        out.extend(Fragment(i, fmt, a, min(size, a + target_bytes)) for a in range(0, size, target_bytes))
    return out

def read_fragment(src: InputSource, frag: Fragment) -> tuple[list[tuple], int]:
    """One fragment's rows, numbered within it: ([(local line or element number, data, raw
    text, why it is not a row without its place)], physical lines read). `place` turns them
    into RawRows once the rows and lines before the fragment are known."""
    path = src.files[frag.file]
    name = src._name(path)
    try:
        if frag.kind == "parquet":
            with src._open(path) as f:
                rows = pq.ParquetFile(f).read_row_group(frag.start).to_pylist()
            return [(k + 1, d, None, None) for k, d in enumerate(rows)], 0
        with src._open(path) as f:
            if frag.kind == "json":
                return [(k + 1, e, None, None) if isinstance(e, dict) else
                        (k + 1, None, json.dumps(e, ensure_ascii=False), f"expected a JSON object, got {_json_type(e)}")
                        for k, e in enumerate(_load_json_array(f, name))], 0
            return _range_rows(f, frag.start, frag.end)
    except (pa.ArrowException,) as e:
        raise OSError(f"cannot read parquet {name}: {first_line(e)}") from e
    except _READ_ERRORS as e:
        if isinstance(e, InputReadError):
            raise
        raise OSError(f"cannot read {name}: {first_line(e)}") from e

def place(src: InputSource, frag: Fragment, rows: list[tuple], index: int, line: int) -> list[RawRow]:
    """`read_fragment`'s rows as RawRows: the first at global row `index`, their lines after
    the `line` lines of the same file before the fragment."""
    name = src._name(src.files[frag.file])
    where = "element" if frag.kind == "json" else "line"
    return [RawRow(index + k, data, raw, None if why is None else f"{name} {where} {line + n}: {why}")
            for k, (n, data, raw, why) in enumerate(rows)]
