"""Output folders: atomic Parquet parts, error parts, and the manifest that lists them.

Owns: the layout of an output folder at any fsspec URL (`part-NNNNN.parquet`,
`errors-NNNNN.parquet`, `manifest.json`), writing each part atomically and recording it in the
manifest only once it is complete, resuming the part numbering of an existing folder, the
writability probe, and reading outputs back (only parts the manifest lists; stray temporary or
half-written files are ignored). Does not own: which rows are done (the pipeline decides from the
parts it reads back), schemas (`batchv4.io.schema`), or the OpenAI output file
(`batchv4.io.openai_batch`, re-exported here).

The manifest keeps per-part counts and id ranges, not every id (`finished_ids()` reads the `id`
column of the listed parts instead). It is rewritten after each of the first 64 parts, then after
every (listed parts / 64)-th part, and by `flush()`: a ten-million-row run writes it a few hundred
times, not once per part (which is quadratic in the number of parts). Parts written since the last
rewrite are not listed yet; after a crash they are ignored, their rows are generated again, and
their file names are reused, so nothing is lost or duplicated.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchv4.errors import UserError
from batchv4.io.openai_batch import write_openai_batch_output
from batchv4.io.schema import ERROR_SCHEMA, output_schema, rows_to_table
from batchv4.io.urls import first_line, get_fs, is_local, join, redact_url, write_atomic

__all__ = [
    "MANIFEST",
    "PartWriter",
    "check_writable",
    "finished_ids",
    "iter_error_rows",
    "iter_output_rows",
    "read_errors",
    "read_manifest",
    "read_output_parts",
    "write_openai_batch_output",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "batchv4-output"
MANIFEST_EVERY = 64   # the manifest is rewritten once per this fraction (1/64) of the listed parts
_PART_RE = {"parts": re.compile(r"^part-(\d{5,})\.parquet$"), "error_parts": re.compile(r"^errors-(\d{5,})\.parquet$")}
_PREFIX = {"parts": "part", "error_parts": "errors"}


def write_table(url: str, table: pa.Table, storage_options: dict[str, Any] | None = None) -> int:
    """One Parquet file at `url`, written atomically (`write_atomic`); returns its size in bytes.
    For tables beside the parts (generate's dataset, summarize's documents and chunks)."""
    fs, path = get_fs(url, storage_options)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(fs, path, buf.getvalue())
    return len(buf.getvalue())


def check_writable(out_url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the output folder and write+delete a probe file; OSError (one line) if that fails."""
    try:
        fs, path = get_fs(out_url, storage_options)
        if is_local(fs):
            fs.makedirs(path, exist_ok=True)
        probe = join(fs, path, f".batchv4-probe-{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except (OSError, ValueError, PermissionError) as e:
        raise OSError(f"output {redact_url(out_url)} is not writable: {first_line(e)}") from e


def _empty_manifest(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": 1, "parts": [], "error_parts": [], "meta": dict(meta or {})}


def read_manifest(out_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none. ValueError if it is not a manifest."""
    fs, path = get_fs(out_url, storage_options)
    mpath = join(fs, path, MANIFEST)
    try:
        data = fs.cat_file(mpath)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OSError(f"cannot read {redact_url(out_url)}/{MANIFEST}: {first_line(e)}") from e
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{redact_url(out_url)}/{MANIFEST} is not valid JSON: {first_line(e)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{redact_url(out_url)}/{MANIFEST} is not a batchv4 output manifest")
    return manifest


class PartWriter:
    """Writes the parts of one output folder, in order, resuming an existing manifest.

    `kept` are the Arrow fields of input columns copied to every output row (see
    `batchv4.io.schema.keep_fields`). `meta` is stored in the manifest (run configuration, price
    table version, ...); `update_meta` changes it later.
    """

    def __init__(
        self,
        out_url: str,
        *,
        kept: Sequence[pa.Field] = (),
        meta: Mapping[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        part_prefix: str = "",
        list_parts: bool = True,
    ) -> None:
        """`part_prefix` goes between `part-`/`errors-` and the number (names no other writer of
        the folder uses: a Ray replica's attempt). `list_parts=False`: this writer never reads or
        writes the manifest; whoever reads `manifest[kind]` entries lists them (`adopt`)."""
        self.out_url = out_url
        self.schema = output_schema(kept)
        self.part_prefix, self.list_parts = part_prefix, list_parts
        self._fs, self._path = get_fs(out_url, storage_options)
        if is_local(self._fs):
            self._fs.makedirs(self._path, exist_ok=True)
        existing = read_manifest(out_url, storage_options) if list_parts else None
        self.manifest = existing if existing is not None else _empty_manifest(meta)
        self._unlisted = 0                  # parts written since the manifest was last written
        if existing is not None and meta:
            self.manifest["meta"].update(meta)
        self._next = {kind: self._next_number(kind) for kind in _PREFIX}

    def _next_number(self, kind: str) -> int:
        numbers = [int(_PART_RE[kind].match(p["file"]).group(1)) for p in self.manifest[kind] if _PART_RE[kind].match(p["file"])]
        return max(numbers, default=-1) + 1

    @property
    def rows_written(self) -> int:
        return sum(p["rows"] for p in self.manifest["parts"])

    @property
    def error_rows_written(self) -> int:
        return sum(p["rows"] for p in self.manifest["error_parts"])

    def write_part(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write output rows as the next `part-NNNNN.parquet`; returns its name (None if empty)."""
        return self._write("parts", rows_to_table(rows, self.schema))

    def write_errors(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write error rows (`RowError.to_record()` dicts) as the next `errors-NNNNN.parquet`."""
        return self._write("error_parts", rows_to_table(rows, ERROR_SCHEMA))

    def update_meta(self, **meta: Any) -> None:
        self.manifest["meta"].update(meta)
        self._write_manifest()

    def _write(self, kind: str, table: pa.Table) -> str | None:
        if table.num_rows == 0:
            return None
        name = f"{_PREFIX[kind]}-{self.part_prefix}{self._next[kind]:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        try:
            write_atomic(self._fs, join(self._fs, self._path, name), data)
        except OSError as e:
            raise OSError(f"cannot write {redact_url(self.out_url)}/{name}: {first_line(e)}") from e
        entry = {"file": name, **_entry_stats(table, len(data))}
        # Only now, with the part complete under its final name, may the manifest list it.
        self._next[kind] += 1
        self.adopt(kind, entry)
        return name

    def adopt(self, kind: str, entry: dict[str, Any]) -> None:
        """List a complete part of `kind` ("parts" or "error_parts"), written by this writer or by
        another one into the same folder (`entry` is that writer's `manifest[kind]` entry)."""
        self.manifest[kind].append(entry)
        self._unlisted += 1
        if self._unlisted * MANIFEST_EVERY >= len(self.manifest["parts"]) + len(self.manifest["error_parts"]):
            self._write_manifest()

    def drop_rows(self, kind: str, key_columns: Sequence[str], drop: Callable[[tuple], bool]) -> int:
        """Remove from the listed parts of `kind` ("parts" or "error_parts") every row whose
        `key_columns` values satisfy `drop`; returns the rows removed. Each changed part is
        rewritten atomically under its own name (or delisted and deleted when nothing is left),
        and the manifest is rewritten after each, so a crash midway leaves a consistent folder."""
        removed = 0
        for entry in list(self.manifest[kind]):
            path = join(self._fs, self._path, entry["file"])
            try:
                with self._fs.open(path, "rb") as f:
                    keys = pq.read_table(f, columns=list(key_columns)).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise OSError(f"cannot read {redact_url(self.out_url)}/{entry['file']}: {first_line(e)}") from e
            mask = [drop(tuple(k[c] for c in key_columns)) for k in keys]
            if not any(mask):
                continue
            removed += sum(mask)
            if all(mask):
                self.manifest[kind].remove(entry)
                self._write_manifest()
                self._fs.rm_file(path)
                continue
            with self._fs.open(path, "rb") as f:
                table = pq.read_table(f)
            table = table.filter(pa.array([not m for m in mask]))
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            write_atomic(self._fs, path, buf.getvalue())
            entry.update(_entry_stats(table, len(buf.getvalue())))
            self._write_manifest()
        return removed

    def flush(self) -> None:
        """List every part written so far in the manifest (writes it even when there is none)."""
        self._write_manifest()

    def _write_manifest(self) -> None:
        self._unlisted = 0
        if not self.list_parts:
            return
        self.manifest["rows"] = self.rows_written
        self.manifest["error_rows"] = self.error_rows_written
        self.manifest["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = json.dumps(self.manifest, ensure_ascii=False, indent=1, default=str).encode("utf-8")
        try:
            write_atomic(self._fs, join(self._fs, self._path, MANIFEST), data)
        except OSError as e:
            raise OSError(f"cannot write {redact_url(self.out_url)}/{MANIFEST}: {first_line(e)}") from e


def _entry_stats(table: pa.Table, nbytes: int) -> dict[str, Any]:
    ids = [i for i in table.column("id").to_pylist() if i is not None]
    entry: dict[str, Any] = {"rows": table.num_rows, "ids": len(set(ids)), "bytes": nbytes}
    if ids:
        entry["first_id"], entry["last_id"] = ids[0], ids[-1]
    return entry


def _iter_listed(
    out_url: str, kind: str, columns: Sequence[str] | None, storage_options: dict[str, Any] | None
) -> Iterator[pa.Table]:
    """The tables of the parts of `kind` the manifest lists, one part at a time, in part order."""
    manifest = read_manifest(out_url, storage_options)
    if manifest is None:
        raise FileNotFoundError(f"no batchv4 output at {redact_url(out_url)} ({MANIFEST} is missing)")
    fs, path = get_fs(out_url, storage_options)
    for entry in manifest[kind]:
        try:
            with fs.open(join(fs, path, entry["file"]), "rb") as f:
                table = pq.read_table(f, columns=list(columns) if columns is not None else None)
        except (OSError, pa.ArrowException) as e:
            raise OSError(f"cannot read {redact_url(out_url)}/{entry['file']}: {first_line(e)}") from e
        yield table


def _read_listed(
    out_url: str, kind: str, columns: Sequence[str] | None, storage_options: dict[str, Any] | None, empty: pa.Schema
) -> pa.Table:
    tables = list(_iter_listed(out_url, kind, columns, storage_options))
    if not tables:
        schema = pa.schema([empty.field(c) for c in columns]) if columns is not None else empty
        return schema.empty_table()
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise UserError(f"the parts of {redact_url(out_url)} have incompatible schemas: {first_line(e)}") from e


def iter_output_rows(
    out_url: str, columns: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The output rows of the listed parts as dicts, in part order, holding one part at a time."""
    for table in _iter_listed(out_url, "parts", columns, storage_options):
        yield from table.to_pylist()


def iter_error_rows(
    out_url: str, columns: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """The error rows of the listed error parts as dicts, holding one part at a time."""
    for table in _iter_listed(out_url, "error_parts", columns, storage_options):
        yield from table.to_pylist()


def read_output_parts(
    out_url: str, columns: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """All output rows of the parts the manifest lists, in part order."""
    return _read_listed(out_url, "parts", columns, storage_options, output_schema())


def read_errors(
    out_url: str, columns: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """All error rows of the error parts the manifest lists, merged into one table."""
    return _read_listed(out_url, "error_parts", columns, storage_options, ERROR_SCHEMA)


def finished_ids(out_url: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Ids with at least one output row in a listed part (empty when there is no output yet)."""
    if read_manifest(out_url, storage_options) is None:
        return set()
    return set(read_output_parts(out_url, ["id"], storage_options).column("id").to_pylist())
