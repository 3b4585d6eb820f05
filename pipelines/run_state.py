"""The working state of one `run` invocation, kept on local disk so memory does not grow with the input.

Owns: the ids seen so far (duplicates), what an earlier invocation already wrote (finished rows by
id and content hash, error rows by row index), and the record of every row handed to the planner
(its request, sampling overrides, thinking flag and kept input values), looked up by id when the
plan reaches that row. One SQLite file in a private temporary folder, which also holds the
planner's spill files; everything is removed at close, and the folders of killed runs are swept by
the next run on the machine. Does not own: reading, planning or writing.

Kept input values are stored as one-row Arrow IPC messages under the kept columns' own schema, so
timestamps, decimals, binary and nested values come back with their types.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from batchv4.io.rows import RowRequest
from batchv4.io.schema import rows_to_table

_TABLES = (
    "CREATE TABLE seen (id BLOB PRIMARY KEY) WITHOUT ROWID",
    # `matched`: this invocation read the same row again (same id and content), so it stays
    "CREATE TABLE done (id BLOB, hash TEXT, matched INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (id, hash)) WITHOUT ROWID",
    "CREATE TABLE done_errors (row_index INTEGER, key TEXT, matched INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (row_index, key)) WITHOUT ROWID",
    "CREATE TABLE rows (id BLOB PRIMARY KEY, rec TEXT NOT NULL, keep BLOB) WITHOUT ROWID",
)


def _k(row_id: str) -> bytes:
    # ids are stored as UTF-8 bytes; JSON input may hold lone surrogates, which SQLite text refuses
    return row_id.encode("utf-8", "surrogatepass")


_PREFIX = "batchv4-run-"


def sweep_stale(parent: str | None = None) -> list[str]:
    """Remove the folders of runs that were killed (SIGKILL, power loss) before they could clean
    up: `batchv4-run-*` folders in `parent` (default: the system temporary folder) whose `pid`
    file names a process that no longer exists, or that have had no `pid` file for a minute.
    Returns the folders removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(_PREFIX) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "pid")) as f:
                pid = int(f.read().strip())
        except FileNotFoundError:
            # a run writes its pid file as soon as the folder exists: without one after a minute,
            # the folder is from a version before pid files
            try:
                if time.time() - os.path.getmtime(path) < 60:
                    continue
            except OSError:
                continue
            pid = None
        except (OSError, ValueError):
            continue
        if pid is not None:
            try:
                os.kill(pid, 0)
                continue                  # alive (or reused by another process: leave it)
            except ProcessLookupError:
                pass
            except PermissionError:
                continue                  # alive, another user's
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class RunState:
    """Use as a context manager; `dir` is the private folder (also for the planner's spill). On
    creation it sweeps the folders of killed runs (`sweep_stale`)."""

    def __init__(self, kept: Sequence[pa.Field] = (), parent: str | None = None) -> None:
        sweep_stale(parent)
        self._tmp = tempfile.TemporaryDirectory(prefix=_PREFIX, dir=parent)
        self.dir = self._tmp.name
        with open(os.path.join(self.dir, "pid"), "w") as f:
            f.write(str(os.getpid()))
        self._schema = pa.schema(list(kept))
        self._db = sqlite3.connect(os.path.join(self.dir, "state.sqlite"), isolation_level=None)
        # a scratch database: nothing in it must survive a crash (resume reads the output folder)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        for ddl in _TABLES:
            self._db.execute(ddl)
        self._db.execute("BEGIN")
        self._pending = 0
        self._any_done = self._any_done_error = False

    # ---- what an earlier invocation wrote ---------------------------------------------------------
    def add_done(self, pairs: Iterable[tuple[str, str]]) -> None:
        """(id, content hash) of the output rows an earlier invocation wrote."""
        self._db.executemany("INSERT OR IGNORE INTO done (id, hash) VALUES (?, ?)", ((_k(i), h) for i, h in pairs))
        self._any_done = self._db.execute("SELECT 1 FROM done LIMIT 1").fetchone() is not None

    def add_done_errors(self, keys: Iterable[tuple[int, str]]) -> None:
        """(row index, `RowError.key()`) of the error rows an earlier invocation wrote."""
        self._db.executemany("INSERT OR IGNORE INTO done_errors (row_index, key) VALUES (?, ?)",
                             ((int(i), k) for i, k in keys))
        self._any_done_error = self._db.execute("SELECT 1 FROM done_errors LIMIT 1").fetchone() is not None

    # a first invocation has nothing done: its per-row checks need no query
    def is_done(self, row_id: str, content_hash: str) -> bool:
        """Whether an earlier invocation wrote this row with this content (and remember that it
        is still current)."""
        return self._any_done and self._db.execute(
            "UPDATE done SET matched = 1 WHERE id = ? AND hash = ?", (_k(row_id), content_hash)).rowcount > 0

    def is_done_error(self, row_index: int, key: str) -> bool:
        return self._any_done_error and self._db.execute(
            "UPDATE done_errors SET matched = 1 WHERE row_index = ? AND key = ?", (row_index, key)).rowcount > 0

    def stale(self, whole_input: bool, rows_read: int) -> tuple[int, int]:
        """Mark what an earlier invocation wrote that the input no longer has: output rows whose id
        was read with other content (or became an error row), and error rows whose row was read
        and is now something else; with `whole_input`, also rows beyond what the input holds.
        Returns (stale output rows' (id, hash) pairs, stale error rows)."""
        db = self._db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS stale_done (id BLOB, hash TEXT, PRIMARY KEY (id, hash)) WITHOUT ROWID")
        db.execute("CREATE TEMP TABLE IF NOT EXISTS stale_errors (row_index INTEGER, key TEXT, "
                   "PRIMARY KEY (row_index, key)) WITHOUT ROWID")
        db.execute("DELETE FROM stale_done")
        db.execute("DELETE FROM stale_errors")
        if whole_input:
            db.execute("INSERT INTO stale_done SELECT id, hash FROM done WHERE matched = 0")
            db.execute("INSERT INTO stale_errors SELECT row_index, key FROM done_errors WHERE matched = 0")
        else:
            db.execute("INSERT INTO stale_done SELECT id, hash FROM done WHERE matched = 0 AND id IN (SELECT id FROM seen)")
            db.execute("INSERT INTO stale_errors SELECT row_index, key FROM done_errors WHERE matched = 0 "
                       "AND row_index < ?", (rows_read,))
        return (db.execute("SELECT COUNT(*) FROM stale_done").fetchone()[0],
                db.execute("SELECT COUNT(*) FROM stale_errors").fetchone()[0])

    def is_stale(self, row_id: str, content_hash: str) -> bool:
        return self._db.execute("SELECT 1 FROM stale_done WHERE id = ? AND hash = ?",
                                (_k(row_id), content_hash)).fetchone() is not None

    def is_stale_error(self, row_index: int, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM stale_errors WHERE row_index = ? AND key = ?",
                                (row_index, key)).fetchone() is not None

    # ---- this invocation --------------------------------------------------------------------------
    def seen(self, row_id: str) -> bool:
        """Whether `row_id` came before in this input (and remember it)."""
        cur = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (_k(row_id),))
        self._tick()
        return cur.rowcount == 0

    def seen_many(self, ids: Sequence[str]) -> list[bool]:
        """`seen` of each id in turn (True: it came before, in an earlier call or earlier in `ids`),
        in one statement per 500 distinct ids instead of one per id (a third of the time)."""
        keys = [_k(i) for i in ids]
        distinct = list(dict.fromkeys(keys))
        new: set[bytes] = set()
        for s in range(0, len(distinct), 500):
            part = distinct[s:s + 500]
            # OR IGNORE with RETURNING yields only the rows inserted: the ids not seen before
            sql = "INSERT OR IGNORE INTO seen VALUES " + ",".join(["(?)"] * len(part)) + " RETURNING id"
            new.update(row[0] for row in self._db.execute(sql, part))
        self._tick(len(distinct))
        out = []
        for k in keys:
            first = k in new
            if first:
                new.discard(k)      # a later copy in `ids` came before: its first occurrence
            out.append(not first)
        return out

    def put(self, rows: Sequence[tuple[RowRequest, Any, bool]]) -> None:
        """Record rows handed to the planner: (request, its SamplingParams, thinking)."""
        if not rows:
            return
        blobs: list[bytes | None] = [None] * len(rows)
        if len(self._schema):
            table = rows_to_table((r.keep for r, _, _ in rows), self._schema).combine_chunks()
            batch = table.to_batches()[0]
            blobs = [batch.slice(i, 1).serialize().to_pybytes() for i in range(len(rows))]
        recs = (
            (_k(r.id), json.dumps([r.index, r.messages, r.params, r.content_hash, sp.to_dict(), thinking]), blob)
            for (r, sp, thinking), blob in zip(rows, blobs)
        )
        self._db.executemany("INSERT INTO rows VALUES (?, ?, ?)", recs)
        self._tick(len(rows))

    def get(self, row_id: str) -> tuple[RowRequest, Any, bool]:
        """(request, SamplingParams, thinking) of a row given to `put`."""
        from batchv4.engine.sampling_params import SamplingParams

        found = self._db.execute("SELECT rec, keep FROM rows WHERE id = ?", (_k(row_id),)).fetchone()
        if found is None:
            raise KeyError(row_id)
        index, messages, params, content_hash, sampling, thinking = json.loads(found[0])
        keep: dict[str, Any] = {}
        if found[1] is not None:
            keep = pa.ipc.read_record_batch(pa.py_buffer(found[1]), self._schema).to_pylist()[0]
        return RowRequest(index, row_id, messages, params, keep, content_hash), SamplingParams(**sampling), thinking

    def _tick(self, n: int = 1) -> None:
        # commit now and then so the database file, not memory, holds the dirty pages
        self._pending += n
        if self._pending >= 65_536:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._tmp.cleanup()

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
