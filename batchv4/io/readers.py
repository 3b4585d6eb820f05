"""Input readers: Parquet, JSON lines, JSON arrays and OpenAI batch JSONL, at any fsspec URL.

Owns: opening an input (every data file is probed at open, so an unreadable file, a missing codec or
a broken JSON document fails before any row is read), the job's format, listing columns, the Arrow
schema of kept columns (Parquet footers; types inferred from sampled JSON rows), and streaming
`RawRow` batches with one global row index. Each file is read in its own format. A bad line or
array element becomes a `RawRow` with `error` set (malformed JSON, not an object, invalid UTF-8),
never an exception and never a silently dropped row; blank lines are not rows. Does not own: which
files are inputs (`batchv4.io.discovery`), turning rows into requests (`batchv4.io.rows`) or writing
outputs. JSON lines are read line by line from fsspec file objects (polars' scan would abort on the
first malformed line); Parquet through pyarrow on fsspec file objects.
"""

from __future__ import annotations

import io
import json
import lzma
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchv4.errors import UserError
from batchv4.io.discovery import (
    InputNotFoundError,
    InputReadError,
    check_codec,
    display_name,
    job_format,
    list_inputs,
    no_data_message,
    sniff_kind,
)
from batchv4.io.schema import infer_schema
from batchv4.io.urls import first_line, get_fs, redact_url

__all__ = ["FORMATS", "JOB_FORMATS", "InputNotFoundError", "InputReadError", "InputSource", "RawRow", "open_input"]

FORMATS = ("parquet", "jsonl", "openai")  # what `fmt` (--format) may name
JOB_FORMATS = FORMATS + ("mixed",)  # `InputSource.format`: "mixed" is Parquet and JSON files together
_FORMAT_ALIASES = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet", "openai-batch": "openai"}
# EOFError: a truncated .gz; the others are codecs' own errors for corrupt data.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


@dataclass(frozen=True)
class RawRow:
    index: int  # global 0-based row number over all files (blank lines are not rows)
    data: dict[str, Any] | None  # None when the row could not be parsed
    raw: str | None  # the original line (JSONL) or element (JSON array, bad ones only); else None
    error: str | None  # one-line reason when the row is unusable


@dataclass(frozen=True)
class _FileInfo:
    format: str  # "parquet" | "jsonl" | "json" | "openai"
    decided: bool  # False: a JSON file whose sample held no valid row (it takes the job's kind)
    has_rows: bool
    schema: pa.Schema | None = None  # Parquet footer schema


def _normalize_format(fmt: str) -> str:
    f = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise UserError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return f


