"""Compiling `StructuredOutputsParams` against the V4 tokenizer with llguidance.

JSON is generated without free whitespace (`whitespace_flexible: false`, separators `,` and `:`), so
a constrained row has a bounded length; `json_object` is the schema `{"type": "object"}`; a choice
is an alternation of literal strings; a regex or a Lark grammar is passed as it is. The llguidance
tokenizer (about 2 s to build over 129k tokens) is built once per tokenizer file and vocabulary
size; compiled grammars are cached by the params' key.

Owns: the grammar text of each kind, the tokenizer bridge, the caches, and the library's reason
when a statement cannot be compiled. Does not own: masks or matcher state (`structured.processor`).
"""

from __future__ import annotations

import functools
import re
import threading

from batchv4.structured.params import StructuredOutputsParams

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_lock = threading.Lock()


class GrammarError(ValueError):
    """The library cannot compile this statement (its reason is the message)."""


def grammar_text(p: StructuredOutputsParams) -> str:
    import llguidance as llg

    k = p.kind
    if k == "json":
        return llg.LLMatcher.grammar_from_json_schema(p.json, overrides=_JSON_OPTIONS)
    if k == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if k == "regex":
        return llg.LLMatcher.grammar_from_regex(p.regex)
    if k == "choice":
        return llg.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in p.choice))
    return llg.LLMatcher.grammar_from_lark(p.grammar)


class Compiler:
    """One tokenizer's grammars: `grammar(p)` (cached) and `matcher(p)` (a fresh matcher)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.lltok = _lltokenizer(tokenizer._tok.to_str(), vocab_size, tokenizer.eos_id)
        self._grammars: dict[str, str] = {}

    def grammar(self, p: StructuredOutputsParams) -> str:
        import llguidance as llg

        key = p.key()
        g = self._grammars.get(key)
        if g is None:
            try:
                g = grammar_text(p)
            except (ValueError, TypeError) as e:
                raise GrammarError(" ".join(str(e).split())[:500]) from None
            err = llg.LLMatcher.validate_grammar(g, self.lltok)
            if err and not err.startswith("WARNING"):
                raise GrammarError(" ".join(err.split())[:500])
            with _lock:
                self._grammars[key] = g
        return g

    def matcher(self, p: StructuredOutputsParams):
        import llguidance as llg

        m = llg.LLMatcher(self.lltok, self.grammar(p), log_level=0)
        if m.is_error():
            raise GrammarError(" ".join(m.get_error().split())[:500])
        return m


@functools.lru_cache(maxsize=4)
def _lltokenizer(tokenizer_json: str, vocab_size: int, eos_id: int):
    import llguidance as llg

    return llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)


@functools.lru_cache(maxsize=8)
def compiler_for(tokenizer, vocab_size: int) -> Compiler:
    """The compiler of a loaded tokenizer (tokenizers are cached per file, so this is per file)."""
    return Compiler(tokenizer, vocab_size)
