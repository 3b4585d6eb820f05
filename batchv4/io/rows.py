"""From input rows to requests: which column holds the prompt, ids, templates, OpenAI bodies.

Owns: `RowSpec` (how a row becomes a request), `check_columns` (fail before any work when an
option names a missing column), `build_request` (one `RawRow` -> `RowRequest` or `RowError`, never
an exception), the `{column}` template filler, the OpenAI body parameters, and the content hash
used by resume. Does not own: reading files, the chat encoding (only `normalize_messages` is
borrowed from `batchv4.tokenizer`), or duplicate ids (the run's `RunState` tracks those).
Templates are filled by plain substitution: never `str.format`, Jinja or eval on user data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from batchv4.errors import UserError
from batchv4.io.readers import RawRow
from batchv4.tokenizer import normalize_messages

_OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|\{|\}")


@dataclass(frozen=True)
class RowSpec:
    prompt_column: str | None = None  # a string column: the user message
    messages_column: str | None = None  # a list of {role, content} objects
    template: str | None = None  # "Summarize: {text}" filled from the row's columns
    system: str | None = None  # a system message put before every conversation
    id_column: str | None = None  # else custom_id (OpenAI batch) else the row index
    keep_columns: tuple[str, ...] = ()  # input columns copied to the output
    openai_batch: bool = False  # rows are OpenAI batch lines ({custom_id, body})
    # no prompt source was named: each row uses its `messages` when it has them, else its `prompt`
    per_row: bool = False


@dataclass(frozen=True)
class RowRequest:
    index: int
    id: str
    messages: list[dict[str, str]]
    params: dict[str, Any]  # sampling overrides from an OpenAI body (max_tokens, temperature, ...)
    keep: dict[str, Any]
    # the content hash when already known (a record read back); else computed on first use, since
    # only resume needs it and hashing is a fifth of building a row (`estimate` never asks)
    known_hash: str | None = field(default=None, repr=False, compare=False)

    @property
    def content_hash(self) -> str:
        """sha256 of canonical JSON of messages + params."""
        if self.known_hash is None:
            object.__setattr__(self, "known_hash", content_hash(self.messages, self.params))
        return self.known_hash  # type: ignore[return-value]


@dataclass(frozen=True)
class RowError:
    index: int
    id: str | None
    error: str  # one line
    raw: str | None

    def to_record(self) -> dict[str, Any]:
        """The row of the error parts (see `batchv4.io.schema.ERROR_SCHEMA`); lone surrogates
        (from JSON escapes such as "\\ud800") are written as escapes, since Parquet text is UTF-8."""
        return {"id": _printable(self.id), "row_index": self.index, "error": _printable(self.error),
                "raw": _printable(self.raw)}

    def key(self) -> str:
        """What identifies this error row across runs: its row number, reason and raw text (so an
        edited row's old error row is recognised as stale)."""
        return error_key(self.index, _printable(self.error), _printable(self.raw))


def error_key(index: int, error: str | None, raw: str | None) -> str:
    canon = json.dumps([index, error, raw], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("ascii")).hexdigest()[:32]


def _printable(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- templates -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def parse_template(template: str) -> tuple[str | tuple[str], ...]:
    """Literal strings and `(column,)` placeholders; `{{` and `}}` are literal braces."""
    pieces: list[str | tuple[str]] = []
    pos = 0
    for m in _TEMPLATE_TOKEN.finditer(template):
        if m.start() > pos:
            pieces.append(template[pos : m.start()])
        tok = m.group(0)
        if tok == "{{":
            pieces.append("{")
        elif tok == "}}":
            pieces.append("}")
        elif tok in ("{", "}"):
            raise UserError(f"template: unmatched {tok!r} at position {m.start()} (write {tok}{tok} for a literal brace)")
        else:
            name = m.group(1)
            if not name.strip():
                raise UserError(f"template: empty placeholder at position {m.start()}")
            pieces.append((name,))
        pos = m.end()
    if pos < len(template):
        pieces.append(template[pos:])
    return tuple(pieces)


def template_columns(template: str) -> list[str]:
    return list(dict.fromkeys(p[0] for p in parse_template(template) if isinstance(p, tuple)))


def fill_template(pieces: Iterable[str | tuple[str]], data: Mapping[str, Any]) -> str:
    """Raises ValueError naming the first column the row lacks or holds null."""
    out = []
    for p in pieces:
        if isinstance(p, str):
            out.append(p)
            continue
        name = p[0]
        if name not in data:
            raise UserError(f"template column {name!r} is missing from this row")
        value = data[name]
        if value is None:
            raise UserError(f"template column {name!r} is null")
        out.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))
    return "".join(out)


