"""`generate`: a nightly dataset from a seed table, as a composition of `run` and `dedup`.

Each seed row goes through the prompt template; `n` samples per seed share the prompt's cache and
are reproducible per (seed, row, sample) (the run's per-row seeds). The night's durable job is an
ordinary run in `OUT/_runs/<partition>/` (resume, error rows, summary, fingerprint); seeds that an
earlier night under the same configuration already generated are skipped (so a second night with
the same seeds generates nothing new). Then the night's rows, in (id, sample) order, are deduped
against each other and against the rows kept on earlier nights (or on `dedup_against` outputs),
and written as the dataset:

    OUT/<partition>/part-00000.parquet      the kept rows (nothing else in a partition folder)
    OUT/_dropped/<partition>.parquet        dropped rows, with the id, sample and night they duplicate
    OUT/_signatures/<partition>.parquet     text hash and MinHash signature of every kept row
    OUT/_runs/<partition>/                  the night's run (parts, errors-*.parquet, summary.json)
    OUT/_generate.json                      per-night counts and cost, the config fingerprint
    OUT/README.md                           the dataset card

A rerun of a night resumes its run and rewrites its partition from it (the same result). Without
`partition` the night is `night=default`.

Owns: the layout, the partition name check, the dedup pass over a night, the card. Does not own:
generation (`pipelines.run`), dedup decisions (`pipelines.dedup`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from batchv4.errors import UserError
from batchv4.io.writers import write_table
from batchv4.pipelines.run_config import RunConfig
from batchv4.pipelines.run_output import write_json

_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9][A-Za-z0-9_.:+-]*$")


@dataclass(frozen=True)
class GenerateConfig:
    run: RunConfig                       # input = the seed table, output = OUT, template, n, ...
    partition: str | None = None
    dedup: bool = True
    near_threshold: float = 0.8
    dedup_against: tuple[str, ...] = field(default=())


def check_partition(p: str | None) -> str:
    p = p or "night=default"
    if not _PART.match(p) or ".." in p:
        raise UserError(f"--partition {p!r}: expected key=value (letters, digits, _ . : + -), e.g. date=2026-12-01")
    return p


def generate(cfg: GenerateConfig) -> dict:
    out = cfg.run.output
    if "://" in out and not out.startswith("file://"):
        raise UserError("generate writes a local dataset folder (-o PATH)")
    out = out.removeprefix("file://")
    part = check_partition(cfg.partition)
    if not cfg.run.template:
        raise UserError("generate needs --template (the prompt, with {column} placeholders of the seed table)")
    os.makedirs(out, exist_ok=True)
    _check_layout(out)
    run_dir = os.path.join(out, "_runs", part)
    from batchv4.pipelines.run import run

    def done_elsewhere(fp: str) -> set:
        return _hashes_of_other_nights(out, part, fp)

    summary = run(replace(cfg.run, output=run_dir), skip_done_in=done_elsewhere)
    rows = _night_rows(run_dir)
    kept, dropped, sigs = _dedup(out, part, rows, cfg) if cfg.dedup else (rows, [], [])
    _write_night(out, part, kept, dropped, sigs)
    night = {"partition": part, "fingerprint": summary["fingerprint"], "generated_rows": len(rows),
             "kept_rows": len(kept), "dropped_exact": sum(d["duplicate_kind"] == "exact" for d in dropped),
             "dropped_near": sum(d["duplicate_kind"] == "near" for d in dropped),
             "error_rows": summary["counts"]["error_rows"],
             "skipped_generated_on_other_nights": summary["counts"].get("skipped_elsewhere", 0),
             "cost_usd": summary["totals"].get("cost_usd"), "finished_at": datetime.now(timezone.utc).isoformat()}
    state = _read_state(out)
    state["nights"][part] = night
    state["fingerprint"] = summary["fingerprint"]
    state["config"] = summary["config"]
    write_json(out, "_generate.json", state)
    _write_card(out, state, kept)
    return {"night": night, "run": summary}


def _check_layout(out: str) -> None:
    """OUT holds a generate dataset or nothing: its own names only."""
    for name in os.listdir(out):
        if name.startswith("_") or name == "README.md" or _PART.match(name):
            continue
        raise UserError(f"{out} holds {name!r}, which is not part of a batchv4 generate dataset; use an empty folder")


def _read_state(out: str) -> dict:
    p = os.path.join(out, "_generate.json")
    if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return {"nights": {}}


def _hashes_of_other_nights(out: str, part: str, fp: str) -> set:
    import pyarrow.parquet as pq

    done: set = set()
    for night_dir in glob.glob(os.path.join(out, "_runs", "*")):
        if os.path.basename(night_dir) == part:
            continue
        try:
            with open(os.path.join(night_dir, "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        if manifest.get("meta", {}).get("fingerprint") != fp:
            continue
        for p in manifest.get("parts", []):
            done.update(pq.read_table(os.path.join(night_dir, p["file"]),
                                      columns=["content_hash"]).column("content_hash").to_pylist())
    return done


def _night_rows(run_dir: str) -> list[dict]:
    from batchv4.io.writers import iter_output_rows

    try:
        rows = list(iter_output_rows(run_dir))
    except FileNotFoundError:
        return []
    return sorted(rows, key=lambda r: (r["id"], r["sample_index"]))


def _text(r: dict) -> str:
    return r.get("parsed") or r.get("output") or ""


def _dedup(out: str, part: str, rows: list[dict], cfg: GenerateConfig):
    import pyarrow.parquet as pq

    from batchv4.pipelines.dedup import Deduper

    d = Deduper(cfg.near_threshold)
    refs = [f for f in glob.glob(os.path.join(out, "_signatures", "*.parquet"))
            if os.path.basename(f) != f"{part}.parquet"]
    for other in cfg.dedup_against:
        refs += glob.glob(os.path.join(other, "_signatures", "*.parquet")) or glob.glob(other)
    for f in sorted(set(refs)):
        t = pq.read_table(f).to_pylist()
        for r in t:
            d.add_reference((r["partition"], r["id"], r["sample_index"]), r["text_hash"], r["minhash"])
    kept, dropped, sigs = [], [], []
    for r in rows:
        dec, h, sig = d.decide((part, r["id"], r["sample_index"]), _text(r))
        if dec.kind is None:
            kept.append(r)
            sigs.append({"partition": part, "id": r["id"], "sample_index": r["sample_index"], "text_hash": h,
                         "minhash": [int(x) for x in sig]})
        else:
            p2, i2, s2 = dec.duplicate_of
            dropped.append({**r, "duplicate_kind": dec.kind, "duplicate_of_partition": p2, "duplicate_of_id": i2,
                            "duplicate_of_sample_index": s2, "similarity": dec.similarity})
    return kept, dropped, sigs


def _write_night(out: str, part: str, kept: list[dict], dropped: list[dict], sigs: list[dict]) -> None:
    import pyarrow as pa

    from batchv4.io.schema import OUTPUT_SCHEMA

    folder = os.path.join(out, part)
    os.makedirs(folder, exist_ok=True)
    schema = _schema_of(kept) or OUTPUT_SCHEMA
    write_table(os.path.join(folder, "part-00000.parquet"), pa.Table.from_pylist(kept, schema=schema))
    for old in glob.glob(os.path.join(folder, "*")):
        if os.path.basename(old) != "part-00000.parquet":
            os.remove(old)
    for sub, rows in (("_dropped", dropped), ("_signatures", sigs)):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        write_table(os.path.join(out, sub, f"{part}.parquet"), pa.Table.from_pylist(rows) if rows else
                       pa.table({"id": pa.array([], pa.string())}))


def _schema_of(rows: list[dict]):
    import pyarrow as pa

    from batchv4.io.schema import OUTPUT_SCHEMA

    if not rows:
        return None
    extra = [k for k in rows[0] if k not in OUTPUT_SCHEMA.names]
    fields = list(OUTPUT_SCHEMA) + [pa.field(k, pa.infer_type([r.get(k) for r in rows])) for k in extra]
    return pa.schema(fields)




def _write_card(out: str, state: dict, kept: list[dict]) -> None:
    nights = [state["nights"][k] for k in sorted(state["nights"])]
    lines = ["---", "configs:", "- config_name: default", "  data_files: \"*=*/part-*.parquet\"", "---", "",
             "# Generated dataset", "", f"Generated by `batchv4 generate`; configuration fingerprint "
             f"`{state.get('fingerprint')}` (model `{state.get('config', {}).get('model')}`, template "
             f"`{state.get('config', {}).get('template')}`, {state.get('config', {}).get('n')} sample(s) per seed).",
             "", "| night | generated | kept | exact duplicates | near duplicates | error rows | cost (USD) |",
             "|---|---|---|---|---|---|---|"]
    for n in nights:
        cost = "n/a" if n["cost_usd"] is None else f"{n['cost_usd']:.6f}"
        lines.append(f"| {n['partition']} | {n['generated_rows']} | {n['kept_rows']} | {n['dropped_exact']} | "
                     f"{n['dropped_near']} | {n['error_rows']} | {cost} |")
    lines += ["", "Read it as one dataset: `polars.scan_parquet(\"OUT/*=*/part-*.parquet\", hive_partitioning=True)` "
              "or `pyarrow.dataset.dataset(OUT, partitioning=\"hive\", exclude_invalid_files=True)` (this card is "
              "not Parquet). Dropped duplicates are in `_dropped/`, with what they duplicate; error rows in "
              "`_runs/<night>/errors-*.parquet`.", "", "## Columns", ""]
    from batchv4.io.schema import OUTPUT_SCHEMA

    schema = _schema_of(kept) or OUTPUT_SCHEMA
    lines += [f"- `{f.name}`: {f.type}" for f in schema]
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

