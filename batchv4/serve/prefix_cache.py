"""The server's snapshot policy: which prefixes of an online request's prompt get a snapshot, and
which held snapshot a request resumes from. (Batch runs use the packing plan's branch points
instead; the server cannot see the requests still to come.)

Owns: candidate positions (message boundaries found in the V4 chat tokens, plus every `unit`
tokens, thinned so that one prompt proposes at most `max_candidates`), content keys (a hash of
the token prefix, so identical prefixes of different requests share one snapshot), `plan()` (resume
from the longest ready candidate, save the candidates beyond it that are not held) and
`unblock_waiting()` (re-plan a waiting request whose snapshot went away). Saves carry `uses=0`: the
cache manager evicts such snapshots least recently used first (a restore refreshes them), which is
LRU under the memory budget. Does not own: the cache manager, scheduling, tokenization.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from batchv4.engine.scheduler import SavePlan

_PERSON = b"batchv4.prefix"


@dataclass(frozen=True)
class Candidates:
    """A prompt's candidate snapshot positions (ascending) and their content keys."""

    num_tokens: int
    positions: tuple[int, ...]
    keys: tuple[object, ...]


@dataclass(frozen=True)
class PrefixPolicy:
    """`before_ids`: a boundary sits just before these tokens (a new turn: the end of a system
    prompt or of the previous turn); `after_ids`: just after these (a turn's end, the assistant
    marker). `tail`: how many of the last message boundaries are kept when there are many (the
    first one, usually the end of the system prompt, is always kept). `min_gap`: candidates closer
    than this to a longer one are dropped (each save cuts a prefill chunk, so costs a step), except
    the first boundary, as are prefixes shorter than it; a message boundary wins over a multiple of
    `unit` nearby."""

    unit: int = 64
    max_candidates: int = 16
    before_ids: frozenset = frozenset()
    after_ids: frozenset = frozenset()
    tail: int = 3
    min_gap: int = 16

    @classmethod
    def for_tokenizer(cls, tokenizer, unit: int = 64, max_candidates: int = 16) -> PrefixPolicy:
        """Boundaries of the V4 chat layout: before `<｜User｜>`, after `<｜Assistant｜>` and EOS."""
        if unit < 0:
            raise ValueError(f"prefix unit must be >= 0, got {unit}")
        return cls(unit, max_candidates, frozenset({tokenizer.user_id}),
                   frozenset({tokenizer.assistant_id, tokenizer.eos_id}))

    def positions(self, ids: list[int], include_end: bool = True) -> list[int]:
        """Candidate snapshot positions of a prompt, ascending, each <= len(ids) (== only with
        `include_end`: a snapshot at the prompt's end keeps its last logits, so the same prompt
        again, or a conversation that continues it, samples without computing it; in thinking
        mode the next turn does not continue the prompt's final `<think>`, so the caller leaves
        the end out and the boundary after the assistant marker serves instead)."""
        n = len(ids)
        last = n if include_end else n - 1
        before, after = self.before_ids, self.after_ids
        marks = [p for p in range(1, n) if ids[p] in before or ids[p - 1] in after]
        if include_end and n:
            marks.append(n)
        marks = sorted(set(marks[:1] + marks[-self.tail:])) if marks else []
        kept: list[int] = []
        for i, p in reversed(list(enumerate(marks))):
            # of two boundaries close together the longer, except that the first one (the end of
            # a system prompt, shared by many conversations) always stays
            if p >= self.min_gap and (not kept or kept[-1] - p >= self.min_gap or i == 0):
                kept.append(p)
        room = self.max_candidates - len(kept)
        units: list[int] = []
        if self.unit > 0 and room > 0 and last > 0:
            # multiples of unit * 2^k for the smallest k that fits: the positions of a longer
            # prompt are a subset of a shorter one's at the same k, so growing conversations and
            # documents of different lengths still meet on shared keys
            step = self.unit
            while last // step > room:
                step *= 2
            units = [u for u in range(step, last + 1, step)
                     if u >= self.min_gap and all(abs(u - m) >= self.min_gap for m in kept)]
        return sorted(kept + units)

    def candidates(self, ids: list[int], include_end: bool = True) -> Candidates:
        pos = self.positions(ids, include_end)
        return Candidates(len(ids), tuple(pos), tuple(prefix_keys(ids, pos)))


def prefix_keys(ids: list[int], positions: list[int]) -> list[object]:
    """One key per position: a hash of the int32 bytes of ids[:pos] (one pass over the prompt)."""
    buf = memoryview(array("i", ids).tobytes())
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    out, prev = [], 0
    for p in positions:
        h.update(buf[4 * prev: 4 * p])
        prev = p
        out.append(("prefix", p, h.copy().hexdigest()))
    return out


def plan(cache, cands: Candidates) -> tuple[object, int, tuple[SavePlan, ...]]:
    """(resume_key, resume_pos, saves) for a request about to be queued: resume from the longest
    candidate held as a ready snapshot (one at the prompt's end only if it kept its logits), save
    the candidates beyond it that no snapshot holds or is being filled for."""
    resume_key, resume_pos = None, 0
    for pos, key in zip(reversed(cands.positions), reversed(cands.keys)):
        if cache.has(key) and (pos < cands.num_tokens or cache.snapshot_has_logits(key)):
            resume_key, resume_pos = key, cache.snapshot_pos(key)
            break
    saves = tuple(SavePlan(k, p, 0) for p, k in zip(cands.positions, cands.keys)
                  if p > resume_pos and not cache.exists(k))
    return resume_key, resume_pos, saves


def unblock_waiting(scheduler, cands_by_request: dict[str, Candidates]) -> int:
    """Re-plan the waiting requests that have not started and whose resume snapshot is not ready,
    unless a running sequence is about to save it: the scheduler keeps such a request waiting at
    the head of its queue for the snapshot, which otherwise (evicted, or to be saved only by a
    request queued behind it) might never come. Call between steps; returns how many changed."""
    cache = scheduler.cache
    coming = {s.key for seq in scheduler.running for s in seq.saves}
    changed = 0
    for seq in scheduler.waiting:
        req = seq.request
        key = req.resume_key
        if key is None or seq.num_generated or seq.num_cached or seq.forked_from is not None:
            continue
        if cache.has(key) or key in coming:
            continue
        cands = cands_by_request.get(req.request_id)
        if cands is None:
            req.resume_key, req.resume_pos = None, 0
        else:
            req.resume_key, req.resume_pos, req.saves = plan(cache, cands)
            seq.saves = sorted(req.saves, key=lambda s: s.pos)
        changed += 1
    return changed
