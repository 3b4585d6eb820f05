"""Incremental detokenization and stop checking for one sample.

Owns: turning a sample's generated ids into text as they arrive, and deciding when the sample
stops: a stop token (EOS unless `ignore_eos`, or one of `stop_token_ids`), a stop string (which may
span several tokens), or `max_tokens`.
Does not own: the tokenizer itself (tokenizer.py), splitting reasoning from the answer, sampling,
or the model's context limit (the scheduler).

Decoding uses the prefix-offset method (vLLM, TGI): each step decodes a short window of ids read
from a point where the text was complete, so the cost per token is constant, and tokenizers that
drop a leading space on their first token get the context they need (`prompt_tail`: the last few
prompt ids). When a byte-level token ends inside a UTF-8 character, the text before that character
is emitted at once (it is final under byte-level decoding) and the character waits for the token
that completes it; bytes still incomplete when the sample finishes are dropped, never shown as
U+FFFD. So a stop string is seen on the very token that completes it.

Rules, as in vLLM: a stop token stays in `token_ids` but its text is left out unless
`include_stop_str_in_output`; a stop string cuts the text before it (after it with
`include_stop_str_in_output`) while `token_ids` keep every generated id; a stop (token or string)
on the `max_tokens`-th token is reported as "stop", not "length"; among stop strings completed by
the same token the one that ends first wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from batchv4.engine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class StopDecision:
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None  # the stop string or stop token id; None for EOS and length


class IncrementalDetokenizer:
    """Text and stop state of one sample; feed it each generated id with `append`."""

    def __init__(
        self,
        tokenizer: Decoder,
        params: SamplingParams,
        eos_id: int,
        prompt_tail: Sequence[int] | None = None,
    ) -> None:
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("tokenizer must have a decode(ids, skip_special_tokens) method")
        if isinstance(eos_id, bool) or not isinstance(eos_id, int):
            raise ValueError(f"eos_id must be an integer, got {eos_id!r}")
        self._tok = tokenizer
        self._params = params
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.add(eos_id)
        self._eos_id = eos_id
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._ids: list[int] = []
        # Ids being decoded: prompt context followed by the generated ids that have text.
        self._window_ids: list[int] = list(prompt_tail or [])
        self._prefix_offset = 0  # the decode window starts here
        self._read_offset = len(self._window_ids)  # text of ids before this has been emitted
        self._partial = 0  # characters emitted from ids at or after _read_offset
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._length = 0
        # The last (longest stop string - 1) emitted characters: a stop string may start there.
        self._tail = ""
        self.decision: StopDecision | None = None

    @property
    def text(self) -> str:
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
        return self._text_cache

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def finished(self) -> bool:
        return self.decision is not None

    def append(self, token_id: int) -> StopDecision | None:
        """Add one generated id; return the decision if the sample is now finished."""
        if self.decision is not None:
            raise RuntimeError("append() after the sample finished")
        self._ids.append(token_id)
        is_stop_token = token_id in self._stop_ids
        new_text = ""
        if not is_stop_token or self._params.include_stop_str_in_output:
            self._window_ids.append(token_id)
            new_text = self._decode_step()
        at_length = len(self._ids) >= self._params.max_tokens
        if is_stop_token or at_length:
            new_text += self._flush()
        window = self._tail + new_text
        self._emit(new_text)
        if new_text and self._params.stop:
            matched = self._match_stop_string(window, len(new_text))
            if matched is not None:
                self.decision = StopDecision("stop", matched)
                return self.decision
        if is_stop_token:
            reason = None if token_id == self._eos_id and not self._params.ignore_eos else token_id
            self.decision = StopDecision("stop", reason)
        elif at_length:
            self.decision = StopDecision("length", None)
        return self.decision

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._params.skip_special_tokens)

    def _decode_step(self) -> str:
        start = len(self._decode(self._window_ids[self._prefix_offset : self._read_offset])) + self._partial
        full_text = self._decode(self._window_ids[self._prefix_offset :])
        if full_text.endswith(_REPLACEMENT):
            # The last token ends inside a UTF-8 character. With byte-level decoding the text
            # before the trailing replacement characters is final: emit it, hold the rest.
            stable = full_text.rstrip(_REPLACEMENT)[start:]
            self._partial += len(stable)
            return stable
        if len(full_text) < start:
            return ""  # decoding with more ids shortened the text: wait for a stable point
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window_ids)
        self._partial = 0
        return full_text[start:]

    def _flush(self) -> str:
        """Text of the ids not yet emitted, without a trailing incomplete character."""
        if self._read_offset == len(self._window_ids):
            return ""
        start = len(self._decode(self._window_ids[self._prefix_offset : self._read_offset])) + self._partial
        full_text = self._decode(self._window_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._window_ids)
        self._partial = 0
        return full_text[start:].rstrip(_REPLACEMENT)

    def _emit(self, text: str) -> None:
        if not text:
            return
        self._chunks.append(text)
        self._length += len(text)
        self._text_cache = None
        if self._max_stop_len > 1:
            self._tail = (self._tail + text)[-(self._max_stop_len - 1) :]

    def _match_stop_string(self, window: str, num_new: int) -> str | None:
        """Find the earliest-completing stop string that ends in the last `num_new` characters of
        `window` (the end of the text); cut the text there and return the stop string."""
        base = self._length - len(window)
        best: tuple[int, int, str] | None = None
        for s in self._params.stop:
            pos = window.find(s, max(0, len(window) - num_new - len(s) + 1))
            if pos >= 0 and (best is None or (pos + len(s), pos) < best[:2]):
                best = (pos + len(s), pos, s)  # earliest end, then earliest start
        if best is None:
            return None
        end, start, s = best
        text = self.text[: base + (end if self._params.include_stop_str_in_output else start)]
        self._chunks = [text]
        self._length = len(text)
        self._text_cache = text
        return s
