"""The row front-end: from an input URL to tokenized requests, for `run`, `estimate` and every
pipeline to come.

Owns: opening the input (file discovery, the run's output folder left out), resolving how a row
becomes a request (each row uses what it has unless a column is named), per-row sampling from the
one parser of OpenAI bodies (OpenAI's defaults for OpenAI input), ids and duplicates, kept columns,
the context pre-check, chat encoding and tokenization with the model's own tokenizer (in a worker
thread, beside the reading of the next batch), `--limit` and `--shard`. Whatever goes wrong with
one row, whatever the exception, makes that row an error row (`RowError`) handed to the caller; the
job goes on. Does not own: resume (the run says which rows are done), planning, writing or prices.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchv4.errors import UserError
from batchv4.io.rows import ROW_ONLY_PARAMS, RowError, RowRequest, RowSpec
from batchv4.io.rows import dump_row as _json

log = logging.getLogger(__name__)

_EFFORTS = (None, "high", "max")      # what the V4 chat encoding knows
OPENAI_TEMPERATURE = 1.0              # OpenAI's default when a body names no temperature
PLAIN_TEMPERATURE = 0.0               # batchv4's default for prompt and messages rows: greedy


@dataclass(frozen=True)
class RowOptions:
    """What decides how rows become requests: shared by `run` and `estimate`, so both count and
    tokenize the same rows. `temperature=None` is the default of each row's kind (greedy for
    prompt/messages rows, OpenAI's 1.0 for OpenAI bodies without one)."""

    input: str
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
    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    max_model_len: int | None = None
    limit: int | None = None
    shard: tuple[int, int] | None = None
    read_batch_rows: int = 1024
    storage_options: dict = field(default_factory=dict)
    # "local" (batchv4's engine: `model` is a preset or checkpoint folder, its context is checked)
    # or "openai" (a remote API: `model` is the provider's name, the V4 tokenizer counts tokens)
    backend: str = "local"
    tokenizer: str | None = None     # a folder with tokenizer.json  [default: the model's, else V4's]
    # structured outputs for every row (a row's own response_format wins): at most one of these
    json_schema: str | None = None   # the schema's JSON text (the CLI reads --json-schema FILE)
    regex: str | None = None
    choice: tuple[str, ...] = ()
    max_thinking_tokens: int | None = None


@dataclass(frozen=True)
class Row:
    """A row ready for planning."""

    req: RowRequest
    over: dict[str, Any]        # sampling overrides from the row's OpenAI body
    thinking: bool
    token_ids: list[int]
    sampling: Any               # the SamplingParams the engine will use for this row


def base_sampling(opts: RowOptions, openai: bool):
    """The row kind's SamplingParams before a row's own overrides (UserError naming the option)."""
    from batchv4.engine.sampling_params import SamplingParams

    temperature = opts.temperature
    if temperature is None:
        temperature = OPENAI_TEMPERATURE if openai else PLAIN_TEMPERATURE
    structured = structured_of(opts)      # its errors name their option already
    try:
        return SamplingParams(n=opts.n, max_tokens=opts.max_tokens, temperature=temperature, top_p=opts.top_p,
                              seed=opts.seed, stop=list(opts.stop) or None, structured_outputs=structured,
                              max_thinking_tokens=opts.max_thinking_tokens)
    except ValueError as e:
        raise UserError(f"--{str(e).split()[0].replace('_', '-')}: {str(e).split(' ', 1)[1]}") from None


