"""The engine's per-step hook for structured outputs and thinking budgets: a logits processor (the
runner applies it to the rows it samples) and a token observer (the scheduler's `update()` tells it
every appended token), over one llguidance matcher per sample.

- A constrained sample's row gets the grammar's token mask: disallowed tokens are -inf. When the
  grammar is complete the mask allows only EOS, so the row ends with finish reason `stop` and its
  text holds only the matched output.
- In thinking mode the constraint starts after `</think>`; with `max_thinking_tokens`, the row is
  forced to `</think>` once that many tokens were generated without one (with or without a
  grammar).
- Masks for a step are filled in a thread started when the runner begins the step (`prepare`),
  beside the model's forward (llguidance releases the GIL); `__call__` waits for them.
- Matchers change only through the observer: `on_token` consumes the appended token (the
  scheduler's update is the only caller), `on_finish` drops the matcher. A preempted sequence keeps
  its tokens (it is recomputed), so its matcher stays as it is; a sample forked for n > 1 gets a
  fresh matcher that consumes its first token; restoring a prompt snapshot involves no generated
  token, so no matcher.

Owns: matcher state per (request id, sample index), masks, forcing `</think>`. Does not own:
compiling (`structured.grammars`), sampling (the engine's sampler), or stops (the detokenizer).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from batchv4.structured.grammars import compiler_for


class _State:
    __slots__ = ("matcher", "thinking", "think_done", "generated")

    def __init__(self, matcher, thinking: bool) -> None:
        self.matcher, self.thinking, self.think_done, self.generated = matcher, thinking, not thinking, 0


class StructuredProcessor:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.think_end_id = tokenizer.think_end_id
        self.eos_id = tokenizer.eos_id
        self._states: dict[tuple[str, int], _State] = {}
        self._masks: dict[tuple[str, int], torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self.mask_seconds = 0.0
        self._neg_inf = torch.tensor(float("-inf"))

    # ---- helpers --------------------------------------------------------------------------------
    @staticmethod
    def applies(params, thinking: bool) -> bool:
        return params.structured_outputs is not None or (thinking and params.max_thinking_tokens is not None)

    def _state(self, request, sample_index: int) -> _State:
        key = (request.request_id, sample_index)
        st = self._states.get(key)
        if st is None:
            p = request.params.structured_outputs
            m = compiler_for(self.tokenizer, self.vocab_size).matcher(p) if p is not None else None
            st = self._states[key] = _State(m, bool(request.thinking))
        return st

    # ---- the runner's side ----------------------------------------------------------------------
    def prepare(self, plan) -> None:
        """Start filling the masks of the constrained samples this step will draw."""
        todo = []
        for e in [*(c for c in plan.chunks if c.sample), *plan.ready]:
            seq = e.seq
            req = seq.request
            if not self.applies(req.params, req.thinking):
                continue
            for k in range(e.num_samples):
                index = seq.sample_index if e.num_samples == 1 else k
                st = self._state(req, index)
                if st.matcher is not None and st.think_done:
                    todo.append(((req.request_id, index), st.matcher))
        self._masks = {}
        if todo:
            self._thread = threading.Thread(target=self._fill, args=(todo,), daemon=True)
            self._thread.start()

    def _fill(self, todo) -> None:
        import time

        t0 = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        out = {}
        for key, m in todo:
            buf = torch.empty(words, dtype=torch.int32)
            m.unsafe_compute_mask_ptr(buf.data_ptr(), words * 4)
            out[key] = buf
        self._masks = out
        self.mask_seconds += time.perf_counter() - t0

    def __call__(self, rows: list, logits: torch.Tensor) -> torch.Tensor:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        masked, forced = [], []
        for i, r in enumerate(rows):
            st = self._states.get((r.request_id, r.sample_index))
            if st is None:
                continue
            if not st.think_done:
                budget = r.params.max_thinking_tokens
                if budget is not None and r.step >= budget:
                    forced.append(i)
                continue
            bits = self._masks.get((r.request_id, r.sample_index))
            if bits is not None:
                masked.append((i, bits))
        if not (masked or forced):
            return logits
        # never in place: the step's logits rows may also be kept for a snapshot (restores sample them)
        V = logits.shape[1]
        allowed = None
        if masked:
            words = torch.stack([b for _, b in masked]).numpy().view(np.uint8)        # [M, 4W] bytes
            bits = np.unpackbits(words, axis=1, bitorder="little")[:, :V]             # [M, V], 1 = allowed
            allowed = torch.from_numpy(bits).view(torch.bool)                          # no copy
        if not forced and len(masked) == len(rows):          # every row constrained: one pass
            return torch.where(allowed, logits, self._neg_inf)
        out = logits.clone()
        for i in forced:
            out[i] = float("-inf")
            out[i, self.think_end_id] = 0.0
        if masked:
            idx = torch.tensor([i for i, _ in masked])
            out[idx] = torch.where(allowed, logits[idx], self._neg_inf)
        return out

    # ---- the scheduler's side (TokenObserver) ---------------------------------------------------
    def on_token(self, seq: Any, token_id: int) -> None:
        req = seq.request
        if not self.applies(req.params, req.thinking):
            return
        st = self._state(req, seq.sample_index)
        st.generated += 1
        if not st.think_done:
            if token_id == self.think_end_id:
                st.think_done = True
            return
        if st.matcher is not None and not st.matcher.is_stopped():
            st.matcher.consume_token(token_id)

    def on_reset(self, seq: Any) -> None:
        pass          # a preempted sequence keeps its tokens: the matcher stays where it is

    def on_finish(self, seq: Any) -> None:
        self._states.pop((seq.request.request_id, seq.sample_index), None)

    def clear(self) -> None:
        self._states.clear()
        self._masks = {}
