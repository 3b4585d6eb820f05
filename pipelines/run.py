"""The `run` pipeline: a durable batch job from a dataset to Parquet parts with per-row usage and cost.

Flow: check options (before any work) -> open the input through the row front-end -> claim the
output folder (marker and lock) -> take over an earlier run there -> read, build and tokenize rows
(bad rows become error rows; rows an earlier run finished are skipped) -> plan (packing, spilling
to disk past one window) -> once the whole input is read, remove outputs whose input changed ->
engine -> usage and cost per row -> parts written atomically as the run goes -> summary.json (and
output.jsonl for OpenAI batch input).

Memory does not grow with the input: rows are read and tokenized a batch at a time, the planner
spills token ids to disk, and each row's record (request, kept values) waits in an on-disk
`RunState` until the plan reaches it; only the rows inside the engine are held in memory.

Owns: the job's flow and the exactly-once rule (every input row ends in the outputs or in the
error rows, once; under `--shard I/N` every row belongs to exactly one shard, error rows included).
Does not own: the configuration (`run_config`), rows (`frontend`), resume (`run_resume`), file
formats (`batchv4.io`), prices (`batchv4.accounting`), planning (`batchv4.packing`) or generation
(`batchv4.engine`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable

from batchv4.pipelines.run_config import RunConfig, check_options

log = logging.getLogger(__name__)

__all__ = ["RunConfig", "run"]


def _now() -> datetime:
    """The finish time a row is priced at (a function so tests can fix the clock)."""
    return datetime.now(timezone.utc)


class _Errors:
    """Error rows, written as a part whenever `part_rows` of them are waiting."""

    def __init__(self, writer, part_rows: int, counts: dict) -> None:
        self.writer, self.part_rows, self.counts, self.buf = writer, part_rows, counts, []

    def add(self, record: dict) -> None:
        self.buf.append(record)
        if len(self.buf) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        self.counts["new_error_rows"] += len(self.buf)
        self.writer.write_errors(self.buf)
        self.buf = []


def run(cfg: RunConfig, llm_factory: Callable[[RunConfig], Any] | None = None, *,
        build_beside_reading: bool = True, skip_done_in: Callable[[str], set] | None = None) -> dict:
    """`llm_factory(cfg)` builds the backend (default: the local `LLM`); `run` drives it only
    through the backend protocol (`batchv4.engine.backend`: `generate_stream`, `stats`). It is
    built once the first row to generate is known, in a thread beside the rest of the reading
    and planning (a checkpoint takes minutes to load), or after them without
    `build_beside_reading`; never when there is nothing to generate. `skip_done_in(fingerprint)`
    names content hashes done elsewhere under the same configuration (`generate`: earlier
    nights); those rows are skipped and counted as `skipped_elsewhere`."""
    from batchv4.io.outdir import claim_output
    from batchv4.io.writers import PartWriter, check_writable
    from batchv4.pipelines.run_resume import take_over
    from batchv4.pipelines.run_state import RunState

    cfg, fp, fe, card, private = prepare(cfg)
    so = cfg.storage_options or None
    with claim_output(cfg.output, fingerprint=fp, storage_options=so) as claim, RunState(fe.kept) as state:
        check_writable(cfg.output, so)
        take_over(cfg, fp, claim, state)
        writer = PartWriter(cfg.output, kept=fe.kept, meta={"fingerprint": fp, "config": cfg.public()},
                            storage_options=so)
        try:
            elsewhere = frozenset(skip_done_in(fp)) if skip_done_in is not None else frozenset()
            return _run(cfg, fp, fe, card, private, state, writer, llm_factory or _default_llm,
                        build_beside_reading, elsewhere)
        except BaseException:
            # an error, Ctrl-C or SIGTERM: list what was written (a kill -9 loses at most about 1/64 of it)
            if writer.manifest["parts"] or writer.manifest["error_parts"]:
                try:
                    writer.flush()
                except Exception as e:      # the first error is the one to report
                    log.warning("could not update the manifest after an error: %s", e)
            raise


def prepare(cfg: RunConfig):
    """The head of a job that any executor runs first (local, Ray): the options checked, the price
    card, the row front-end opened, and the configuration with what was detected and its
    fingerprint. Returns (cfg, fingerprint, frontend, card, private cards)."""
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.pipelines.frontend import Frontend, options_of

    check_options(cfg)
    private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
    card = get_card(cfg.price, private)
    fe = Frontend(options_of(cfg), exclude=[cfg.output])
    cfg = replace(cfg, **fe.resolved())
    return cfg, cfg.fingerprint(), fe, card, private


class _Build:
    """The backend, built in a thread (torch and the tokenizer release the GIL while they work)."""

    def __init__(self, factory, cfg) -> None:
        import threading

        self.llm = self.error = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._build, args=(factory, cfg), name="batchv4-build", daemon=True)
        self._thread.start()

    def _build(self, factory, cfg) -> None:
        t0 = time.perf_counter()
        try:
            self.llm = factory(cfg)
        except BaseException as e:      # re-raised in the main thread by result()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def result(self):
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.llm


def job_counters() -> tuple[dict, dict]:
    """A job's stage seconds and row counts at their start (both executors report these)."""
    timings = {"read_build": 0.0, "tokenize": 0.0, "plan": 0.0, "engine_build": 0.0, "plan_engine": 0.0,
               "account_write": 0.0}
    counts = {"input_rows": 0, "skipped_done": 0, "new_error_rows": 0, "out_of_shard": 0, "planned_rows": 0,
              "stale_output_rows_removed": 0, "stale_error_rows_removed": 0}
    return timings, counts