def structured_of(opts: RowOptions):
    """The job-wide structured outputs of --json-schema / --regex / --choice (UserError naming them)."""
    given = [(k, v) for k, v in (("json-schema", opts.json_schema), ("regex", opts.regex),
                                 ("choice", opts.choice or None)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UserError(f"give one of --json-schema, --regex and --choice, not {' and '.join('--' + k for k, _ in given)}")
    from batchv4.structured.params import StructuredOutputsParams

    k, v = given[0]
    try:
        return StructuredOutputsParams(**{{"json-schema": "json"}.get(k, k): v})
    except UserError as e:
        raise UserError(f"--{k}: {str(e).removeprefix('structured outputs: ')}") from None


def model_tokenizer(model: str):
    """The tokenizer of `model`: a checkpoint folder's own `tokenizer.json`, else the bundled one
    (presets). Prompts, estimates and decoding all use this one."""
    from batchv4.tokenizer import load_tokenizer

    return load_tokenizer(model if os.path.isdir(model) else None)


class Frontend:
    """One job's input: opened, checked and resolved at construction (before any work, so a bad
    option or column fails at once); `batches()` then streams its rows."""

    def __init__(self, opts: RowOptions, *, exclude: Sequence[str] = ()) -> None:
        from batchv4.config import ModelConfig
        from batchv4.io.readers import open_input
        from batchv4.io.rows import check_columns
        from batchv4.io.schema import keep_fields

        self.opts = opts
        so = opts.storage_options or None
        self.src = open_input(opts.input, opts.fmt, storage_options=so, exclude=tuple(exclude))
        if self.src.skipped:
            log.warning("skipped, not input data: %s", ", ".join(self.src.skipped))
        if not self.src.has_rows():
            from batchv4.io.urls import redact_url

            raise UserError(f"{redact_url(opts.input)} holds no rows")
        is_openai = self.src.format == "openai"
        columns = self.src.columns()
        id_column = opts.id_column
        if id_column is None and not is_openai and "id" in columns:
            id_column = "id"
        spec = RowSpec(opts.prompt_column, opts.messages_column, opts.template, opts.system, id_column,
                       tuple(opts.keep_columns), is_openai)
        self.spec = check_columns(spec, columns, self.src.format)
        self.kept = keep_fields(self.spec.keep_columns, self.src.arrow_schema())
        import pyarrow as pa

        self._kept_schema = pa.schema(self.kept)
        self.base = base_sampling(opts, openai=False)
        self.base_openai = base_sampling(opts, openai=True)
        if opts.backend == "local":
            model_len = ModelConfig.load(opts.model).max_position_embeddings
            if opts.max_model_len is not None and opts.max_model_len > model_len:
                raise UserError(f"--max-model-len {opts.max_model_len} is longer than {opts.model}'s context "
                                f"of {model_len} tokens")
            self.max_len = opts.max_model_len or model_len
        else:       # the provider checks its own context; --max-model-len makes rows fail here first
            self.max_len = opts.max_model_len or sys.maxsize
        self._tokenizer = None           # loaded with the first batch, after the output folder is checked
        self.exhausted = False          # True once every input row was read (no --limit cut)
        self.tokenize_busy = 0.0        # seconds the tokenize worker ran (see `batches`)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = model_tokenizer(self.opts.tokenizer or self.opts.model)
        return self._tokenizer

    def shippable(self) -> "Frontend":
        """A copy for `encode_stage` in another process: no input source (its files stay here) and
        no tokenizer (each process loads its own)."""
        import copy

        fe = copy.copy(self)
        fe.src, fe._tokenizer = None, None
        return fe

    def resolved(self) -> dict[str, Any]:
        """What was detected (format, prompt source, id column), for the job's fingerprint."""
        return {"fmt": self.src.format, "prompt_column": self.spec.prompt_column,
                "messages_column": self.spec.messages_column, "id_column": self.spec.id_column}

    # ---- rows -------------------------------------------------------------------------------------
    def batches(self, seen: Callable[[str], bool], on_error: Callable[[RowError], None], counts: dict,
                timings: dict, *, skip: Callable[[RowRequest], bool] | None = None,
                quiet: bool = True, seen_many: Callable[[list[str]], list[bool]] | None = None,
                remote: Callable | None = None, rows: Iterable[list] | None = None) -> Iterator[list[Row]]:
        """Lists of this shard's rows to plan, in input order. Every row read ends in exactly one
        of: a yielded `Row`, `on_error` (this shard's error rows, in input order), `skip(req)`
        returning True (done by an earlier run; counted by the caller) or `counts["out_of_shard"]`.
        `seen(id)` says whether an id came before (and remembers it); `seen_many(ids)`, when
        given, does the same for a batch of ids at once. Counts `input_rows`, `out_of_shard`,
        `planned_rows`; adds the main thread's seconds to `timings["read_build"]` (reading and
        building rows) and `timings["tokenize"]` (waiting for the tokenizer, checking lengths);
        `self.tokenize_busy` is the tokenize stage's own seconds.

        Batch k is tokenized in a worker thread while this thread reads and builds batch k+1
        and the caller plans batch k-1 (HF tokenizers releases the GIL while it encodes).

        `remote(requests)`, when given, replaces the tokenize thread: it returns a future whose
        `result()` is `encode_stage(self, requests)` computed elsewhere (the Ray executor's CPU
        tasks), up to `remote.depth` batches out at once. Building requests, ids, duplicates,
        resume, `--limit` and `--shard` stay here, in input order, so rows an earlier run finished
        are never tokenized and the rows and error rows are the same.
        `rows`, when given, replaces reading the input here: batches of RawRows, in input order,
        with their global indices (the Ray executor's read tasks)."""
        from concurrent.futures import ThreadPoolExecutor

        from batchv4.packing import shard_of

        opts = self.opts
        for key in ("input_rows", "out_of_shard", "planned_rows"):
            counts.setdefault(key, 0)
        for key in ("read_build", "tokenize"):
            timings.setdefault(key, 0.0)
        shard = opts.shard
        bars = [progress_bar(quiet, "read", "row"), progress_bar(quiet, "tokenize", "tok")]
        check = seen_many or (lambda ids: [seen(i) for i in ids])
        self.tokenize_busy = 0.0

        def fail(err: RowError) -> None:
            if shard and err.index % shard[1] != shard[0]:
                counts["out_of_shard"] += 1     # rows without tokens are dealt to shards by row number
            else:
                on_error(err)

        def finish(job) -> list[Row]:
            built, errors, fut = job
            t1 = time.perf_counter()
            encoded, busy = fut.result() if fut is not None else ([], 0.0)
            self.tokenize_busy += busy
            for err in errors:                  # the batch's build errors, then its tokenize errors
                fail(err)
            rows: list[Row] = []
            n_tok = 0
            max_len = self.max_len
            for (r, over, sampling), (enc, think, err) in zip(built, encoded):
                toks = enc.ids if err is None else None
                if err is None and len(toks) + sampling.max_tokens > max_len:
                    err = (f"prompt of {len(toks)} tokens plus max_tokens {sampling.max_tokens} exceeds the "
                           f"model's context of {max_len} tokens")
                if err is not None:
                    fail(RowError(r.index, r.id, err, _json({"messages": r.messages})))
                    continue
                if shard and shard_of(toks, shard[1]) != shard[0]:
                    counts["out_of_shard"] += 1
                    continue
                rows.append(Row(r, over, think, toks, sampling))
                n_tok += len(toks)
            counts["planned_rows"] += len(rows)
            timings["tokenize"] += time.perf_counter() - t1
            if bars[1] is not None:
                bars[1].update(n_tok)
            return rows

        limit = opts.limit
        self.exhausted = False
        whole = False
        depth = getattr(remote, "depth", 1) if remote is not None else 1
        pending: deque = deque()                # batches in the tokenizer (or out in tasks), in order
        with ThreadPoolExecutor(1, thread_name_prefix="batchv4-tokenize") as pool:
            for batch in rows if rows is not None else self.src.iter_rows(batch_size=opts.read_batch_rows):
                t0 = time.perf_counter()
                if limit is not None:
                    batch = batch[:max(0, limit - counts["input_rows"])]
                counts["input_rows"] += len(batch)
                if bars[0] is not None:
                    bars[0].update(len(batch))
                built, errors = self._admit(batch, self._prepare(batch), check, skip)
                tok = self.tokenizer            # loaded here, not in the worker: its errors are the caller's
                reqs = [b[0] for b in built]
                if remote is not None:
                    job = (built, errors, remote(reqs) if reqs else None)
                else:
                    job = (built, errors, pool.submit(_timed, self._encode, tok, reqs))
                del built, errors, reqs
                # what is done with is freed now (here, and the finished batch before the yield),
                # not a batch later: fewer live objects make the cyclic GC's passes fewer and shorter
                del batch
                timings["read_build"] += time.perf_counter() - t0
                if len(pending) >= depth:
                    rows = finish(pending.popleft())
                    if rows:
                        yield rows
                    del rows
                pending.append(job)
                del job
                if limit is not None and counts["input_rows"] >= limit:
                    break
            else:
                whole = True
            while pending:
                rows = finish(pending.popleft())
                if rows:
                    yield rows
        self.exhausted = whole
        for b in bars:
            if b is not None:
                b.close()

    def _prepare(self, batch: list) -> list[tuple]:
        """Each raw row's request, as far as it depends on the row alone: `(RowError, None, None,
        None)` when no request can be built, else `(RowRequest, sampling overrides, SamplingParams,
        None)`, or `(RowRequest, None, None, RowError)` for a request that cannot run (tools on the
        local engine, bad sampling fields, kept values that do not fit their column)."""
        from batchv4.io.rows import build_request

        spec = self.spec
        base = self.base_openai if spec.openai_batch else self.base
        out: list[tuple] = []
        for raw in batch:
            r = build_request(raw, spec)
            if isinstance(r, RowError):
                out.append((r, None, None, None))
                continue
            if not r.params:
                out.append((r, {}, base, None))
                continue
            if self.opts.backend == "local" and _uses_tools(r.params):
                out.append((r, None, None, RowError(r.index, r.id, "tools are not supported by batchv4's local "
                                                    "engine (V4's tool format is not built); use --backend openai",
                                                    _raw_text(raw))))
                continue
            try:
                over = {k: v for k, v in r.params.items() if k not in ROW_ONLY_PARAMS}
                out.append((r, over, base.replace(**over) if over else base, None))
            except Exception as e:
                out.append((r, None, None, RowError(r.index, r.id, _line(e), _raw_text(raw))))
        self._check_kept(out)
        return out

    def _admit(self, batch: list, prepared: list[tuple], check: Callable[[list[str]], list[bool]],
               skip: Callable[[RowRequest], bool] | None) -> tuple[list[tuple], list[RowError]]:
        """What the job does with a prepared batch, in input order: (the requests to run, as
        (RowRequest, overrides, SamplingParams); the batch's error rows, in input order). Every
        id is marked seen, an error row's too
        (an earlier run's output of it is stale); a duplicate id is an error row before anything
        else, a row an earlier run finished (`skip`) is left out before its own errors."""
        dup = iter(check([p[0].id for p in prepared if p[0].id is not None]))
        built: list[tuple] = []
        errors: list[RowError] = []
        for raw, (r, over, sampling, err) in zip(batch, prepared):
            if isinstance(r, RowError):
                if r.id is not None:
                    next(dup)
                errors.append(r)
                continue
            if next(dup):
                errors.append(RowError(r.index, r.id, f"duplicate id {r.id!r}", _raw_text(raw)))
                continue
            if skip is not None and skip(r):
                continue
            if err is not None:
                errors.append(err)
                continue
            built.append((r, over, sampling))
        return built, errors

    def _check_kept(self, prepared: list[tuple]) -> None:
        """Marks the prepared rows whose kept values do not fit the kept columns' types (a JSON
        value that does not fit the type inferred from the first rows makes its row an error row)."""
        ok = [i for i, p in enumerate(prepared) if p[3] is None and not isinstance(p[0], RowError)]
        if not self.kept or not ok:
            return
        from batchv4.io.schema import rows_to_table

        try:
            rows_to_table([prepared[i][0].keep for i in ok], self._kept_schema)
            return
        except Exception:
            pass
        for i in ok:
            r = prepared[i][0]
            try:
                rows_to_table([r.keep], self._kept_schema)
            except Exception as e:
                prepared[i] = (r, None, None, RowError(r.index, r.id, f"kept {_line(e).removeprefix('output ')}",
                                                       _json({"messages": r.messages, **r.keep})))

    def _encode(self, tok, requests: list[RowRequest]) -> list[tuple[Any, bool, str | None]]:
        """(HF encoding, thinking, error) per request, in batches; a batch the tokenizer refuses is
        encoded row by row, so only the bad row fails. The caller takes each encoding's `.ids`."""
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple[bool, str | None], list[int]] = {}
        default = (bool(self.opts.thinking), None)
        for i, r in enumerate(requests):
            if not r.params:
                groups.setdefault(default, []).append(i)
                continue
            think = bool(r.params.get("thinking", self.opts.thinking))
            effort = r.params.get("reasoning_effort")
            if effort not in _EFFORTS:
                out[i] = (None, think, f"reasoning_effort {effort!r} is not supported by V4 (use 'high' or 'max')")
                continue
            groups.setdefault((think, effort), []).append(i)
        for (think, effort), idx in groups.items():
            try:
                encs = tok.chat_encodings([requests[i].messages for i in idx], think, effort, normalized=True)
            except Exception:
                encs = None
            for j, i in enumerate(idx):
                if encs is not None:
                    out[i] = (encs[j], think, None)
                    continue
                try:
                    out[i] = (tok.chat_encodings([requests[i].messages], think, effort, normalized=True)[0], think,
                              None)
                except Exception as e:
                    out[i] = (None, think, f"cannot tokenize this row: {_line(e)}")
        return out


def _raw_text(raw) -> str:
    return raw.raw if raw.raw is not None else _json(raw.data)


_TASK_TOKENIZERS: dict = {}


@dataclass(frozen=True)
class _Ids:
    ids: list


def encode_stage(fe: "Frontend", requests: list) -> tuple[list[tuple], float]:
    """The tokenizing of one batch's requests, as a CPU task runs it: (each one's (token ids,
    thinking, error), the seconds spent). `fe` may be a copy without its input source (see
    `Frontend.shippable`); each process loads the tokenizer once."""
    t = time.perf_counter()
    name = fe.opts.tokenizer or fe.opts.model
    if fe._tokenizer is None:          # one tokenizer per process, for every task it runs
        fe._tokenizer = _TASK_TOKENIZERS.get(name) or _TASK_TOKENIZERS.setdefault(name, model_tokenizer(name))
    encoded = [(_Ids(list(enc.ids)) if enc is not None else None, think, err)
               for enc, think, err in fe._encode(fe.tokenizer, requests)]
    return encoded, time.perf_counter() - t


def _uses_tools(params: dict) -> bool:
    extra = params.get("extra_body") or {}
    return bool(extra.get("tools")) or extra.get("tool_choice") not in (None, "none")


def _timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def progress_bar(quiet: bool, desc: str, unit: str, total: int | None = None):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True, leave=False)


def options_of(cfg: Any) -> RowOptions:
    """The RowOptions fields of any config object that has them (RunConfig, EstimateConfig)."""
    from dataclasses import fields

    return RowOptions(**{f.name: getattr(cfg, f.name) for f in fields(RowOptions)})


