"""The `run` pipeline: a durable batch job from a dataset to Parquet parts with per-row usage and cost.

Flow: check options, columns and the output location (before any work) -> read rows (streamed)
-> build requests (bad rows become error rows) -> skip rows a previous run finished -> chat-encode
and tokenize in batches -> shard -> plan (packing, spilling to disk past one window) -> engine ->
usage and cost per row -> parts written atomically as the run goes -> summary.json (and
output.jsonl for OpenAI batch input).

Memory does not grow with the input: rows are read and tokenized a batch at a time, the planner
spills token ids to disk, and each row's record (request, kept values) waits in an on-disk
`RunState` until the plan reaches it; only the rows inside the engine are held in memory.

Owns: the job's configuration and fingerprint, resume, the exactly-once rule (every input row ends
in the outputs or in the error rows, once; under `--shard I/N` every row belongs to exactly one
shard, error rows included), and the per-row prompt encoding (`chat_token_ids`, shared with the
estimate). Does not own: file formats (`batchv4.io`), prices (`batchv4.accounting`), planning
(`batchv4.packing`) or generation (`batchv4.engine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

log = logging.getLogger(__name__)

# files a run writes besides its parts; an --overwrite removes exactly these (manifest first)
_RUN_FILES = ("manifest.json", "summary.json", "output.jsonl")
_EFFORTS = (None, "high", "max")      # what the V4 chat encoding knows


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
    kv_cache_dtype: str = "auto"
    max_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    price: str = "deepseek-v4-flash"
    prices_file: str | None = None
    limit: int | None = None
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    quiet: bool = False
    part_rows: int = 512
    read_batch_rows: int = 1024
    device: str = "cpu"
    storage_options: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What decides a row's output columns: model, prompt building, thinking, sampling, the
        context limit, sharding, kept columns, the price card, and an fp8 cache (it runs the
        activation simulation). Not: the input's location,
        `--limit`, engine sizing, part size."""
        keys = ("model", "fmt", "prompt_column", "messages_column", "template", "system", "id_column",
                "keep_columns", "thinking", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "shard",
                "max_model_len", "price")
        # the fp8 cache runs the activation simulation: other numbers, so another configuration
        extra = {"kv_cache_dtype": self.kv_cache_dtype} if self.kv_cache_dtype != "auto" else {}
        d = {k: getattr(self, k) for k in keys} | extra
        d["stop"], d["keep_columns"] = list(self.stop), list(self.keep_columns)
        d["shard"] = list(self.shard) if self.shard else None
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        d = asdict(self)
        d.pop("storage_options")
        from batchv4.io.urls import redact_url

        d["input"], d["output"] = redact_url(self.input), redact_url(self.output)
        return d


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "n", "stop")


def _now() -> datetime:
    """The finish time a row is priced at (a function so tests can fix the clock)."""
    return datetime.now(timezone.utc)


def chat_token_ids(tok, requests: list, thinking: bool) -> list[tuple[list[int] | None, bool, str | None]]:
    """(token ids, thinking, error) per RowRequest, encoded in batches. An OpenAI body's `thinking`
    and `reasoning_effort` override `thinking` for its row; an effort the V4 encoding does not know
    makes that row an error (ids None)."""
    out: list[Any] = [None] * len(requests)
    groups: dict[tuple[bool, str | None], list[int]] = {}
    for i, r in enumerate(requests):
        think = bool(r.params.get("thinking", thinking))
        effort = r.params.get("reasoning_effort")
        if effort not in _EFFORTS:
            out[i] = (None, think, f"reasoning_effort {effort!r} is not supported by V4 (use 'high' or 'max')")
            continue
        groups.setdefault((think, effort), []).append(i)
    for (think, effort), idx in groups.items():
        ids = tok.chat_token_ids([requests[i].messages for i in idx], think, effort)
        for i, toks in zip(idx, ids):
            out[i] = (toks, think, None)
    return out