def _run(cfg, fp, fe, card, private, state, writer, llm_factory, early: bool, elsewhere=frozenset()) -> dict:
    from batchv4.packing import PackConfig, plan
    from batchv4.pipelines.run_output import amortize, output_rows, summary, write_json
    from batchv4.pipelines.run_resume import drop_stale

    so = cfg.storage_options or None
    t_start = time.perf_counter()
    timings, counts = job_counters()
    errors = _Errors(writer, cfg.part_rows, counts)
    api_unit = PackConfig().api_unit
    build: list[_Build] = []

    def start_build() -> None:
        if early and not build:
            build.append(_Build(llm_factory, cfg))

    if elsewhere:
        counts["skipped_elsewhere"] = 0
    planned = plan(_read(cfg, fe, state, errors, counts, timings, start_build, elsewhere), spill_dir=state.dir)
    t0 = time.perf_counter()
    first = next(planned, None)           # the plan has read the whole input by its first request
    timings["plan"] = time.perf_counter() - t0 - timings["read_build"] - timings["tokenize"]
    counts["stale_output_rows_removed"], counts["stale_error_rows_removed"] = drop_stale(
        writer, state, fe.exhausted, counts["input_rows"])

    t_engine = time.perf_counter()
    if first is None:
        llm = build[0].result() if build else None
    elif build:
        llm = build[0].result()
        timings["engine_build"] = build[0].seconds
        timings["engine_build_wait"] = time.perf_counter() - t_engine     # what reading did not hide
    else:
        llm = llm_factory(cfg)
        timings["engine_build"] = timings["engine_build_wait"] = time.perf_counter() - t_engine
    t_engine = time.perf_counter()
    t_first = None
    inflight: dict[str, tuple[Any, int, int]] = {}     # id -> (RowRequest, plan group, API hits), in the engine

    def requests():
        from batchv4.engine.scheduler import EngineRequest

        for pr in itertools.chain([first], planned):
            req, sampling, thinking = state.get(pr.key)
            inflight[pr.key] = (req, pr.group, pr.api_hit_tokens, sampling.structured_outputs)
            yield EngineRequest.from_plan(pr, sampling, thinking, messages=req.messages,
                                          extra_body=_extra_body(req.params))

    buf: list[dict] = []
    progress = {"rows": 0, "prompt_tokens": 0, "prompt_cache_hit_tokens": 0, "completion_tokens": 0}
    from batchv4.pipelines.frontend import progress_bar

    pbar = progress_bar(cfg.quiet, "generate", "row", total=counts["planned_rows"])
    journal = _SentJournal(cfg.output, so) if cfg.backend != "local" else None
    if journal is not None and llm is not None:
        counts["resent_requests"] = 0
        llm.on_send = lambda key: journal.sent(key, counts)
        if pbar is not None:
            llm.on_status = pbar.set_description_str
    new_outputs = returned = 0
    for out in (llm.generate_stream(requests()) if first is not None else ()):
        t0 = time.perf_counter()
        if t_first is None:
            t_first = t0 - t_start
            timings["first_output"] = t_first     # seconds from the start to the first finished row
        returned += 1
        req, group, api_hit, structured = inflight.pop(out.request_id)
        first_out = out.outputs[0]
        if first_out.finish_reason == "error":
            errors.add(_engine_error(req, first_out.error))
        else:
            rows = output_rows(req, group, out, card, llm, _now(), progress, api_hit, api_unit, private)
            if structured is not None:
                _check_rows(rows, structured, fe)
            new_outputs += len(rows)
            buf.extend(rows)
        if len(buf) >= cfg.part_rows:
            writer.write_part(amortize(buf))
            buf = []
        timings["account_write"] += time.perf_counter() - t0
        if pbar is not None:
            pbar.update(1)
            secs = max(1e-9, time.perf_counter() - t_engine)
            hit = progress["prompt_cache_hit_tokens"] / max(1, progress["prompt_tokens"])
            tps = (progress["prompt_tokens"] + progress["completion_tokens"]) / secs
            pbar.set_postfix(tok_s=f"{tps:,.0f}", cache_hit=f"{hit:.0%}")
    if pbar is not None:
        pbar.close()
    t0 = time.perf_counter()
    writer.write_part(amortize(buf))
    errors.flush()
    writer.flush()                # every part listed; the manifest exists even with none (--limit 0)
    if journal is not None:
        journal.close()           # every sent request is now in a listed part
    counts["new_output_rows"] = new_outputs
    if first is not None and returned < counts["planned_rows"]:     # a spend cap stopped sending
        counts["not_sent_rows"] = counts["planned_rows"] - returned
    timings["account_write"] += time.perf_counter() - t0
    timings["plan_engine"] = time.perf_counter() - t_engine - timings["account_write"]
    wall = time.perf_counter() - t_start
    result = summary(cfg, fp, writer, counts, timings, wall, llm, card, private, _now())
    close = getattr(llm, "close", None)     # a rank group stops its rank processes
    if close is not None:
        close()
    write_json(cfg.output, "summary.json", result, so)
    if fe.src.format == "openai":
        from batchv4.io.openai_batch import write_openai_batch_output
        from batchv4.io.writers import iter_error_rows, iter_output_rows

        write_openai_batch_output(cfg.output, iter_output_rows(cfg.output, None, so), iter_error_rows(cfg.output, None, so),
                                  model=cfg.model, storage_options=so)
    return result


