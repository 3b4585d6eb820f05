"""`StructuredOutputsParams`: what a request's output must match, in vLLM's vocabulary (exactly one of
`json` (a JSON schema), `json_object` (any JSON object), `regex`, `choice` (a list of strings), or
`grammar` (a Lark grammar, llguidance's dialect)); and reading it from an OpenAI `response_format`.

Owns: validation of the request's statement of structure, its canonical key (compiled grammars are
cached by it), and its JSON-friendly dict form (it travels inside `SamplingParams` through the
run's on-disk state). Does not own: compiling (`structured.grammars`), masks (`structured.processor`)
or checking outputs (`structured.check`). Plain Python.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchv4.errors import UserError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: Any = None                  # a JSON schema: a dict, or its JSON text
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        js = self.json
        if isinstance(js, str):
            try:
                js = json.loads(js)
            except ValueError as e:
                raise UserError(f"structured outputs: the JSON schema is not JSON: {e}") from None
            object.__setattr__(self, "json", js)
        if js is not None and not isinstance(js, (dict, bool)):
            raise UserError(f"structured outputs: a JSON schema is an object, got {type(js).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise UserError("structured outputs: choice is a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise UserError(f"structured outputs: {name} must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise UserError("structured outputs: json_object must be true or false")
        set_ = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(set_) != 1:
            raise UserError(f"structured outputs: give exactly one of {', '.join(KINDS)} (got {set_ or 'none'})")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def is_json(self) -> bool:
        return self.kind in ("json", "json_object")

    def to_dict(self) -> dict[str, Any]:
        k = self.kind
        v = getattr(self, k)
        return {k: list(v) if k == "choice" else v}

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def of(cls, v: Any) -> StructuredOutputsParams | None:
        """None, an instance, or its dict form."""
        if v is None or isinstance(v, cls):
            return v
        if isinstance(v, Mapping):
            unknown = sorted(set(v) - set(KINDS))
            if unknown:
                raise UserError(f"structured outputs: unknown key {unknown[0]!r}; one of {', '.join(KINDS)}")
            return cls(**dict(v))
        raise UserError(f"structured_outputs must be an object, got {type(v).__name__}")


def from_response_format(rf: Any) -> StructuredOutputsParams | None:
    """OpenAI's `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}`, or
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`."""
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise UserError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise UserError("response_format.json_schema needs a 'schema'")
        return StructuredOutputsParams(json=spec["schema"])
    raise UserError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def to_response_format(p: StructuredOutputsParams) -> dict | None:
    """The OpenAI `response_format` of a JSON constraint (None for the other kinds)."""
    if p.kind == "json_object":
        return {"type": "json_object"}
    if p.kind == "json":
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": p.json, "strict": True}}
    return None
