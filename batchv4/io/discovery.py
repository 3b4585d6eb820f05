"""Input discovery: which files of an input URL are data, and what kind of data each one holds.

Owns: listing a file, folder or glob into sorted data files; skipping what is not data (hidden
files silently; README, .txt, .csv and other non-data names, and batchv4 output folders, recorded in
`Listing.skipped` for the caller to show); leaving out the run's own output folder (`exclude`); the
check that a compressed file's codec is installed; sniffing a file's kind from its first bytes
(Parquet magic, a `.json` file's opening `[`); display names of files in errors; the job-level
format of a set of per-file formats. Does not own: parsing rows or reading Parquet footers
(`batchv4.io.readers`), or what the output folder holds (`batchv4.io.outdir`, `batchv4.io.writers`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import fsspec.compression
import fsspec.utils

from batchv4.errors import UserError
from batchv4.io.urls import get_fs, has_glob, protocol_of, redact_url

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
# The package that makes fsspec register each codec; the standard library covers the others.
_CODEC_PACKAGES = {".zst": "zstandard", ".lz4": "lz4"}
_OUTPUT_MARKER = "_batchv4.json"
_OLD_MANIFEST = "manifest.json"
_OUTPUT_FORMATS = ("batchv4-output", "batchv4-output-folder")
_BOM = b"\xef\xbb\xbf"
_KIND_WORDS = {"parquet": "a Parquet file", "jsonl": "a JSON lines file", "json": "a JSON array file"}


class InputNotFoundError(FileNotFoundError, UserError):
    """The input URL names nothing readable as data (its message is one line, already redacted)."""


class InputReadError(OSError, UserError):
    """A data file cannot be read at all (its message is one line naming the file)."""


@dataclass(frozen=True)
class Listing:
    files: list[str]  # sorted paths of the candidate data files
    sniff: frozenset[str]  # candidates without a data suffix: data only if their content says so
    skipped: list[str]  # display names of what was left out, with the reason where it is not obvious
    root: str | None  # the folder or glob root the names are relative to; None for a single file


def strip_compression(name: str) -> str:
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _data_name(path: str) -> str:
    return strip_compression(posixpath.basename(path)).lower()


def is_parquet_name(path: str) -> bool:
    return _data_name(path).endswith(PARQUET_SUFFIXES)


def is_json_name(path: str) -> bool:
    return _data_name(path).endswith(JSON_SUFFIXES)


def _hidden(rel: str) -> bool:
    # Spark/Hadoop markers (_SUCCESS, .crc) and our own temporary files start with "_" or ".".
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def display_name(url: str, root: str | None, path: str) -> str:
    """How errors name `path`: the input URL for a single file, else the URL of the folder (or the
    glob's fixed part) joined with the path below it; redacted."""
    shown = redact_url(url)
    if root is None:
        return shown
    shown = shown.split("?<redacted>", 1)[0]
    rel = path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)
    if has_glob(shown):
        cut = shown.rfind("/", 0, _first_glob(shown))
        return f"{shown[:cut]}/{rel}" if cut >= 0 else rel
    return f"{shown.rstrip('/')}/{rel}"


def _first_glob(text: str) -> int:
    return min((i for i in (text.find(c) for c in "*?[") if i >= 0), default=len(text))


def check_codec(path: str, name: str) -> None:
    """InputReadError when `path` is compressed with a codec fsspec has not registered (fsspec
    registers zstd and lz4 only when their packages import)."""
    lower = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            codec = fsspec.utils.infer_compression(path)
            if codec is None or codec not in fsspec.compression.compr:
                package = _CODEC_PACKAGES.get(suffix, f"{suffix[1:]} codec")
                raise InputReadError(f"cannot read {name}: reading {suffix} files needs the '{package}' "
                                     f"package (pip install {package})")
            return


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def _exclude_roots(fs: fsspec.AbstractFileSystem, exclude: Sequence[str],
                   storage_options: dict[str, Any] | None) -> list[str]:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    roots = []
    for url in exclude:
        if protocol_of(str(url)) not in protocols:
            continue  # another filesystem cannot hold our input files
        ex_fs, ex_path = get_fs(str(url), storage_options)
        if type(ex_fs) is type(fs):
            roots.append(ex_path.rstrip("/") or "/")
    return roots


