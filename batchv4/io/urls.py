"""URLs and filesystems: fsspec resolution, storage options, redaction, atomic small writes.

Owns: turning a user URL (local path, `file://`, `memory://`, `s3://`, `gs://`, `https://`, any
fsspec URL) into an fsspec filesystem and path, the S3 endpoint override (`BATCHV4_S3_ENDPOINT`),
`redact_url` (used by every error that names a URL), and writing one whole object atomically.
Does not own: formats, rows or schemas. Credentials are read by fsspec/s3fs from the environment;
this module never reads, logs or prints them.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

S3_ENDPOINT_ENV = "BATCHV4_S3_ENDPOINT"

_GLOB_CHARS = re.compile(r"[*?\[]")


def redact_url(url: str) -> str:
    """`url` without userinfo, query string or fragment (they may hold secrets or signatures)."""
    text = str(url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text.split("://", 1)[0] + "://<redacted>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"***@{host}" if "@" in parts.netloc else parts.netloc
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def protocol_of(url: str) -> str:
    proto, _ = fsspec.core.split_protocol(url)
    return (proto or "file").lower()


def resolve_storage_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for `url`: the caller's, plus the S3 endpoint from `BATCHV4_S3_ENDPOINT`."""
    opts = dict(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        endpoint = os.environ.get(S3_ENDPOINT_ENV)
        if endpoint:
            client_kwargs = dict(opts.get("client_kwargs") or {})
            client_kwargs.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = client_kwargs
    return opts


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`; raises OSError with a redacted one-line message."""
    try:
        return fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    except (ImportError, ValueError) as e:
        raise OSError(f"cannot open {redact_url(url)}: {first_line(e)}") from e


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def has_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def join(fs: fsspec.AbstractFileSystem, folder: str, name: str) -> str:
    sep = getattr(fs, "sep", "/")
    return folder.rstrip(sep) + sep + name if folder else name


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, with any URL in it redacted (library errors may
    quote a presigned URL with its signature)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), line)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold exactly `data`, never a partial object.

    Local files: write a hidden temporary file in the same folder, fsync, then rename over `path`.
    Object stores (where rename is copy+delete): one whole-object put, which the store makes visible
    only when complete.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    write_atomic_chunks(fs, path, (data,))


def write_atomic_chunks(fs: fsspec.AbstractFileSystem, path: str, chunks: Iterable[bytes]) -> None:
    """`write_atomic` for data made in pieces, never held whole in memory: local files are written
    to a hidden temporary file in the same folder and renamed; for object stores the pieces go to a
    local temporary file first, which is then uploaded as one object."""
    if is_local(fs):
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    else:
        fd, tmp = tempfile.mkstemp(prefix="batchv4-upload-")
        os.close(fd)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if is_local(fs):
            _rename(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _rename(src: str, dst: str) -> None:
    # A separate function so tests can simulate a crash between the temporary write and the rename.
    os.replace(src, dst)