# -- column checks -------------------------------------------------------------------------------
def check_columns(spec: RowSpec, columns: Iterable[str], fmt: str | None = None) -> RowSpec:
    """Validate `spec` against the input's columns before any work starts; return it resolved.

    With no prompt source given, an OpenAI batch input uses its bodies, else a `messages` column,
    else a `prompt` column. Raises ValueError (one line, listing the available columns).
    """
    cols = list(columns)
    available = ", ".join(cols) if cols else "(none)"
    sources = [s for s in (spec.prompt_column, spec.messages_column, spec.template) if s is not None]
    if len(sources) > 1:
        raise UserError("give only one of --prompt-column, --messages-column and --template")
    if fmt == "openai" or spec.openai_batch:
        if sources:
            raise UserError("--prompt-column/--messages-column/--template do not apply to OpenAI batch input")
        spec = replace(spec, openai_batch=True)
    elif not sources:
        # each row uses what it has; the recorded column is the one the input's schema leads with
        if "messages" in cols:
            spec = replace(spec, messages_column="messages", per_row="prompt" in cols)
        elif "prompt" in cols:
            spec = replace(spec, prompt_column="prompt", per_row="messages" in cols)
        elif not cols and fmt != "parquet":
            # no row of the sample could be read at all: each row becomes an error row (or, past
            # the sample, uses what it has), rather than the job failing on a column check
            spec = replace(spec, prompt_column="prompt", per_row=True)
        else:
            raise UserError(
                f"no prompt column: pass --prompt-column, --messages-column or --template; available columns: {available}"
            )
    named = [] if spec.per_row else [("--prompt-column", spec.prompt_column), ("--messages-column", spec.messages_column)]
    named.append(("--id-column", spec.id_column))
    named += [("--keep-column", c) for c in spec.keep_columns]
    if spec.template is not None:
        named += [("--template", c) for c in template_columns(spec.template)]
    for option, col in named:
        if col is not None and col not in cols:
            raise UserError(f"column {col!r} (from {option}) is not in the input; available columns: {available}")
    return spec


# -- OpenAI body parameters ----------------------------------------------------------------------
def openai_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """A row's overrides from an OpenAI chat-completions body: the sampling parameters (through
    the one parser of request bodies, `batchv4.engine.sampling_params.openai_overrides`), plus
    V4's `thinking` ({"type": "enabled" | "disabled"}, DeepSeek's API form) and
    `reasoning_effort`."""
    from batchv4.engine.sampling_params import openai_overrides

    try:
        params = openai_overrides(body)
    except ValueError as e:
        raise UserError(f"body.{_reason(e)}") from None
    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise UserError(f"body.reasoning_effort: expected a string, got {effort!r}")
        params["reasoning_effort"] = effort
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, Mapping) else None
        if kind not in ("enabled", "disabled"):
            raise UserError("body.thinking: expected {\"type\": \"enabled\"} or {\"type\": \"disabled\"}")
        params["thinking"] = kind == "enabled"
    extra = {k: body[k] for k in PASS_THROUGH if body.get(k) is not None}
    if extra:
        params["extra_body"] = extra
    return params


# OpenAI body keys a remote backend passes through as they are (the local engine refuses tools)
# (response_format is read into the row's sampling parameters as structured outputs)
PASS_THROUGH = ("tools", "tool_choice", "parallel_tool_calls")

# keys of `RowRequest.params` that are not sampling parameters
ROW_ONLY_PARAMS = ("thinking", "reasoning_effort", "extra_body")


# -- rows ----------------------------------------------------------------------------------------
def content_hash(messages: list[dict[str, str]], params: Mapping[str, Any]) -> str:
    """Raises UnicodeEncodeError when a string holds a lone surrogate (see `_is_text`)."""
    canon = json.dumps({"messages": messages, "params": dict(params)}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _row_id(spec: RowSpec, data: Mapping[str, Any], index: int) -> str:
    if spec.id_column is not None:
        if spec.id_column not in data or data[spec.id_column] is None:
            raise UserError(f"id column {spec.id_column!r} is missing or null")
        value = data[spec.id_column]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise UserError(f"id column {spec.id_column!r}: expected a string or integer, got {type(value).__name__}")
    elif spec.openai_batch:
        value = data.get("custom_id")
        if not isinstance(value, str):
            raise UserError("custom_id: expected a string")
    else:
        return str(index)
    text = str(value)
    if not text:
        raise UserError("empty id")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"id {_printable(text)!r} holds a lone surrogate ({_surrogate(text, e)}), which is not "
                        "valid Unicode text") from None
    return text


