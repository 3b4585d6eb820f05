"""SamplingParams: how one request is sampled and when it stops (vLLM's names and defaults).

Owns: the parameter set, its validation (one-line `ValueError`s naming the parameter), mapping an
OpenAI chat-completions body onto it, and a JSON-friendly `to_dict()`.
Does not own: applying the parameters (sampler.py, detokenizer.py), the chat template
(tokenizer.py), or reading request files (io/). Never imports torch.

Differences from vLLM worth knowing: the object is immutable (`replace()` returns a validated
copy), `stop` and `stop_token_ids` are stored as tuples, and `top_k=-1` is normalized to `0`.
A temperature below 1e-5 means greedy decoding, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchv4.errors import UserError

# vLLM's _SAMPLING_EPS: temperatures below it are treated as greedy.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


def _int(label: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{label} must be an integer, got {value!r}")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise UserError(f"{label} must be in [{minimum}, {maximum}], got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{label} must be >= {minimum}, got {value!r}")
    return value


def _float(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{label} must be finite, got {value!r}")
    return float(value)


def _bool(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{label} must be true or false, got {value!r}")
    return value


def _check_n(label: str, v: Any) -> int:
    return _int(label, v, minimum=1)


def _check_max_tokens(label: str, v: Any) -> int:
    return _int(label, v, minimum=1)


def _check_temperature(label: str, v: Any) -> float:
    t = _float(label, v)
    if t < 0:
        raise UserError(f"{label} must be >= 0, got {v!r}")
    return t


def _check_top_p(label: str, v: Any) -> float:
    p = _float(label, v)
    if not 0 < p <= 1:
        raise UserError(f"{label} must be in (0, 1], got {v!r}")
    return p


def _check_top_k(label: str, v: Any) -> int:
    k = _int(label, v)
    if k < -1:
        raise UserError(f"{label} must be 0 or -1 (off) or >= 1, got {v!r}")
    return max(k, 0)


def _check_min_p(label: str, v: Any) -> float:
    p = _float(label, v)
    if not 0 <= p <= 1:
        raise UserError(f"{label} must be in [0, 1], got {v!r}")
    return p


def _check_additive_penalty(label: str, v: Any) -> float:
    p = _float(label, v)
    if not -2 <= p <= 2:
        raise UserError(f"{label} must be in [-2, 2], got {v!r}")
    return p


def _check_repetition_penalty(label: str, v: Any) -> float:
    p = _float(label, v)
    if p <= 0:
        raise UserError(f"{label} must be > 0, got {v!r}")
    return p


def _check_stop(label: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = (v,) if isinstance(v, str) else v
    if not isinstance(items, Sequence):
        raise UserError(f"{label} must be a string or a list of strings, got {type(v).__name__}")
    for s in items:
        if not isinstance(s, str):
            raise UserError(f"{label} must contain only strings, got {s!r}")
        if not s:
            raise UserError(f"{label} must not contain an empty string")
    return tuple(items)


def _check_stop_token_ids(label: str, v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise UserError(f"{label} must be a list of token ids, got {type(v).__name__}")
    return tuple(_int(f"{label}[{i}]", t, minimum=0) for i, t in enumerate(v))


def _check_logprobs(label: str, v: Any) -> int | None:
    return None if v is None else _int(label, v, minimum=0, maximum=MAX_LOGPROBS)


def _check_seed(label: str, v: Any) -> int | None:
    return None if v is None else _int(label, v)


def _check_structured(label: str, v: Any):
    from batchv4.structured.params import StructuredOutputsParams

    return StructuredOutputsParams.of(v)


def _check_thinking_budget(label: str, v: Any) -> int | None:
    return None if v is None else _int(label, v, minimum=0)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "n": _check_n,
    "max_tokens": _check_max_tokens,
    "temperature": _check_temperature,
    "top_p": _check_top_p,
    "top_k": _check_top_k,
    "min_p": _check_min_p,
    "presence_penalty": _check_additive_penalty,
    "frequency_penalty": _check_additive_penalty,
    "repetition_penalty": _check_repetition_penalty,
    "stop": _check_stop,
    "stop_token_ids": _check_stop_token_ids,
    "ignore_eos": _bool,
    "include_stop_str_in_output": _bool,
    "logprobs": _check_logprobs,
    "seed": _check_seed,
    "skip_special_tokens": _bool,
    "structured_outputs": _check_structured,
    "max_thinking_tokens": _check_thinking_budget,
}

# OpenAI chat body key -> parameter. The first group is OpenAI's; the second is the extra sampling
# keys vLLM's OpenAI server accepts. `max_completion_tokens`, `logprobs` and `top_logprobs` are
# handled separately.
_OPENAI_KEYS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "skip_special_tokens": "skip_special_tokens",
    "thinking_token_budget": "max_thinking_tokens",
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters; invalid values raise `ValueError`.

    `logprobs=k` returns, for each generated token, the k most likely tokens plus the sampled one,
    with logprobs of the model's raw distribution (vLLM's default). `seed` makes the request's
    samples reproducible on their own; without it the engine's seed is used, and the result is
    still independent of what else is in the batch.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    seed: int | None = None
    skip_special_tokens: bool = True
    # the output must match this (a JSON schema, a regex, a choice, a grammar): batchv4.structured
    structured_outputs: Any = None
    # thinking mode: `</think>` is forced once this many tokens were generated without one
    max_thinking_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with `changes` applied."""
        unknown = sorted(set(changes) - set(_CHECKS))
        if unknown:
            raise UserError(f"unknown sampling parameter {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        if self.structured_outputs is not None:
            d["structured_outputs"] = self.structured_outputs.to_dict()
        return d

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> SamplingParams:
        """Parameters from an OpenAI chat-completions request body, with OpenAI's defaults
        (temperature 1, top_p 1, n 1) for what the body leaves out; see `openai_overrides`."""
        return cls(**openai_overrides(body))


def openai_overrides(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters an OpenAI chat-completions request body sets, validated, as
    `SamplingParams` field names: the one parser of request bodies (the run's OpenAI batch rows and
    the server both use it).

    Reads `max_completion_tokens` (preferred) or `max_tokens`, `temperature`, `top_p`, `n`,
    `stop`, `seed`, `presence_penalty`, `frequency_penalty`, `logprobs` + `top_logprobs`, and
    vLLM's extra keys (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`,
    `include_stop_str_in_output`, `skip_special_tokens`). Other keys (messages, model, ...) are
    ignored; a null value means the key is absent. Errors name the body's key. Values are
    JSON-friendly (lists, not tuples), so the dict can be hashed and stored as JSON.
    """
    if not isinstance(body, Mapping):
        raise UserError(f"request body must be an object, got {type(body).__name__}")
    out: dict[str, Any] = {}
    for key, name in _OPENAI_KEYS.items():
        if body.get(key) is not None:
            out[name] = _CHECKS[name](key, body[key])
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = _check_max_tokens("max_completion_tokens", body["max_completion_tokens"])
    logprobs = _openai_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    if logprobs is not None:
        out["logprobs"] = logprobs
    structured = _openai_structured(body)
    if structured is not None:
        out["structured_outputs"] = structured.to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _openai_structured(body: Mapping[str, Any]):
    """OpenAI's `response_format`, or vLLM's `structured_outputs` (and its older `guided_json`,
    `guided_regex`, `guided_choice`, `guided_grammar`) extra keys."""
    from batchv4.structured.params import StructuredOutputsParams, from_response_format

    found = []
    rf = from_response_format(body.get("response_format"))
    if rf is not None:
        found.append(rf)
    if body.get("structured_outputs") is not None:
        found.append(StructuredOutputsParams.of(body["structured_outputs"]))
    for key, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if body.get(key) is not None:
            found.append(StructuredOutputsParams(**{kind: body[key]}))
    if len(found) > 1:
        raise UserError("give one of response_format, structured_outputs and guided_*")
    return found[0] if found else None


def _openai_logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    # Chat API: `logprobs` is a boolean and `top_logprobs` the count. An integer `logprobs` is the
    # legacy completions API's count, accepted as such.
    if logprobs is None or logprobs is False:
        if top_logprobs is not None:
            raise UserError("top_logprobs requires logprobs to be true")
        return None
    if logprobs is True:
        return _check_logprobs("top_logprobs", 0 if top_logprobs is None else top_logprobs)
    if isinstance(logprobs, int):
        if top_logprobs is not None:
            raise UserError("top_logprobs requires logprobs to be true, not a number")
        return _check_logprobs("logprobs", logprobs)
    raise UserError(f"logprobs must be true or false, got {logprobs!r}")
