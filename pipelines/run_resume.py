"""Resume of a `run` keyed by content: what an earlier invocation left in the output folder, and
removing what the input no longer holds.

Owns: taking over an output folder's earlier run (same fingerprint: resume; another: refuse, or
clear it under `--overwrite`), loading which rows are done (output rows by id and content hash,
error rows by row number and `RowError.key()`), and, once the whole input is read, removing from
the parts themselves every row whose input changed or vanished, so that an output never holds an
old and a new version of one row. Does not own: the folder's marker and lock
(`batchv4.io.outdir`), part layout (`batchv4.io.writers`) or the on-disk sets (`run_state`).
"""

from __future__ import annotations

import logging
import re

from batchv4.errors import UserError

log = logging.getLogger(__name__)

# files a run writes besides its parts; --overwrite removes exactly these (manifest first)
RUN_FILES = ("manifest.json", "summary.json", "output.jsonl")
_PART_FILE = re.compile(r"^\.?(part|errors)-\d{5,}\.parquet(\.tmp-[0-9a-f]+)?$")


def take_over(cfg, fp: str, claim, state) -> None:
    """Decide what happens to the earlier run in the claimed folder, and load into `state` what it
    finished. Refuses a different configuration unless --overwrite."""
    from batchv4.io.rows import error_key
    from batchv4.io.writers import iter_error_rows, iter_output_rows, read_manifest

    so = cfg.storage_options or None
    old = claim.previous_fingerprint
    if old is None:
        return
    if cfg.overwrite:
        clear(cfg.output, so)
        claim.write_marker(fp)
        return
    if old != fp and _has_outputs(cfg.output, so):
        raise UserError(f"{cfg.public()['output']} holds a run with a different configuration "
                        f"(fingerprint {old}, now {fp}); use --overwrite to replace it")
    if old != fp:
        # nothing generated yet (only error rows, e.g. no row could be read): nothing to protect,
        # and what was detected from the input (its id column, its format) may have changed
        log.info("replacing an earlier run that wrote no output rows (fingerprint %s, now %s)", old, fp)
        clear(cfg.output, so)
        claim.write_marker(fp)
        return
    claim.write_marker(fp)             # a folder of a version before markers gets one now
    # the summary and OpenAI output of an earlier invocation are stale from now on
    remove(cfg.output, RUN_FILES[1:], so)
    if read_manifest(cfg.output, so) is None:
        return                         # marked, but killed before its first part was listed
    state.add_done((r["id"], r["content_hash"]) for r in iter_output_rows(cfg.output, ["id", "content_hash"], so))
    state.add_done_errors((r["row_index"], error_key(r["row_index"], r["error"], r["raw"]))
                          for r in iter_error_rows(cfg.output, ["row_index", "error", "raw"], so))


def _has_outputs(url: str, so) -> bool:
    from batchv4.io.writers import read_manifest

    manifest = read_manifest(url, so)
    return manifest is None or any(p["rows"] for p in manifest["parts"])


def drop_stale(writer, state, whole_input: bool, rows_read: int) -> tuple[int, int]:
    """After the whole input was read: remove the earlier invocation's rows that the input no
    longer holds as they were. Returns (output rows, error rows) removed."""
    from batchv4.io.rows import error_key

    n_out, n_err = state.stale(whole_input, rows_read)
    removed = [0, 0]
    if n_out:
        removed[0] = writer.drop_rows("parts", ("id", "content_hash"), lambda k: state.is_stale(k[0], k[1]))
    if n_err:
        removed[1] = writer.drop_rows("error_parts", ("row_index", "error", "raw"),
                                      lambda k: state.is_stale_error(k[0], error_key(*k)))
    if any(removed):
        log.info("removed %d output and %d error rows whose input changed", *removed)
    return removed[0], removed[1]


def remove(url: str, names, so) -> None:
    from batchv4.io.urls import get_fs, join

    fs, path = get_fs(url, so)
    for name in names:
        p = join(fs, path, name)
        if fs.exists(p):
            fs.rm_file(p)


def clear(url: str, so) -> None:
    """Remove a previous run's files (the manifest first, so a kill midway leaves no listed part
    behind); other files in the folder are left alone."""
    from batchv4.io.urls import get_fs

    remove(url, RUN_FILES[:1], so)
    fs, path = get_fs(url, so)
    for p in fs.ls(path, detail=False):
        if _PART_FILE.match(p.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm_file(p)
    remove(url, RUN_FILES[1:] + ("_batchv4_sent.txt",), so)     # and a remote run's send journal