def _is_output_manifest(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        with fs.open(path, "rb") as f:
            head = f.read(65536)
        if b"batchv4-output" not in head:
            return False  # a data file that happens to be called manifest.json: not parsed whole
        doc = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") in _OUTPUT_FORMATS


def list_inputs(fs: fsspec.AbstractFileSystem, path: str, url: str, *, exclude: Sequence[str] = (),
                storage_options: dict[str, Any] | None = None) -> Listing:
    """The candidate data files of `url` (resolved to `path` on `fs`), sorted. Raises
    InputNotFoundError (one line) when nothing is left."""
    if protocol_of(url) in ("http", "https"):
        return Listing([path], frozenset(), [], None)
    roots = _exclude_roots(fs, exclude, storage_options)
    if has_glob(path):
        root = path[: max(path.rfind("/", 0, _first_glob(path)), 0)]
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        what = f"no input files match {redact_url(url)}"
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = sorted(fs.find(path))
        what = f"input folder {redact_url(url)} holds no data files"
    else:
        if not fs.exists(path):
            raise InputNotFoundError(f"input not found: {redact_url(url)}")
        if _under(path, roots):
            raise InputNotFoundError(f"input {redact_url(url)} is inside the output folder; it cannot be read")
        return Listing([path], frozenset(), [], None)

    def rel(p: str) -> str:
        return p[len(root) + 1 :] if p.startswith(root + "/") else posixpath.basename(p)

    def name(p: str) -> str:
        return display_name(url, root, p)

    if _under(root or "/", roots):
        raise InputNotFoundError(f"input {redact_url(url)} is the output folder or inside it; it cannot be read")
    skipped: list[str] = []
    out_dirs: list[str] = []
    for p in found:  # batchv4 output folders below the root, marked by their own files
        folder, base = posixpath.split(p)
        if folder != root and (base == _OUTPUT_MARKER or (base == _OLD_MANIFEST and _is_output_manifest(fs, p))):
            out_dirs.append(folder)
    for folder in sorted(set(out_dirs)):
        if not _hidden(rel(folder)) and not any(folder.startswith(d + "/") for d in out_dirs):
            skipped.append(f"{name(folder)}/ (a batchv4 output folder)")
    for r in roots:
        if r.startswith(root + "/") and any(_under(p, [r]) for p in found):
            skipped.append(f"{name(r)}/ (the output folder)")
    files, sniff = [], set()
    for p in found:
        if _hidden(rel(p)) or _under(p, out_dirs) or _under(p, roots):
            continue
        data_name = _data_name(p)
        if data_name.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES):
            if posixpath.dirname(p) == root and data_name == _OLD_MANIFEST and _is_output_manifest(fs, p):
                skipped.append(f"{name(p)} (a batchv4 output manifest)")
                continue
            files.append(p)
        elif "." not in data_name:
            files.append(p)  # Spark-style `part-00000`: sniffed when opened
            sniff.add(p)
        else:
            skipped.append(name(p))
    if not files:
        raise InputNotFoundError(no_data_message(what, skipped))
    return Listing(files, frozenset(sniff), skipped, root)


def no_data_message(what: str, skipped: Sequence[str]) -> str:
    if not skipped:
        return what
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return f"{what} (skipped: {shown})"


def sniff_kind(f: IO[bytes], path: str, fmt: str | None, sniff: bool) -> tuple[str, bool] | None:
    """(kind, empty) of the open file `f` from its first bytes: kind "parquet", "json" (a JSON array
    document) or "jsonl" (JSON lines, OpenAI batch files included); empty when it holds no bytes.
    None when `sniff` is set (a file without a data suffix) and the content is neither Parquet nor
    JSON lines. `fmt` is the caller's explicit format, which wins over the content."""
    head = f.read(4)
    if not head:
        if sniff:
            return None
        return ("parquet" if fmt == "parquet" or (fmt is None and is_parquet_name(path)) else "jsonl"), True
    first = b"P" if head == b"PAR1" else _first_non_space(f, head)
    if sniff and head != b"PAR1" and first != b"{":
        return None
    if fmt == "parquet" or (fmt is None and head == b"PAR1"):
        return "parquet", False
    if fmt != "openai" and first == b"[" and is_json_name(path):
        return "json", False
    return "jsonl", False


def _first_non_space(f: IO[bytes], head: bytes) -> bytes | None:
    chunk = head[3:] if head.startswith(_BOM) else head
    while True:
        rest = chunk.lstrip(b" \t\r\n")
        if rest:
            return rest[:1]
        chunk = f.read(65536)
        if not chunk:
            return None


def job_format(file_formats: list[str], decided: list[bool], names: list[str]) -> tuple[str, list[str]]:
    """(job format, per-file formats) from each file's sniffed format. `decided` is False for a JSON
    file whose sample held no valid row: it takes the kind of the other JSON files, so an empty
    part never splits an OpenAI batch job. Raises UserError when OpenAI batch files are mixed with
    other data."""
    openai = [i for i, k in enumerate(file_formats) if k == "openai"]
    other = [i for i, (k, d) in enumerate(zip(file_formats, decided)) if k != "openai" and (d or k == "parquet")]
    if openai and other:
        i, j = openai[0], other[0]
        raise UserError(f"cannot mix OpenAI batch files with other inputs: {names[i]} is an OpenAI batch "
                        f"file but {names[j]} is {_KIND_WORDS.get(file_formats[j], file_formats[j])}")
    if openai:
        return "openai", ["openai" if k == "jsonl" else k for k in file_formats]
    kinds = {"parquet" if k == "parquet" else "json" for k in file_formats}
    if kinds == {"parquet"}:
        return "parquet", list(file_formats)
    return ("mixed" if "parquet" in kinds else "jsonl"), list(file_formats)