def _engine_error(req, message: str | None) -> dict:
    from batchv4.io.rows import RowError

    return RowError(req.index, req.id, message or "generation failed",
                    json.dumps({"messages": req.messages}, ensure_ascii=False)).to_record()


def _read(cfg, fe, state, errors: _Errors, counts, timings, on_first_row=None, elsewhere=frozenset(), remote=None,
          rows=None):
    """The front-end's rows as `PackInput(id, token ids)`, each row's record put in `state`;
    rows an earlier invocation finished with the same content are skipped, error rows it wrote
    are not written again."""
    from batchv4.packing import PackInput

    def on_error(err) -> None:
        if state.is_done_error(err.index, err.key()):
            counts["skipped_done"] += 1
        else:
            errors.add(err.to_record())

    def skip(req) -> bool:
        if state.is_done(req.id, req.content_hash):
            counts["skipped_done"] += 1
            return True
        if elsewhere and req.content_hash in elsewhere:
            counts["skipped_elsewhere"] += 1
            return True
        return False

    for batch in fe.batches(state.seen, on_error, counts, timings, skip=skip, quiet=cfg.quiet,
                            seen_many=state.seen_many, remote=remote, rows=rows):
        if on_first_row is not None:
            on_first_row()
        state.put([(r.req, r.sampling, r.thinking) for r in batch])
        yield from (PackInput(r.req.id, r.token_ids) for r in batch)


