"""Input readers: Parquet, JSONL and OpenAI batch JSONL, at any fsspec URL, streamed.

Owns: resolving an input URL to its files (a file, a folder of parts, a glob), detecting the format
from content, listing columns, and streaming `RawRow` batches in bounded memory. A bad line becomes
a `RawRow` with `error` set (malformed JSON, not an object, invalid UTF-8), never an exception and
never a silently dropped row; blank lines are not rows. Does not own: turning rows into requests
(`batchv4.io.rows`) or writing outputs. JSONL is read line by line from fsspec file objects (polars'
scan would abort on the first malformed line); Parquet through pyarrow on fsspec file objects.
"""

from __future__ import annotations

import json
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batchv4.io.urls import first_line, get_fs, has_glob, protocol_of, redact_url

FORMATS = ("parquet", "jsonl", "openai")
_FORMAT_ALIASES = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet", "openai-batch": "openai"}
_DATA_SUFFIXES = {
    "parquet": (".parquet", ".parq", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


@dataclass(frozen=True)
class RawRow:
    index: int  # global 0-based row number over all files (blank lines are not rows)
    data: dict[str, Any] | None  # None when the row could not be parsed
    raw: str | None  # the original line (JSONL), undecodable bytes replaced; None for Parquet
    error: str | None  # one-line reason when the row is unusable


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _hidden(path: str) -> bool:
    # Spark/Hadoop markers (_SUCCESS, .crc) and our own temporary files start with "_" or ".".
    return any(part.startswith((".", "_")) for part in path.split("/") if part)


class InputNotFoundError(FileNotFoundError):
    """The input URL names nothing (its message is already redacted)."""


def _resolve_files(fs: fsspec.AbstractFileSystem, path: str, url: str) -> list[str]:
    if protocol_of(url) in ("http", "https"):
        return [path]
    if has_glob(path):
        files = sorted(p for p in fs.glob(path) if not _hidden(p.rsplit("/", 1)[-1]) and not fs.isdir(p))
        if not files:
            raise InputNotFoundError(f"no input files match {redact_url(url)}")
        return files
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not _hidden(p[len(path.rstrip('/')) :]))
        known = [p for p in files if _strip_compression(p.lower()).endswith(sum(_DATA_SUFFIXES.values(), ()))]
        files = known or files
        if not files:
            raise InputNotFoundError(f"input folder {redact_url(url)} holds no data files")
        return files
    if not fs.exists(path):
        raise InputNotFoundError(f"input not found: {redact_url(url)}")
    return [path]


def _normalize_format(fmt: str) -> str:
    f = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return f


class InputSource:
    """One input dataset: its files (in order) and format."""

    def __init__(
        self,
        url: str,
        fmt: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        sample_lines: int = 1000,
    ) -> None:
        if sample_lines < 1:
            raise ValueError(f"sample_lines must be at least 1, got {sample_lines}")
        self.url = url
        self.sample_lines = sample_lines
        self._fs, path = get_fs(url, storage_options)
        try:
            self.files = _resolve_files(self._fs, path, url)
        except InputNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise OSError(f"cannot list {redact_url(url)}: {first_line(e)}") from e
        self.format = _normalize_format(fmt) if fmt else self._detect()
        if len(self.files) > 1:
            # a folder or glob mixing formats: keep the files whose extension names the format
            suffixes = _DATA_SUFFIXES["parquet" if self.format == "parquet" else "jsonl"]
            matching = [p for p in self.files if _strip_compression(p.lower()).endswith(suffixes)]
            self.files = matching or self.files

    # -- format detection ---------------------------------------------------------------------
    def _detect(self) -> str:
        first = self.files[0]
        try:
            with self._fs.open(first, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError as e:
            raise InputNotFoundError(f"input not found: {self._name(first)}") from e
        except OSError as e:
            raise OSError(f"cannot read {self._name(first)}: {first_line(e)}") from e
        if magic == b"PAR1":
            return "parquet"
        if not magic and _strip_compression(first.lower()).endswith(_DATA_SUFFIXES["parquet"]):
            return "parquet"  # empty file: the extension is the only hint left
        for row in self._iter_jsonl_file(first, 0, limit=self.sample_lines):
            if row.data is not None:
                body = row.data.get("body")
                return "openai" if "custom_id" in row.data and isinstance(body, dict) else "jsonl"
        return "jsonl"

    def _name(self, path: str) -> str:
        if len(self.files) == 1:
            return redact_url(self.url)
        return redact_url(self.url).rstrip("/") + f" [{os.path.basename(path)}]"

    # -- metadata -----------------------------------------------------------------------------
    def arrow_schema(self) -> pa.Schema | None:
        """The unified Arrow schema of a Parquet input (footers only); None for JSONL."""
        if self.format != "parquet":
            return None
        schemas = []
        for path in self.files:
            try:
                with self._fs.open(path, "rb") as f:
                    schemas.append(pq.ParquetFile(f).schema_arrow)
            except (OSError, pa.ArrowException) as e:
                raise OSError(f"cannot read parquet {self._name(path)}: {first_line(e)}") from e
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except pa.ArrowException as e:
            raise ValueError(f"input parts of {redact_url(self.url)} have incompatible schemas: {first_line(e)}") from e

    def columns(self, sample_lines: int | None = None) -> list[str]:
        """Column names: the Parquet schema, or the union of keys over the first N JSONL rows."""
        if self.format == "parquet":
            schema = self.arrow_schema()
            return list(schema.names) if schema is not None else []
        limit = sample_lines or self.sample_lines
        seen: dict[str, None] = {}
        count = 0
        for path in self.files:
            for row in self._iter_jsonl_file(path, 0, limit=limit - count):
                count += 1
                if row.data is not None:
                    seen.update(dict.fromkeys(row.data))
            if count >= limit:
                break
        return list(seen)

    # -- rows ---------------------------------------------------------------------------------
    def iter_rows(self, batch_size: int = 1024) -> Iterator[list[RawRow]]:
        """Batches of at most `batch_size` rows, in input order, across all files."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if self.format == "parquet":
            yield from self._iter_parquet(batch_size)
            return
        batch: list[RawRow] = []
        index = 0
        for path in self.files:
            for row in self._iter_jsonl_file(path, index):
                batch.append(row)
                index = row.index + 1
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _iter_parquet(self, batch_size: int) -> Iterator[list[RawRow]]:
        index = 0
        for path in self.files:
            try:
                with self._fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    for rb in pf.iter_batches(batch_size=batch_size):
                        rows = rb.to_pylist()
                        yield [RawRow(index + i, d, None, None) for i, d in enumerate(rows)]
                        index += len(rows)
            except (OSError, pa.ArrowException) as e:
                raise OSError(f"cannot read parquet {self._name(path)}: {first_line(e)}") from e

    def _iter_jsonl_file(self, path: str, start: int, limit: int | None = None) -> Iterator[RawRow]:
        name = self._name(path)
        index = start
        emitted = 0
        try:
            with self._fs.open(path, "rb", compression="infer") as f:
                for lineno, line in enumerate(f, start=1):
                    if limit is not None and emitted >= limit:
                        return
                    if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                        line = line[3:]
                    line = line.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    yield _parse_line(line, index, f"{name} line {lineno}")
                    index += 1
                    emitted += 1
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # EOFError: a truncated .gz
            raise OSError(f"cannot read {name}: {first_line(e)}") from e

    def __repr__(self) -> str:
        return f"InputSource({redact_url(self.url)!r}, format={self.format!r}, files={len(self.files)})"


def _parse_line(line: bytes, index: int, where: str) -> RawRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRow(index, None, line.decode("utf-8", errors="replace"), f"{where}: invalid UTF-8 at byte {e.start}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return RawRow(index, None, text, f"{where}: invalid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return RawRow(index, None, text, f"{where}: invalid JSON: nested too deeply")
    if not isinstance(data, dict):
        return RawRow(index, None, text, f"{where}: expected a JSON object, got {_json_type(data)}")
    return RawRow(index, data, text, None)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def open_input(
    url: str,
    fmt: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sample_lines: int = 1000,
) -> InputSource:
    """Open an input dataset. `fmt` is `parquet`, `jsonl` or `openai`; None detects it from content
    (Parquet magic `PAR1`; a JSONL whose first valid line has `custom_id` and a `body` object is an
    OpenAI batch file; otherwise JSONL)."""
    return InputSource(url, fmt, storage_options=storage_options, sample_lines=sample_lines)