def _surrogate(text: str, e: UnicodeEncodeError) -> str:
    return f"U+{ord(text[e.start]):04X} at character {e.start}"


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _messages(spec: RowSpec, data: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any], bool]:
    """The row's messages, its OpenAI body's parameters, and whether the messages are normalized
    already (made here from a prompt string: `normalize_messages` would return them as they are)."""
    if spec.openai_batch:
        endpoint = data.get("url")
        if endpoint is not None and endpoint not in _OPENAI_ENDPOINTS:
            raise UserError(f"url: unsupported endpoint {endpoint!r} (expected {' or '.join(_OPENAI_ENDPOINTS)})")
        body = data.get("body")
        if not isinstance(body, Mapping):
            raise UserError("body: expected an object")
        params = openai_params(body)
        if "messages" in body:
            return body["messages"], params, False
        if "prompt" in body:
            return _user(_prompt_text(body["prompt"], "body.prompt")), params, True
        raise UserError("body: has neither messages nor prompt")
    if spec.per_row:
        if data.get("messages") is not None:
            return data["messages"], {}, False
        if data.get("prompt") is not None:
            return _user(_prompt_text(data["prompt"], "prompt column 'prompt'")), {}, True
        raise UserError("row has neither 'messages' nor 'prompt' (or name the column: --prompt-column, "
                        "--messages-column, --template)")
    if spec.messages_column is not None:
        if data.get(spec.messages_column) is None:
            raise UserError(f"messages column {spec.messages_column!r} is missing or null")
        return data[spec.messages_column], {}, False
    if spec.template is not None:
        text = fill_template(parse_template(spec.template), data)
        return _user(_prompt_text(text, "template")), {}, True
    col = spec.prompt_column
    if col is None:
        raise UserError("no prompt source; call check_columns first")
    if col not in data or data[col] is None:
        raise UserError(f"prompt column {col!r} is missing or null")
    return _user(_prompt_text(data[col], f"prompt column {col!r}")), {}, True


def _prompt_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{what}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{what}: empty prompt")
    return value


def build_request(row: RawRow, spec: RowSpec) -> RowRequest | RowError:
    """One input row as a request, or an error row with a one-line reason; never an exception."""
    try:
        return _build(row, spec)
    except Exception as e:  # whatever goes wrong with one row makes it an error row, not a failed job
        return RowError(row.index, None, f"cannot build a request from this row ({type(e).__name__}: {_reason(e)})",
                        row.raw if row.raw is not None else dump_row(row.data or {}))


def _build(row: RawRow, spec: RowSpec) -> RowRequest | RowError:
    if row.error is not None or row.data is None:
        return RowError(row.index, None, row.error or "unreadable row", row.raw)
    data = row.data
    try:
        row_id = _row_id(spec, data, row.index)
    except ValueError as e:
        return RowError(row.index, None, _reason(e), row.raw if row.raw is not None else dump_row(data))
    try:
        raw_messages, params, normalized = _messages(spec, data)
        # skipping normalize_messages where it would change nothing saves a fifth of building a row
        messages = raw_messages if normalized else normalize_messages(raw_messages)
        if spec.system is not None:
            messages = [{"role": "system", "content": spec.system}, *messages]
    except ValueError as e:
        return RowError(row.index, row_id, _reason(e), row.raw if row.raw is not None else dump_row(data))
    if not _messages_are_text(messages) or (params and not _is_text(params)):
        return RowError(row.index, row_id, "the prompt holds a lone surrogate (a JSON escape such as \\ud800 "
                        "without its pair), which is not valid Unicode text",
                        row.raw if row.raw is not None else dump_row(data))
    keep = {c: data.get(c) for c in spec.keep_columns}
    return RowRequest(row.index, row_id, messages, params, keep)


def _is_text(value: Any) -> bool:
    """Whether every string in `value` (normalized messages, or params: JSON values) encodes as
    UTF-8, i.e. whether `content_hash` can hash it: its canonical JSON (ensure_ascii=False) keeps
    strings as they are, so it fails exactly when one holds a lone surrogate. Checked when the row
    is built, so such a row is an error row whether or not its hash is ever computed."""
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False
    if isinstance(value, dict):
        return all(_is_text(k) and _is_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(map(_is_text, value))
    return True


def _messages_are_text(messages: list[dict[str, str]]) -> bool:
    """`_is_text(messages)`, fast for the usual all-ASCII messages."""
    for m in messages:
        for k, v in m.items():
            if type(v) is not str or not v.isascii() or type(k) is not str or not k.isascii():
                return _is_text(messages)
    return True


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def dump_row(data: Mapping[str, Any]) -> str:
    """A row as JSON text for an error row's `raw` (repr when it cannot be dumped)."""
    try:
        return json.dumps(data, ensure_ascii=False, default=str)
    except (TypeError, ValueError):      # e.g. a circular structure; the reason row still names the row
        return repr(data)