def _check_options(cfg: RunConfig):
    """Everything that can be checked without reading the input; returns the base SamplingParams."""
    from batchv4.config import ModelConfig
    from batchv4.engine.llm import parse_bytes
    from batchv4.engine.sampling_params import SamplingParams

    for name in ("n", "max_tokens", "part_rows", "max_batched_tokens", "max_num_seqs", "read_batch_rows"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {cfg.max_model_len}")
    if cfg.kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"--kv-cache-dtype must be auto or fp8, got {cfg.kv_cache_dtype!r}")
    if cfg.limit is not None and cfg.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {cfg.limit}")
    base = SamplingParams(n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed, stop=list(cfg.stop) or None)
    ModelConfig.load(cfg.model)
    parse_bytes(cfg.kv_cache_memory)
    if cfg.device != "cpu":
        import torch

        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA device is available")
    return base


def _resolve(cfg: RunConfig, src) -> tuple[Any, RunConfig]:
    """The row spec checked against the input's columns, and the config with what was detected
    (format, prompt source, id column) filled in, so the fingerprint does not depend on defaults."""
    from batchv4.io.rows import RowSpec, check_columns

    is_openai = src.format == "openai"
    columns = src.columns()
    id_column = cfg.id_column
    if id_column is None and not is_openai and "id" in columns:
        id_column = "id"
    spec = RowSpec(cfg.prompt_column, cfg.messages_column, cfg.template, cfg.system, id_column,
                   tuple(cfg.keep_columns), is_openai)
    spec = check_columns(spec, columns, src.format)
    return spec, replace(cfg, fmt=src.format, prompt_column=spec.prompt_column,
                         messages_column=spec.messages_column, id_column=spec.id_column)


def _previous(cfg: RunConfig, fp: str, so, state) -> None:
    """Load into `state` the (id, content hash) of finished output rows and the row indexes of
    written error rows of the run already in the output folder, one part at a time; refuses a
    different configuration unless --overwrite."""
    from batchv4.io.writers import iter_error_rows, iter_output_rows, read_manifest

    manifest = read_manifest(cfg.output, so)
    if manifest is None:
        return
    old = manifest.get("meta", {}).get("fingerprint")
    if cfg.overwrite:
        _clear(cfg.output, so)
        return
    if old != fp:
        raise ValueError(f"{cfg.public()['output']} holds a run with a different configuration "
                         f"(fingerprint {old}, now {fp}); use --overwrite to replace it")
    # the summary and OpenAI output of an earlier invocation are stale from now on
    _remove(cfg.output, _RUN_FILES[1:], so)
    state.add_done((r["id"], r["content_hash"]) for r in iter_output_rows(cfg.output, ["id", "content_hash"], so))
    state.add_done_errors(r["row_index"] for r in iter_error_rows(cfg.output, ["row_index"], so))


class _Errors:
    """Error rows, written as a part whenever `part_rows` of them are waiting."""

    def __init__(self, writer, part_rows: int, counts: dict) -> None:
        self.writer, self.part_rows, self.counts, self.buf = writer, part_rows, counts, []

    def add(self, record: dict) -> None:
        self.buf.append(record)
        if len(self.buf) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        self.counts["error_rows"] += len(self.buf)
        self.writer.write_errors(self.buf)
        self.buf = []


def run(cfg: RunConfig, llm_factory: Callable[[RunConfig], Any] | None = None) -> dict:
    """`llm_factory(cfg)` builds the engine (default: `LLM`); `run` uses its `generate_stream`
    and `stats`, and builds it only once the plan holds at least one row."""
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.io.readers import open_input
    from batchv4.io.schema import keep_fields
    from batchv4.io.writers import PartWriter, check_writable
    from batchv4.pipelines.run_state import RunState

    base = _check_options(cfg)
    so = cfg.storage_options or None
    private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
    card = get_card(cfg.price, private)
    src = open_input(cfg.input, cfg.fmt, storage_options=so)
    spec, cfg = _resolve(cfg, src)
    kept = keep_fields(spec.keep_columns, src.arrow_schema())
    check_writable(cfg.output, so)
    fp = cfg.fingerprint()
    with RunState(kept) as state:
        _previous(cfg, fp, so, state)
        writer = PartWriter(cfg.output, kept=kept, meta={"fingerprint": fp, "config": cfg.public()},
                            storage_options=so)
        try:
            return _run(cfg, fp, src, spec, base, card, private, state, writer, llm_factory or _default_llm)
        except BaseException:
            # an error or Ctrl-C: list what was written (a kill loses at most about 1/64 of it)
            if writer.manifest["parts"] or writer.manifest["error_parts"]:
                try:
                    writer.flush()
                except Exception as e:      # the first error is the one to report
                    log.warning("could not update the manifest after an error: %s", e)
            raise