class InputSource:
    """One input dataset. `files`: data file paths, sorted; `file_formats`: each one's format
    ("parquet", "jsonl", "json" for a JSON array, "openai"); `format`: the job's, one of
    JOB_FORMATS; `skipped`: display names of files and folders that were left out (hidden files
    are left out silently)."""

    def __init__(
        self,
        url: str,
        fmt: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        sample_lines: int = 1000,
        exclude: Sequence[str] = (),
    ) -> None:
        if sample_lines < 1:
            raise ValueError(f"sample_lines must be at least 1, got {sample_lines}")
        self.url = url
        self.sample_lines = sample_lines
        explicit = _normalize_format(fmt) if fmt else None
        self._fs, path = get_fs(url, storage_options)
        try:
            listing = list_inputs(self._fs, path, url, exclude=exclude, storage_options=storage_options)
        except InputNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise OSError(f"cannot list {redact_url(url)}: {first_line(e)}") from e
        self._root = listing.root
        self.skipped: list[str] = list(listing.skipped)
        infos: dict[str, _FileInfo] = {}
        for p in listing.files:
            info = self._probe(p, explicit, p in listing.sniff)
            if info is None:
                self.skipped.append(self._name(p))
            else:
                infos[p] = info
        self.skipped.sort()
        if not infos:
            raise InputNotFoundError(no_data_message(f"{redact_url(url)} holds no data files", self.skipped))
        self.files: list[str] = list(infos)
        self._infos = [infos[p] for p in self.files]
        self.format, self.file_formats = job_format(
            [i.format for i in self._infos], [i.decided for i in self._infos], [self._name(p) for p in self.files]
        )

    def _name(self, path: str) -> str:
        return display_name(self.url, self._root, path)

    def _open(self, path: str) -> IO[bytes]:
        return self._fs.open(path, "rb", compression="infer")

    # -- probing (at open) --------------------------------------------------------------------
    def _probe(self, path: str, fmt: str | None, sniff: bool) -> _FileInfo | None:
        name = self._name(path)
        check_codec(path, name)
        try:
            with self._open(path) as f:
                sniffed = sniff_kind(f, path, fmt, sniff)
                if sniffed is None:
                    return None
                kind, empty = sniffed
                if empty:
                    return _FileInfo(fmt or kind, fmt is not None, False)
                if kind == "parquet":
                    return self._probe_parquet(f, name)
                if _rewind(f):
                    return self._probe_json(f, name, kind, fmt)
            with self._open(path) as f:
                return self._probe_json(f, name, kind, fmt)
        except FileNotFoundError as e:
            raise InputNotFoundError(f"input not found: {name}") from e
        except _READ_ERRORS as e:
            if isinstance(e, InputReadError):
                raise
            raise InputReadError(f"cannot read {name}: {first_line(e)}") from e

    def _probe_parquet(self, f: IO[bytes], name: str) -> _FileInfo:
        try:
            pf = pq.ParquetFile(f)
            return _FileInfo("parquet", True, pf.metadata.num_rows > 0, pf.schema_arrow)
        except (OSError, pa.ArrowException) as e:
            raise InputReadError(f"cannot read parquet {name}: {first_line(e)}") from e

    def _probe_json(self, f: IO[bytes], name: str, kind: str, fmt: str | None) -> _FileInfo:
        if kind == "json":
            doc = _load_json_array(f, name)
            return _FileInfo("json", any(isinstance(x, dict) for x in doc), bool(doc))
        seen = False
        for row in _jsonl_rows(f, name, 0, limit=self.sample_lines):
            seen = True
            if fmt is not None:
                break
            if row.data is not None:
                openai = "custom_id" in row.data and isinstance(row.data.get("body"), dict)
                return _FileInfo("openai" if openai else "jsonl", True, True)
        return _FileInfo(fmt or "jsonl", fmt is not None, seen)

    # -- metadata -----------------------------------------------------------------------------
    def has_rows(self) -> bool:
        """Whether any file holds at least one row (error rows count); known since open."""
        return any(i.has_rows for i in self._infos)

    def _parquet_schema(self) -> pa.Schema | None:
        schemas = [i.schema for i in self._infos if i.schema is not None]
        if not schemas:
            return None
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except pa.ArrowException as e:
            raise UserError(f"input parts of {redact_url(self.url)} have incompatible schemas: {first_line(e)}") from e

    def arrow_schema(self) -> pa.Schema | None:
        """The input's Arrow schema: Parquet footers unified; for JSON files, the types inferred from
        the first `sample_lines` valid rows (`batchv4.io.schema.infer_schema`); for "mixed", both
        unified, a column whose types conflict becoming string. Later JSON rows may not fit."""
        parquet = self._parquet_schema()
        if not any(fmt != "parquet" for fmt in self.file_formats):
            return parquet if parquet is not None else pa.schema([])
        inferred = infer_schema(r.data for r in self._iter_json_sample(self.sample_lines, valid_only=True))
        if parquet is None:
            return inferred
        fields = {f.name: f for f in parquet}
        for f in inferred:
            if f.name not in fields:
                fields[f.name] = f
                continue
            try:
                both = pa.unify_schemas([pa.schema([fields[f.name]]), pa.schema([f])], promote_options="permissive")
                fields[f.name] = both.field(0)
            except pa.ArrowException:
                fields[f.name] = pa.field(f.name, pa.string())
        return pa.schema(list(fields.values()))

    def columns(self, sample_lines: int | None = None) -> list[str]:
        """Column names: the Parquet schemas', then the keys of the first N JSON rows, in order."""
        parquet = self._parquet_schema()
        seen: dict[str, None] = dict.fromkeys(parquet.names if parquet is not None else [])
        for row in self._iter_json_sample(sample_lines or self.sample_lines, valid_only=False):
            if row.data is not None:
                seen.update(dict.fromkeys(row.data))
        return list(seen)

    def _iter_json_sample(self, limit: int, *, valid_only: bool) -> Iterator[RawRow]:
        count = 0
        for path, fmt in zip(self.files, self.file_formats):
            if fmt == "parquet":
                continue
            for row in self._iter_file(path, fmt, 0):
                if valid_only and row.data is None:
                    continue
                yield row
                count += 1
                if count >= limit:
                    return

    # -- rows ---------------------------------------------------------------------------------
    def iter_rows(self, batch_size: int = 1024) -> Iterator[list[RawRow]]:
        """Batches of at most `batch_size` rows, in input order, across all files."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batch: list[RawRow] = []
        index = 0
        for path, fmt in zip(self.files, self.file_formats):
            for row in self._iter_file(path, fmt, index, batch_size=batch_size):
                batch.append(row)
                index = row.index + 1
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _iter_file(self, path: str, fmt: str, start: int, batch_size: int = 1024) -> Iterator[RawRow]:
        name = self._name(path)
        if fmt == "parquet":
            yield from self._iter_parquet(path, name, start, batch_size)
            return
        try:
            with self._open(path) as f:
                if fmt == "json":
                    yield from _json_array_rows(_load_json_array(f, name), name, start)
                else:
                    yield from _jsonl_rows(f, name, start)
        except _READ_ERRORS as e:
            raise OSError(f"cannot read {name}: {first_line(e)}") from e

    def _iter_parquet(self, path: str, name: str, start: int, batch_size: int) -> Iterator[RawRow]:
        index = start
        try:
            with self._open(path) as f:
                if not f.read(4):
                    return  # an empty file: no rows
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=batch_size):
                    for d in rb.to_pylist():
                        yield RawRow(index, d, None, None)
                        index += 1
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"cannot read parquet {name}: {first_line(e)}") from e

    def __repr__(self) -> str:
        return f"InputSource({redact_url(self.url)!r}, format={self.format!r}, files={len(self.files)})"




def _rewind(f: IO[bytes]) -> bool:
    # Some decompressing readers (zstandard's) cannot seek backwards; the caller then reopens.
    try:
        f.seek(0)
        return True
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def _jsonl_rows(f: IO[bytes], name: str, start: int, limit: int | None = None) -> Iterator[RawRow]:
    index = start
    for lineno, line in enumerate(f, start=1):
        if limit is not None and index - start >= limit:
            return
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        yield _parse_line(line, index, name, lineno)
        index += 1


def _load_json_array(f: IO[bytes], name: str) -> list[Any]:
    """The elements of a JSON array document, parsed whole (it takes the file's size in memory, and
    more); [] for a blank document. UserError naming the file and position if it is not JSON."""
    data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {name}: invalid UTF-8 at byte {e.start}") from e
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read {name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except RecursionError as e:
        raise UserError(f"cannot read {name}: invalid JSON: nested too deeply") from e
    if not isinstance(doc, list):
        raise UserError(f"cannot read {name}: expected a JSON array, got {_json_type(doc)}")
    return doc


def _json_array_rows(doc: list[Any], name: str, start: int) -> Iterator[RawRow]:
    for i, element in enumerate(doc):
        if isinstance(element, dict):
            yield RawRow(start + i, element, None, None)
        else:
            error = f"{name} element {i + 1}: expected a JSON object, got {_json_type(element)}"
            yield RawRow(start + i, None, json.dumps(element, ensure_ascii=False), error)


def _parse_line(line: bytes, index: int, name: str, lineno: int) -> RawRow:
    # the place ("NAME line N") is formatted only for a bad line, not for every line read
    data, text, why = _line_parts(line)
    return RawRow(index, data, text, None if why is None else f"{name} line {lineno}: {why}")


def _line_parts(line: bytes) -> tuple[dict | None, str, str | None]:
    """(the row, the line's text, why it is not a row, without its place) of one JSON line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, line.decode("utf-8", errors="replace"), f"invalid UTF-8 at byte {e.start}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, text, f"invalid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, text, "invalid JSON: nested too deeply"
    if not isinstance(data, dict):
        return None, text, f"expected a JSON object, got {_json_type(data)}"
    return data, text, None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
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
    exclude: Sequence[str] = (),
) -> InputSource:
    """Open an input: a file, a folder of parts or a glob. `fmt` (`parquet`, `jsonl` or `openai`)
    applies to every file; None decides per file: Parquet by its magic `PAR1`; a `.json` file whose
    first non-space byte is `[` is a JSON array; otherwise JSON lines, an OpenAI batch file when its
    first valid row has `custom_id` and a `body` object. Files at or under an `exclude` URL (the
    run's output folder) and batchv4 output folders inside a folder are never inputs. Raises
    InputNotFoundError, InputReadError (an unreadable file or missing codec) or UserError (OpenAI
    batch files mixed with other data), each one line."""
    return InputSource(url, fmt, storage_options=storage_options, sample_lines=sample_lines, exclude=exclude)
