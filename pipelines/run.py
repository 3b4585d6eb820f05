"""The `run` pipeline: a durable batch job from a dataset to Parquet parts with per-row usage and cost.

Flow: read rows (streamed) -> build requests (bad rows become error rows) -> skip rows a previous
run finished -> chat-encode and tokenize in batches -> shard -> plan (packing) -> engine ->
usage and cost per row -> parts written atomically as the run goes -> summary.json.

Owns: the job's configuration and fingerprint, resume, and the exactly-once rule (every input row
ends in the outputs or in the error rows, once). Does not own: file formats (`batchv4.io`), prices
(`batchv4.accounting`), planning (`batchv4.packing`) or generation (`batchv4.engine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    input: str
    output: str
    fmt: str | None = None
    model: str = "tiny"
    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    thinking: bool = False
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    kv_cache_memory: str = "512MiB"
    max_batched_tokens: int = 2048
    price: str = "deepseek-v4-flash"
    prices_file: str | None = None
    limit: int | None = None
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    quiet: bool = False
    part_rows: int = 512
    device: str = "cpu"
    storage_options: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What decides a row's output: model, prompt building, thinking, sampling, sharding."""
        keys = ("model", "prompt_column", "messages_column", "template", "system", "id_column", "thinking",
                "max_tokens", "temperature", "top_p", "seed", "stop", "n", "shard", "fmt")
        d = {k: getattr(self, k) for k in keys}
        d["stop"], d["shard"] = list(self.stop), list(self.shard) if self.shard else None
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        d = asdict(self)
        d.pop("storage_options")
        from batchv4.io.urls import redact_url

        d["input"], d["output"] = redact_url(self.input), redact_url(self.output)
        return d


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "n", "stop")


@dataclass
class _Row:
    req: Any                      # RowRequest
    ids: list[int]
    params: Any                   # SamplingParams
    group: int | None = None