def _run(cfg, fp, src, spec, base, card, private, state, writer, llm_factory) -> dict:
    import itertools

    from batchv4.packing import plan
    from batchv4.pipelines.run_output import amortize, output_rows, summary, write_json

    so = cfg.storage_options or None
    t_start = time.perf_counter()
    timings = {"read_build": 0.0, "tokenize": 0.0, "plan": 0.0, "engine_build": 0.0, "plan_engine": 0.0,
               "account_write": 0.0}
    counts = {"input_rows": 0, "skipped_done": 0, "error_rows": 0, "out_of_shard": 0, "planned_rows": 0}
    errors = _Errors(writer, cfg.part_rows, counts)
    planned = plan(_read(cfg, src, spec, base, state, errors, counts, timings), spill_dir=state.dir)
    t0 = time.perf_counter()
    first = next(planned, None)           # the plan has read the whole input by its first request
    timings["plan"] = time.perf_counter() - t0 - timings["read_build"] - timings["tokenize"]

    t_engine = time.perf_counter()
    llm = llm_factory(cfg) if first is not None else None
    timings["engine_build"] = time.perf_counter() - t_engine
    t_engine += timings["engine_build"]
    inflight: dict[str, tuple[Any, int]] = {}     # id -> (RowRequest, plan group), while in the engine

    def requests():
        from batchv4.engine.scheduler import EngineRequest

        for pr in itertools.chain([first], planned):
            req, over, thinking = state.get(pr.key)
            inflight[pr.key] = (req, pr.group)
            yield EngineRequest.from_plan(pr, base.replace(**over) if over else base, thinking)

    buf: list[dict] = []
    progress = {"rows": 0, "prompt_tokens": 0, "prompt_cache_hit_tokens": 0, "completion_tokens": 0}
    pbar = _bar(cfg.quiet, "generate", "row", total=counts["planned_rows"])
    for out in (llm.generate_stream(requests()) if llm is not None else ()):
        t0 = time.perf_counter()
        req, group = inflight.pop(out.request_id)
        first_out = out.outputs[0]
        if first_out.finish_reason == "error":
            errors.add({"id": req.id, "row_index": req.index, "error": first_out.error,
                        "raw": json.dumps({"messages": req.messages}, ensure_ascii=False)})
        else:
            buf.extend(output_rows(req, group, out, card, llm, _now(), progress))
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
    timings["account_write"] += time.perf_counter() - t0
    timings["plan_engine"] = time.perf_counter() - t_engine - timings["account_write"]
    wall = time.perf_counter() - t_start
    result = summary(cfg, fp, writer, counts, timings, wall, llm, card, private, _now())
    write_json(cfg.output, "summary.json", result, so)
    if src.format == "openai":
        from batchv4.io.openai_batch import write_openai_batch_output
        from batchv4.io.writers import iter_error_rows, iter_output_rows

        write_openai_batch_output(cfg.output, iter_output_rows(cfg.output, None, so), iter_error_rows(cfg.output, None, so),
                                  model=cfg.model, storage_options=so)
    return result