def _check_rows(rows: list[dict], structured, fe) -> None:
    """`valid` and `parsed` of constrained rows (batchv4.structured.check)."""
    from batchv4.structured.check import check_output

    for r in rows:
        r["valid"], r["parsed"] = check_output(structured, r["output"] or "", r["finish_reason"], fe.tokenizer)


def _extra_body(params: dict) -> dict | None:
    """What a remote backend sends beside the messages: passed-through body keys, reasoning effort."""
    extra = dict(params.get("extra_body") or {})
    if params.get("reasoning_effort") is not None:
        extra["reasoning_effort"] = params["reasoning_effort"]
    return extra or None


class _SentJournal:
    """Request keys sent to a remote API and not yet in a listed part (`_batchv4_sent.txt` in a local
    output folder, appended and flushed per request). A run that starts with one finds what an
    interrupted run had paid for or may have: those rows, sent again, are counted as
    `resent_requests` (requests possibly paid for twice). Object-store outputs keep none."""

    NAME = "_batchv4_sent.txt"

    def __init__(self, output: str, so) -> None:
        from batchv4.io.urls import get_fs, is_local

        self.file = None
        self.before: set[str] = set()
        fs, path = get_fs(output, so)
        if not is_local(fs):
            return
        self.path = os.path.join(path, self.NAME)
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.before = {line.rstrip("\n") for line in f if line.strip()}
        self.file = open(self.path, "a", encoding="utf-8")

    def sent(self, key: str, counts: dict) -> None:
        if key in self.before:
            counts["resent_requests"] += 1
            self.before.discard(key)
        if self.file is not None:
            self.file.write(key + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.remove(self.path)
            self.file = None


def _default_llm(cfg: RunConfig):
    if cfg.backend == "openai":
        return _remote_backend(cfg)
    from batchv4.engine.llm import LLM

    # data_parallel_size > 1: LLM(...) is a RankGroup (batchv4.engine.distributed), the same protocol
    return LLM(cfg.model, device=cfg.device, kv_cache_memory=cfg.kv_cache_memory,
               max_num_batched_tokens=cfg.max_batched_tokens, max_num_seqs=cfg.max_num_seqs, seed=cfg.seed,
               max_model_len=cfg.max_model_len, kv_cache_dtype=cfg.kv_cache_dtype,
               data_parallel_size=cfg.data_parallel_size, enable_expert_parallel=cfg.enable_expert_parallel)


def _remote_backend(cfg: RunConfig):
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.io.writers import iter_output_rows
    from batchv4.pipelines.frontend import model_tokenizer
    from batchv4.pipelines.run_config import api_key
    from batchv4.remote.client import OpenAIBackend

    card = get_card(cfg.price, load_price_file(cfg.prices_file) if cfg.prices_file else {})
    spent = 0.0
    if cfg.max_cost_usd is not None:      # the cap is the job's: rows earlier runs priced count
        try:
            spent = sum(r["cost_usd"] or 0.0 for r in iter_output_rows(cfg.output, ["cost_usd"],
                                                                      cfg.storage_options or None))
        except FileNotFoundError:
            spent = 0.0
    return OpenAIBackend(list(cfg.base_urls), cfg.model, api_key=api_key(cfg), provider=cfg.provider,
                         concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout=cfg.request_timeout,
                         rpm=cfg.rpm, tpm=cfg.tpm, max_cost_usd=cfg.max_cost_usd, spent_usd=spent, card=card,
                         when=cfg.when, tokenizer=model_tokenizer(cfg.tokenizer or cfg.model), seed=cfg.seed)