def run(cfg: RunConfig, llm_factory: Callable[[RunConfig], Any] | None = None) -> dict:
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.io.readers import open_input
    from batchv4.io.rows import DuplicateTracker, RowError, RowSpec, build_request, check_columns
    from batchv4.io.writers import PartWriter, check_writable, read_errors, read_manifest, read_output_parts

    if cfg.n < 1 or cfg.max_tokens < 1:
        raise ValueError("-n and --max-tokens must be >= 1")
    so = cfg.storage_options or None
    private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
    card = get_card(cfg.price, private)
    src = open_input(cfg.input, cfg.fmt, storage_options=so)
    is_openai = src.format == "openai"
    spec = RowSpec(cfg.prompt_column, cfg.messages_column, cfg.template, cfg.system, cfg.id_column,
                   tuple(cfg.keep_columns), is_openai)
    columns = src.columns()
    if spec.id_column is None and not is_openai and "id" in columns:
        spec = RowSpec(spec.prompt_column, spec.messages_column, spec.template, spec.system, "id",
                       spec.keep_columns, spec.openai_batch)
    spec = check_columns(spec, columns, src.format)
    check_writable(cfg.output, so)
    fp = cfg.fingerprint()
    manifest = read_manifest(cfg.output, so)
    if manifest is not None:
        old = manifest.get("meta", {}).get("fingerprint")
        if old != fp and not cfg.overwrite:
            raise ValueError(f"{cfg.public()['output']} holds a run with a different configuration "
                             f"(fingerprint {old}, now {fp}); use --overwrite to replace it")
        if cfg.overwrite and old != fp:
            _clear(cfg.output, so)
            manifest = None
    done: set[tuple[str, str]] = set()
    done_errors: set[int] = set()
    if manifest is not None:
        t = read_output_parts(cfg.output, ["id", "content_hash"], so)
        done = set(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist()))
        done_errors = set(read_errors(cfg.output, ["row_index"], so).column("row_index").to_pylist())

    from batchv4.io.schema import keep_fields

    writer = PartWriter(cfg.output, kept=keep_fields(spec.keep_columns, src.arrow_schema()),
                        meta={"fingerprint": fp, "config": cfg.public()}, storage_options=so)
    t_start = time.perf_counter()
    timings = {"read_build": 0.0, "tokenize": 0.0, "plan_engine": 0.0, "account_write": 0.0}

    # ---- read, build, dedupe, tokenize ------------------------------------------------------------
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.packing import shard_of
    from batchv4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    base = SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed, stop=list(cfg.stop) or None)
    dups = DuplicateTracker()
    rows: dict[str, _Row] = {}
    errors: list[dict] = []
    counts = {"input_rows": 0, "skipped_done": 0, "error_rows": 0, "out_of_shard": 0}
    for batch in src.iter_rows():
        t0 = time.perf_counter()
        built = []
        for raw in batch:
            if cfg.limit is not None and counts["input_rows"] >= cfg.limit:
                break
            counts["input_rows"] += 1
            r = build_request(raw, spec)
            if isinstance(r, RowError):
                if r.index not in done_errors:
                    errors.append(r.to_record())
                continue
            if dups.seen(r.id):
                if raw.index not in done_errors:
                    errors.append(RowError(raw.index, r.id, f"duplicate id {r.id!r}", raw.raw).to_record())
                continue
            if (r.id, r.content_hash) in done:
                counts["skipped_done"] += 1
                continue
            try:
                over = {k: v for k, v in r.params.items() if k in _SAMPLING_KEYS}
                params = base.replace(**over) if over else base
            except ValueError as e:
                errors.append(RowError(raw.index, r.id, str(e), raw.raw).to_record())
                continue
            built.append((r, params))
        t1 = time.perf_counter()
        timings["read_build"] += t1 - t0
        if built:
            ids = tok.chat_token_ids([r.messages for r, _ in built], cfg.thinking)
            for (r, params), toks in zip(built, ids):
                if cfg.shard and shard_of(toks, cfg.shard[1]) != cfg.shard[0]:
                    counts["out_of_shard"] += 1
                    continue
                rows[r.id] = _Row(r, toks, params)
        timings["tokenize"] += time.perf_counter() - t1
        if cfg.limit is not None and counts["input_rows"] >= cfg.limit:
            break
    # ---- generate ---------------------------------------------------------------------------------
    llm = (llm_factory or _default_llm)(cfg)
    t_engine = time.perf_counter()
    buf: list[dict] = []
    totals = {"rows": 0, "prompt_tokens": 0, "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 0,
              "completion_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.0}
    keys = list(rows)
    planned = llm.plan_requests(keys, [rows[k].ids for k in keys], [rows[k].params for k in keys],
                                [cfg.thinking] * len(keys))

    def remember_groups(it):
        for r in it:
            rows[r.request_id].group = r.group
            yield r

    reqs = remember_groups(planned)
    pbar = _bar(len(keys), cfg.quiet)
    for out in llm.generate_stream(reqs):
        t0 = time.perf_counter()
        row = rows.pop(out.request_id)
        first = out.outputs[0]
        if first.finish_reason == "error":
            errors.append({"id": row.req.id, "row_index": row.req.index, "error": first.error,
                           "raw": json.dumps({"messages": row.req.messages}, ensure_ascii=False)})
        else:
            buf.extend(_output_rows(row, out, card, llm, totals))
        if len(buf) >= cfg.part_rows:
            writer.write_part(_amortize(buf))
            buf = []
        if len(errors) >= cfg.part_rows:
            counts["error_rows"] += len(errors)
            writer.write_errors(errors)
            errors = []
        timings["account_write"] += time.perf_counter() - t0
        if pbar is not None:
            pbar.update(1)
            hit = totals["prompt_cache_hit_tokens"] / max(1, totals["prompt_tokens"])
            pbar.set_postfix(cache_hit=f"{hit:.0%}")
    if pbar is not None:
        pbar.close()
    t0 = time.perf_counter()
    writer.write_part(_amortize(buf))
    counts["error_rows"] += len(errors)
    writer.write_errors(errors)
    timings["account_write"] += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    timings["plan_engine"] = time.perf_counter() - t_engine - timings["account_write"]
    summary = _summary(cfg, fp, writer, counts, timings, wall, llm, card, private, is_openai)
    _write_json(cfg.output, "summary.json", summary, so)
    if is_openai:
        from batchv4.io.openai_batch import write_openai_batch_output

        rows, errs = _openai_rows(cfg.output, so)
        write_openai_batch_output(cfg.output, rows, errs, model=cfg.model, storage_options=so)
    return summary


def _summary(cfg, fp, writer, counts, timings, wall, llm, card, private, is_openai) -> dict:
    """Figures from the rows actually in the output (so a resumed run reports the whole job), plus
    what this invocation did."""
    from batchv4.accounting.summary import compare_cards, summarize
    from batchv4.io.writers import read_output_parts

    cols = ["prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens",
            "reasoning_tokens", "cost_usd", "cost_usd_self_hosted", "engine_seconds"]
    table = read_output_parts(cfg.output, cols, cfg.storage_options or None)
    totals = summarize(table.to_pylist())
    now = datetime.now(timezone.utc)
    st = llm.stats()
    gen = totals.completion_tokens
    return {
        "fingerprint": fp,
        "config": cfg.public(),
        "price_card": card.name,
        "counts": {**counts, "output_rows": writer.rows_written, "error_rows": writer.error_rows_written},
        "totals": totals.to_dict(),
        "this_run": {
            "wall_seconds": wall,
            "engine_forward_seconds": st["forward_seconds"],
            "prefill_tokens_computed": st["prefill_tokens"],
            "decode_tokens": st["decode_tokens"],
            "cached_prompt_tokens": st["cached_prompt_tokens"],
            "tokens_per_second": (st["prefill_tokens"] + st["decode_tokens"] + st["cached_prompt_tokens"])
            / wall if wall > 0 else 0.0,
            "generated_tokens_per_second": gen / wall if wall > 0 else 0.0,
            "preemptions": st["preemptions"],
            "snapshot_evictions": st["snapshot_evictions"],
            "peak_snapshots": st["peak_snapshots"],
            "seconds_by_stage": timings,
        },
        "compare": [
            {"card": q.card, "label": q.label, "window": q.window, "at": q.at.isoformat(),
             "cost_usd": q.cost_usd, "approximate": q.approximate}
            for q in compare_cards(totals, now, private=private)
        ],
        "notes": "Other providers' cards are approximate: their tokenizers differ from V4's.",
    }


def _openai_rows(out_url: str, so) -> tuple[list[dict], list[dict]]:
    from batchv4.io.writers import read_errors, read_output_parts

    rows = read_output_parts(out_url, None, so).to_pylist()
    errs = read_errors(out_url, None, so).to_pylist()
    return rows, errs


def _write_json(out_url: str, name: str, obj: dict, so) -> None:
    from batchv4.io.urls import get_fs, join, write_atomic

    fs, path = get_fs(out_url, so)
    write_atomic(fs, join(fs, path, name), json.dumps(obj, indent=2, default=str).encode())


def _amortize(buf: list[dict]) -> list[dict]:
    """cost_usd_amortized: the shared prefix's input cost spread evenly over the rows of the same
    plan group within this part (the sum over the group's rows is unchanged)."""
    from batchv4.accounting.amortize import PricedRow, amortized_costs
    from batchv4.accounting.pricing import RowCost, RowUsage

    priced = []
    for r in buf:
        u = RowUsage(r["prompt_cache_hit_tokens"], r["prompt_cache_miss_tokens"], r["completion_tokens"],
                     r["reasoning_tokens"])
        c = r.pop("_cost")
        priced.append(PricedRow(u, c))
    for r, a in zip(buf, amortized_costs(priced, [r.pop("_group") for r in buf])):
        r["cost_usd_amortized"] = a
    return buf


def _clear(url: str, so) -> None:
    from batchv4.io.urls import get_fs

    fs, path = get_fs(url, so)
    for p in fs.ls(path, detail=False):
        fs.rm(p, recursive=True)


def _default_llm(cfg: RunConfig):
    from batchv4.engine.llm import LLM

    return LLM(cfg.model, device=cfg.device, kv_cache_memory=cfg.kv_cache_memory,
               max_num_batched_tokens=cfg.max_batched_tokens, seed=cfg.seed)


def _bar(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="row", dynamic_ncols=True)


def _output_rows(row: _Row, out, card, llm, totals: dict) -> list[dict]:
    from batchv4.accounting.pricing import price_row_detail, self_hosted_cost

    now = datetime.now(timezone.utc)
    recs = []
    n_prompt = len(out.prompt_token_ids)
    for c in out.outputs:
        # the n samples share one prompt: its hits are counted on sample 0 only; later samples
        # read the whole prompt from the cache
        hit = out.num_cached_tokens if c.index == 0 else n_prompt
        usage = {"prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": n_prompt - hit,
                 "completion_tokens": len(c.token_ids), "reasoning_tokens": c.num_reasoning_tokens}
        detail = price_row_detail(usage, card, now)
        cost = None if detail is None else detail.total_usd
        secs = _engine_seconds(llm, n_prompt - hit + len(c.token_ids))
        rec = {"id": row.req.id, "sample_index": c.index, "output": c.text, "reasoning": c.reasoning_text,
               "finish_reason": c.finish_reason, "prompt_tokens": n_prompt, **usage,
               "cost_usd": cost, "cost_usd_self_hosted": self_hosted_cost(secs, card), "engine_seconds": secs,
               "_cost": detail, "_group": row.group,
               "finished_at": now, "content_hash": row.req.content_hash, **row.req.keep}
        recs.append(rec)
        totals["rows"] += 1
        totals["prompt_tokens"] += n_prompt
        for k in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens", "reasoning_tokens"):
            totals[k] += usage[k]
        totals["cost_usd"] += cost or 0.0
    return recs


def _engine_seconds(llm, tokens: int) -> float:
    st = llm.stats()
    done = st["prefill_tokens"] + st["decode_tokens"]
    return st["forward_seconds"] * tokens / done if done else 0.0