def _read(cfg, src, spec, base, state, errors: _Errors, counts, timings):
    """Read, build, dedupe and tokenize, yielding a `PackInput(id, token ids)` per row this
    invocation must generate; its record goes to `state`. Error rows go to `errors`, except those
    already written and those of another shard."""
    from batchv4.io.rows import RowError, build_request
    from batchv4.packing import PackInput, shard_of
    from batchv4.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer()
    timings["tokenize"] += time.perf_counter() - t0
    read_bar = _bar(cfg.quiet, "read", "row")
    tok_bar = _bar(cfg.quiet, "tokenize", "tok")

    def fail(err: RowError) -> None:
        if state.is_done_error(err.index):
            counts["skipped_done"] += 1
        elif cfg.shard and err.index % cfg.shard[1] != cfg.shard[0]:
            counts["out_of_shard"] += 1     # rows without tokens are dealt to shards by row number
        else:
            errors.add(err.to_record())

    def full() -> bool:
        return cfg.limit is not None and counts["input_rows"] >= cfg.limit

    for batch in src.iter_rows(batch_size=cfg.read_batch_rows):
        t0 = time.perf_counter()
        built = []
        for raw in batch:
            if full():
                break
            counts["input_rows"] += 1
            r = build_request(raw, spec)
            if isinstance(r, RowError):
                fail(r)
                continue
            if state.seen(r.id):
                text = raw.raw if raw.raw is not None else json.dumps(raw.data, ensure_ascii=False, default=str)
                fail(RowError(raw.index, r.id, f"duplicate id {r.id!r}", text))
                continue
            if state.is_done_error(raw.index) or state.is_done(r.id, r.content_hash):
                counts["skipped_done"] += 1
                continue
            over = {k: v for k, v in r.params.items() if k in _SAMPLING_KEYS}
            try:
                if over:
                    base.replace(**over)
            except ValueError as e:
                fail(RowError(raw.index, r.id, str(e).splitlines()[0], raw.raw))
                continue
            built.append((r, over))
        t1 = time.perf_counter()
        timings["read_build"] += t1 - t0
        n_tok = 0
        keep: list[tuple[Any, dict, bool]] = []
        items = []
        encoded = chat_token_ids(tok, [r for r, _ in built], cfg.thinking) if built else []
        for (r, over), (toks, think, err) in zip(built, encoded):
            if err is not None:
                fail(RowError(r.index, r.id, err, json.dumps({"messages": r.messages}, ensure_ascii=False)))
                continue
            if cfg.shard and shard_of(toks, cfg.shard[1]) != cfg.shard[0]:
                counts["out_of_shard"] += 1
                continue
            keep.append((r, over, think))
            items.append(PackInput(r.id, toks))
            n_tok += len(toks)
        state.put(keep)
        counts["planned_rows"] += len(items)
        timings["tokenize"] += time.perf_counter() - t1
        if read_bar is not None:
            read_bar.update(len(batch))
            tok_bar.update(n_tok)
        yield from items
        if full():
            break
    for b in (read_bar, tok_bar):
        if b is not None:
            b.close()


def _remove(url: str, names, so) -> None:
    from batchv4.io.urls import get_fs, join

    fs, path = get_fs(url, so)
    for name in names:
        p = join(fs, path, name)
        if fs.exists(p):
            fs.rm_file(p)


def _clear(url: str, so) -> None:
    """Remove a previous run's files (the manifest first, so a kill midway leaves no listed part
    behind); other files in the folder are left alone."""
    import re

    from batchv4.io.urls import get_fs

    _remove(url, _RUN_FILES[:1], so)
    fs, path = get_fs(url, so)
    pat = re.compile(r"^\.?(part|errors)-\d{5,}\.parquet(\.tmp-[0-9a-f]+)?$")
    for p in fs.ls(path, detail=False):
        if pat.match(p.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm_file(p)
    _remove(url, _RUN_FILES[1:], so)


def _default_llm(cfg: RunConfig):
    from batchv4.engine.llm import LLM

    return LLM(cfg.model, device=cfg.device, kv_cache_memory=cfg.kv_cache_memory,
               max_num_batched_tokens=cfg.max_batched_tokens, max_num_seqs=cfg.max_num_seqs, seed=cfg.seed,
               max_model_len=cfg.max_model_len, kv_cache_dtype=cfg.kv_cache_dtype)


def _bar(quiet: bool, desc: str, unit: str, total: int | None = None):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True, leave=False)
