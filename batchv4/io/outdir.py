"""Output-folder ownership: the folder marker, the run lock, and the "is this folder ours" check.

Owns: deciding whether an output folder may be written at all (missing or empty, or already holding
a batchv4 run: `_batchv4.json` or an earlier version's `manifest.json`), refusing any other
non-empty folder before anything is written into it, the marker `_batchv4.json` (format, version,
the run fingerprint), and the lock `_batchv4.lock` that keeps two runs out of one folder.
Does not own: what is in the folder besides those two files (parts and manifest:
`batchv4.io.writers`), what a different fingerprint means (refuse, or clear under --overwrite: the
caller decides), or refusing ephemeral URLs (`is_ephemeral` only answers; the CLI refuses).

The local lock is exclusive: it is created with O_CREAT|O_EXCL. A lock left by a dead process on
this host (`kill -9`) is taken over at once; the takeover runs under a second O_EXCL guard file and
replaces the stale lock in one rename, so two takers cannot both win. A lock from another host is
never taken over (its pid cannot be checked); the error says to delete it.
On object stores the lock is a best-effort lease: fsspec has no atomic create-if-absent there, so
we write our lock, wait, read it back and proceed only if it is still ours, then renew its
`expires` from a daemon thread. Two runs starting within the settle time may still both proceed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import fsspec

from batchv4.errors import UserError
from batchv4.io.urls import first_line, get_fs, is_local, join, protocol_of, redact_url, write_atomic

__all__ = ["LOCK", "MARKER", "OutputClaim", "OutputFolderError", "OutputLockedError", "claim_output",
           "is_ephemeral"]

log = logging.getLogger(__name__)

MARKER = "_batchv4.json"
LOCK = "_batchv4.lock"
MARKER_FORMAT = "batchv4-output-folder"
_GUARD = LOCK + ".takeover"
# Our own hidden temporaries (probes, parts and small files mid-write, lock takeovers) do not make a
# folder "someone else's".
_OURS_PREFIXES = (".batchv4-probe-", ".part-", ".errors-", ".manifest.json.tmp-", ".summary.json.tmp-",
                  ".output.jsonl.tmp-", "_batchv4.", "._batchv4.")
_STALE_UNPARSED_S = 5.0   # a lock still unreadable after this long was half-written by a dead run
_LOCAL_RETRY_S = 2.0      # how long to wait out a lock that is being written or taken over
_SETTLE_S = 0.2           # object stores: wait before reading our lease back


class OutputFolderError(UserError):
    """The output folder cannot be used (a user error; one line, URL redacted)."""


class OutputLockedError(OutputFolderError):
    """Another batchv4 run holds the output folder."""


def is_ephemeral(url: str) -> bool:
    """True for URLs whose storage dies with this process (`memory://`)."""
    return protocol_of(url) == "memory"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse(data: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(data) if data is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        pass
    return True


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _expires(holder: dict[str, Any]) -> float:
    try:
        return float(holder.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


class OutputClaim:
    """A held output folder. `fresh`: it held no batchv4 run before this claim.
    `previous_fingerprint`: the fingerprint its marker (or old-style manifest) recorded, else None."""

    def __init__(self, out_url: str, storage_options: dict[str, Any] | None, lease_seconds: float):
        self.url, self._storage_options = out_url, storage_options
        fs, path = get_fs(out_url, storage_options)
        self.fresh = True
        self.previous_fingerprint: str | None = None
        self.lost = False   # object stores: another run overwrote our lease while we held it
        self._fs, self._path, self._lease = fs, path, float(lease_seconds)
        self._lock_path = join(fs, path, LOCK)
        self._token = uuid.uuid4().hex
        self._started = _now_iso()
        self._held = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- inspection ---------------------------------------------------------------------------

    def _inspect(self) -> None:
        """Set `fresh` / `previous_fingerprint`; OutputFolderError for a folder that is not ours."""
        fs, path, shown = self._fs, self._path, redact_url(self.url)
        fs.invalidate_cache(path)   # object-store listings are cached; another run may have written
        if fs.isfile(path):
            raise OutputFolderError(f"{shown} is a file, not a folder: choose a new or empty folder")
        try:
            names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            names = []
        marker = None
        if MARKER in names:
            marker = _parse(_cat(fs, join(fs, path, MARKER)))
            if marker is None or marker.get("format") != MARKER_FORMAT:
                raise OutputFolderError(f"{shown}/{MARKER} is not a batchv4 folder marker: "
                                        "choose a new or empty folder")
        elif "manifest.json" in names:
            from batchv4.io.writers import read_manifest   # late: writers may come to import this module
            try:
                manifest = read_manifest(self.url, self._storage_options)
            except ValueError:
                manifest = None   # someone else's manifest.json
            if manifest is not None:
                marker = {"fingerprint": (manifest.get("meta") or {}).get("fingerprint")}
        if marker is not None:
            self.fresh, self.previous_fingerprint = False, marker.get("fingerprint")
            return
        foreign = [n for n in names if not n.startswith(_OURS_PREFIXES)]
        if foreign:
            found = ", ".join(repr(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputFolderError(f"{shown} is not empty and holds no batchv4 run (found {found}): "
                                    "choose a new or empty folder")
        self.fresh, self.previous_fingerprint = True, None

    # -- the lock -------------------------------------------------------------------------------

    def _acquire(self, fingerprint: str) -> None:
        fs, path = self._fs, self._path
        if is_local(fs) and not fs.isfile(path):
            fs.makedirs(path, exist_ok=True)
        self._inspect()   # refuse someone else's folder before writing anything into it
        if is_local(fs):
            self._acquire_local()
        else:
            self._acquire_lease()
        self._inspect()   # again under the lock: a run that just finished may have marked the folder
        if self.fresh:
            self.write_marker(fingerprint)

    def _record(self) -> bytes:
        record: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "started": self._started,
                                  "token": self._token}
        if not is_local(self._fs):
            record["expires"] = time.time() + self._lease
        return json.dumps(record).encode()

    def _locked(self, holder: dict[str, Any] | None) -> OutputLockedError:
        shown = redact_url(self.url)
        who = ("its lock is being written" if holder is None else
               f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}")
        return OutputLockedError(f"{shown} is in use by another batchv4 run ({who}); "
                                 f"if no such run is alive, delete {shown}/{LOCK}")

    def _acquire_local(self) -> None:
        deadline = time.monotonic() + _LOCAL_RETRY_S
        while True:
            try:
                fd = os.open(self._lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                data = _cat(self._fs, self._lock_path)
                holder = _parse(data)
                if data is None:
                    pass   # released between our create and our read: try again
                elif self._stale_local(holder):
                    if self._take_over(data):
                        return
                elif holder is not None:
                    raise self._locked(holder) from None
                # Being written, or being taken over by another process: wait that out briefly.
                if time.monotonic() > deadline:
                    raise self._locked(holder) from None
                time.sleep(0.02)
                continue
            self._held = True
            try:
                os.write(fd, self._record())   # one write: the half-written window stays tiny
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    def _stale_local(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            try:
                return time.time() - os.stat(self._lock_path).st_mtime > _STALE_UNPARSED_S
            except FileNotFoundError:
                return False
        pid = holder.get("pid")
        # Another host's pid means nothing here: never take its lock over.
        return (holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0
                and not _pid_alive(pid))

    def _take_over(self, stale: bytes) -> bool:
        """Replace the stale lock holding `stale` with ours; False if another taker got there first.

        Renaming the stale lock away is not enough: a slower taker would rename away the winner's
        fresh lock. So takers serialise on an O_EXCL guard, re-check the lock under it, and swap
        ours in with one rename (the lock is never absent, so no plain creator slips in either)."""
        guard = join(self._fs, self._path, _GUARD)
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):   # a taker killed mid-takeover left it
                if time.time() - os.stat(guard).st_mtime > _STALE_UNPARSED_S:
                    os.unlink(guard)
            return False
        tmp = join(self._fs, self._path, f"._batchv4.lock.tmp-{self._token}")
        try:
            if _cat(self._fs, self._lock_path) != stale:
                return False
            with open(tmp, "wb") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._lock_path)
            self._held = True
            return True
        finally:
            for leftover in (tmp, guard):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def _acquire_lease(self) -> None:
        fs, lock = self._fs, self._lock_path
        holder = _parse(_cat(fs, lock))
        if holder is not None and holder.get("token") != self._token and _expires(holder) > time.time():
            raise self._locked(holder)
        fs.pipe_file(lock, self._record())
        # No create-if-absent: a run that wrote just after us overwrote ours; whoever reads back
        # their own token after the settle time proceeds (best effort; see the module docstring).
        time.sleep(_SETTLE_S)
        holder = _parse(_cat(fs, lock))
        if holder is None or holder.get("token") != self._token:
            raise self._locked(holder)
        self._held = True
        self._renewer = threading.Thread(target=self._renew, name="batchv4-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                holder = _parse(_cat(self._fs, self._lock_path))
                if holder is None or holder.get("token") != self._token:
                    self.lost = True
                    log.warning("lost the lock on %s to another run", redact_url(self.url))
                    return
                if self._stop.is_set():   # release() started while we read: do not resurrect the lock
                    return
                self._fs.pipe_file(self._lock_path, self._record())
            except OSError as e:   # keep trying: the lease outlives two more renewals
                log.warning("could not renew the lock on %s: %s", redact_url(self.url), first_line(e))

    # -- marker and release -----------------------------------------------------------------------

    def write_marker(self, fingerprint: str, **extra: Any) -> None:
        """Atomically (re)write the marker with `fingerprint` and any `extra` fields."""
        record = {**extra, "format": MARKER_FORMAT, "version": 1, "fingerprint": fingerprint,
                  "updated_at": _now_iso()}
        write_atomic(self._fs, join(self._fs, self._path, MARKER), json.dumps(record, indent=2).encode())

    def release(self) -> None:
        """Stop renewing and remove the lock if it still holds our token. Idempotent; takes no
        thread locks, so a signal handler's exception unwinding through `with` can call it."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5.0)
        try:
            if not is_local(self._fs):
                self._fs.invalidate_cache(self._path)
            if (_parse(_cat(self._fs, self._lock_path)) or {}).get("token") == self._token:
                self._fs.rm_file(self._lock_path)
        except OSError as e:
            log.warning("could not remove the lock %s/%s: %s", redact_url(self.url), LOCK, first_line(e))


def claim_output(out_url: str, *, fingerprint: str, storage_options: dict[str, Any] | None = None,
                 lease_seconds: float = 120.0) -> OutputClaim:
    """Check that `out_url` is missing, empty or a batchv4 run, lock it, and mark it if fresh.

    Raises OutputFolderError for someone else's folder (before writing into it), OutputLockedError
    while another run holds it, OSError (one line, redacted) when storage fails. Use the result as
    a context manager, or call `release()`."""
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
    claim = OutputClaim(out_url, storage_options, lease_seconds)
    try:
        claim._acquire(fingerprint)
    except OSError as e:
        claim.release()
        raise OSError(f"cannot claim output folder {redact_url(out_url)}: {first_line(e)}") from e
    except BaseException:   # including KeyboardInterrupt from a signal: never leave our lock behind
        claim.release()
        raise
    return claim
