"""The row front-end: from an input URL to tokenized requests, for `run`, `estimate` and every
pipeline to come.

Owns: opening the input (file discovery, the run's output folder left out), resolving how a row
becomes a request (each row uses what it has unless a column is named), per-row sampling from the
one parser of OpenAI bodies (OpenAI's defaults for OpenAI input), ids and duplicates, kept columns,
the context pre-check, chat encoding and tokenization with the model's own tokenizer, `--limit` and
`--shard`. Whatever goes wrong with one row, whatever the exception, makes that row an error row
(`RowError`) handed to the caller; the job goes on. Does not own: resume (the run says which rows
are done), planning, writing or prices.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchv4.errors import UserError
from batchv4.io.rows import ROW_ONLY_PARAMS, RowError, RowRequest, RowSpec

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
    try:
        return SamplingParams(n=opts.n, max_tokens=opts.max_tokens, temperature=temperature, top_p=opts.top_p,
                              seed=opts.seed, stop=list(opts.stop) or None)
    except ValueError as e:
        raise UserError(f"--{str(e).split()[0].replace('_', '-')}: {str(e).split(' ', 1)[1]}") from None


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
        model_len = ModelConfig.load(opts.model).max_position_embeddings
        if opts.max_model_len is not None and opts.max_model_len > model_len:
            raise UserError(f"--max-model-len {opts.max_model_len} is longer than {opts.model}'s context "
                            f"of {model_len} tokens")
        self.max_len = opts.max_model_len or model_len
        self._tokenizer = None           # loaded with the first batch, after the output folder is checked
        self.exhausted = False          # True once every input row was read (no --limit cut)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = model_tokenizer(self.opts.model)
        return self._tokenizer

    def resolved(self) -> dict[str, Any]:
        """What was detected (format, prompt source, id column), for the job's fingerprint."""
        return {"fmt": self.src.format, "prompt_column": self.spec.prompt_column,
                "messages_column": self.spec.messages_column, "id_column": self.spec.id_column}

    # ---- rows -------------------------------------------------------------------------------------
    def batches(self, seen: Callable[[str], bool], on_error: Callable[[RowError], None], counts: dict,
                timings: dict, *, skip: Callable[[RowRequest], bool] | None = None,
                quiet: bool = True) -> Iterator[list[Row]]:
        """Lists of this shard's rows to plan, in input order. Every row read ends in exactly one
        of: a yielded `Row`, `on_error` (this shard's error rows), `skip(req)` returning True (done
        by an earlier run; counted by the caller) or `counts["out_of_shard"]`. `seen(id)` says
        whether an id came before (and remembers it). Counts `input_rows`, `out_of_shard`,
        `planned_rows`; adds seconds to `timings["read_build"]` and `timings["tokenize"]`."""
        from batchv4.io.rows import build_request
        from batchv4.packing import shard_of

        opts = self.opts
        for key in ("input_rows", "out_of_shard", "planned_rows"):
            counts.setdefault(key, 0)
        for key in ("read_build", "tokenize"):
            timings.setdefault(key, 0.0)
        shard = opts.shard
        bars = [_bar(quiet, "read", "row"), _bar(quiet, "tokenize", "tok")]

        def fail(err: RowError) -> None:
            if shard and err.index % shard[1] != shard[0]:
                counts["out_of_shard"] += 1     # rows without tokens are dealt to shards by row number
            else:
                on_error(err)

        limit = opts.limit
        self.exhausted = False
        for batch in self.src.iter_rows(batch_size=opts.read_batch_rows):
            t0 = time.perf_counter()
            built: list[tuple[RowRequest, dict, Any]] = []
            for raw in batch:
                if limit is not None and counts["input_rows"] >= limit:
                    break
                counts["input_rows"] += 1
                r = build_request(raw, self.spec)
                if isinstance(r, RowError):
                    if r.id is not None:
                        seen(r.id)              # its id is taken: an earlier run's output of it is stale
                    fail(r)
                    continue
                if seen(r.id):
                    fail(RowError(r.index, r.id, f"duplicate id {r.id!r}", raw.raw if raw.raw is not None
                                  else _json(raw.data)))
                    continue
                if skip is not None and skip(r):
                    continue
                try:
                    over = {k: v for k, v in r.params.items() if k not in ROW_ONLY_PARAMS}
                    base = self.base_openai if self.spec.openai_batch else self.base
                    sampling = base.replace(**over) if over else base
                except Exception as e:
                    fail(RowError(r.index, r.id, _line(e), raw.raw if raw.raw is not None else _json(raw.data)))
                    continue
                built.append((r, over, sampling))
            built = self._check_kept(built, fail)
            t1 = time.perf_counter()
            timings["read_build"] += t1 - t0
            rows: list[Row] = []
            n_tok = 0
            for (r, over, sampling), (toks, think, err) in zip(built, self._encode([b[0] for b in built])):
                if err is None and len(toks) + sampling.max_tokens > self.max_len:
                    err = (f"prompt of {len(toks)} tokens plus max_tokens {sampling.max_tokens} exceeds the "
                           f"model's context of {self.max_len} tokens")
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
            if bars[0] is not None:
                bars[0].update(len(batch))
                bars[1].update(n_tok)
            if rows:
                yield rows
            if limit is not None and counts["input_rows"] >= limit:
                break
        else:
            self.exhausted = True
        for b in bars:
            if b is not None:
                b.close()

    def _check_kept(self, built: list, fail: Callable[[RowError], None]) -> list:
        """Rows whose kept values fit the kept columns' types (a JSON value that does not fit the
        type inferred from the first rows makes its row an error row)."""
        if not self.kept or not built:
            return built
        from batchv4.io.schema import rows_to_table

        try:
            rows_to_table([b[0].keep for b in built], self._kept_schema)
            return built
        except Exception:
            pass
        good = []
        for b in built:
            try:
                rows_to_table([b[0].keep], self._kept_schema)
                good.append(b)
            except Exception as e:
                fail(RowError(b[0].index, b[0].id, f"kept {_line(e).removeprefix('output ')}",
                              _json({"messages": b[0].messages, **b[0].keep})))
        return good

    def _encode(self, requests: list[RowRequest]) -> list[tuple[list[int] | None, bool, str | None]]:
        """(token ids, thinking, error) per request, in batches; a batch the tokenizer refuses is
        encoded row by row, so only the bad row fails."""
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple[bool, str | None], list[int]] = {}
        for i, r in enumerate(requests):
            think = bool(r.params.get("thinking", self.opts.thinking))
            effort = r.params.get("reasoning_effort")
            if effort not in _EFFORTS:
                out[i] = (None, think, f"reasoning_effort {effort!r} is not supported by V4 (use 'high' or 'max')")
                continue
            groups.setdefault((think, effort), []).append(i)
        tok = self.tokenizer
        for (think, effort), idx in groups.items():
            try:
                ids = tok.chat_token_ids([requests[i].messages for i in idx], think, effort)
            except Exception:
                ids = None
            for j, i in enumerate(idx):
                if ids is not None:
                    out[i] = (ids[j], think, None)
                    continue
                try:
                    out[i] = (tok.chat_token_ids([requests[i].messages], think, effort)[0], think, None)
                except Exception as e:
                    out[i] = (None, think, f"cannot tokenize this row: {_line(e)}")
        return out


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json(data: Any) -> str:
    import json

    try:
        return json.dumps(data, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(data)


def _bar(quiet: bool, desc: str, unit: str, total: int | None = None):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True, leave=False)


def options_of(cfg: Any) -> RowOptions:
    """The RowOptions fields of any config object that has them (RunConfig, EstimateConfig)."""
    from dataclasses import fields

    return RowOptions(**{f.name: getattr(cfg, f.name) for f in fields(RowOptions)})


