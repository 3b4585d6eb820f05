"""Whether an output matches what its request stated: `valid` and `parsed` for the output columns.

JSON kinds are parsed with the standard library and checked with `jsonschema` (`parsed` is the
parsed JSON written back compactly, whether or not it matches the schema); a regex must match the
whole output (Python's `re`); a choice must be one of its strings; a Lark grammar must accept the
output's tokens (llguidance). An output cut by `length` is never valid.

Owns: the checks. Does not own: constraining generation (`structured.processor`).
"""

from __future__ import annotations

import json
import re

from batchv4.structured.params import StructuredOutputsParams


def check_output(p: StructuredOutputsParams, text: str, finish_reason: str | None,
                 tokenizer=None, vocab_size: int | None = None) -> tuple[bool, str | None]:
    """(valid, parsed) of one output."""
    parsed = None
    ok = False
    k = p.kind
    if k in ("json", "json_object"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = _NOT_JSON
        if obj is not _NOT_JSON:
            parsed = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            if k == "json_object":
                ok = isinstance(obj, dict)
            else:
                import jsonschema

                try:
                    jsonschema.validate(obj, p.json)
                    ok = True
                except jsonschema.ValidationError:
                    ok = False
                except jsonschema.SchemaError:
                    ok = False
    elif k == "regex":
        try:
            ok = re.fullmatch(p.regex, text, flags=re.DOTALL) is not None
        except re.error:
            ok = False
    elif k == "choice":
        ok = text in p.choice
    elif tokenizer is not None:
        from batchv4.structured.grammars import GrammarError, compiler_for

        try:
            m = compiler_for(tokenizer, vocab_size or tokenizer.vocab_size).matcher(p)
            ok = m.consume_tokens(tokenizer.encode(text)) and m.is_accepting()
        except GrammarError:
            ok = False
    return ok and finish_reason != "length", parsed


_NOT_JSON = object()
