"""The token-budget scheduler: each step hands out one budget shared by chunked prefill and decode
of many sequences, admits waiting requests in the plan's order, restores their prefix from a
snapshot, cuts prefill chunks at the plan's save points, and preempts by recompute when pages run
short.

Owns: sequence states and the step plan. Does not own: page/slot ids (CacheManager), tensors or the
model (ModelRunner), sampling (Sampler).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchv4.engine.cache_manager import CacheManager, NoSpace


@dataclass(frozen=True)
class SavePlan:
    key: object
    pos: int
    uses: int


@dataclass
class EngineRequest:
    """One prompt, already tokenized and (optionally) planned."""

    request_id: str
    prompt_token_ids: list[int]
    params: object                              # SamplingParams
    resume_key: object = None                   # snapshot to resume from
    resume_pos: int = 0
    saves: tuple[SavePlan, ...] = ()
    thinking: bool = False
    group: int | None = None                    # the plan's prefix group (cost amortization)

    @classmethod
    def from_plan(cls, planned, params, thinking: bool = False, namespace: object = None) -> EngineRequest:
        """A `batchv4.packing.PlannedRequest` as an engine request. Its snapshots are keyed
        `(namespace, snap_id)`: one namespace per plan keeps two plans' snapshot ids apart."""
        return cls(str(planned.key), list(planned.token_ids), params,
                   resume_key=None if planned.resume_snap is None else (namespace, planned.resume_snap),
                   resume_pos=planned.resume_pos,
                   saves=tuple(SavePlan((namespace, s.snap_id), s.pos, s.uses) for s in planned.saves),
                   thinking=thinking, group=planned.group)


@dataclass
class Sequence:
    seq_id: int
    request: EngineRequest
    sample_index: int
    tokens: list[int]
    num_prompt: int
    num_computed: int = 0
    num_cached: int = 0                         # prompt tokens served from a snapshot
    status: str = "waiting"                     # waiting | running | finished
    saves: list[SavePlan] = field(default_factory=list)
    out_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: object = None
    detok: object = None
    forked_from: int | None = None              # n > 1: samples share the prompt of sample 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    num_tokens: int
    needs_logits: bool
    save: SavePlan | None = None


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk]
    restores: list[tuple[int, int]]
    page_copies: list[tuple[int, int, int]]
    saves: list[tuple[int, int]]
    errors: list[tuple[Sequence, str]]
    ready: list[tuple[Sequence, object]] = field(default_factory=list)   # (seq, saved logits [V])


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.cache = cache
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.cached_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.saves = sorted(seq.request.saves, key=lambda s: s.pos)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan([], [], [], [], [])
        budget = self.budget
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != "running":
                continue
            n = self._chunk_len(seq, budget)
            if not self._reserve(seq, n, plan):
                continue
            self._add_chunk(plan, seq, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, plan):
                break
            self.waiting.popleft()
            if seq.status == "finished":
                continue
            self.running.append(seq)
            n = self._chunk_len(seq, budget)
            if n == 0:
                continue
            if not self._reserve(seq, n, plan, admitting=True):
                break  # no pages even after preempting: it waits (at the head) for a later step
            self._add_chunk(plan, seq, n)
            budget -= n
        return plan

    def _add_chunk(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        ch = self._chunk(seq, n)
        plan.chunks.append(ch)
        if ch.save is not None:
            # registered now (not ready until the step runs) so that requests resuming from it wait
            try:
                plan.saves.append(self.cache.save(seq.seq_id, ch.save.key, ch.save.pos, ch.save.uses))
            except NoSpace:
                pass  # no room for the snapshot: later branches recompute (a cache miss)
        if ch.start < seq.num_prompt:
            self.prefill_tokens += ch.num_tokens
        else:
            self.decode_tokens += ch.num_tokens

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        remaining = len(seq.tokens) - seq.num_computed
        n = min(remaining, budget)
        for s in seq.saves:
            if s.pos > seq.num_computed:
                n = min(n, s.pos - seq.num_computed)
                break
        return n

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        end = seq.num_computed + n
        save = next((s for s in seq.saves if s.pos == end), None)
        if save is not None:
            seq.saves.remove(save)
        needs = end == len(seq.tokens) or save is not None
        ch = ScheduledChunk(seq, seq.num_computed, n, needs, save)
        seq.num_computed = end
        return ch

    def _reserve(self, seq: Sequence, n: int, plan: StepPlan, admitting: bool = False) -> bool:
        """Pages for seq's next n tokens, preempting the most recently admitted others if needed."""
        while True:
            try:
                # keep the snapshots the plan still needs while others can make room
                self.cache.ensure(seq.seq_id, seq.num_computed + n, evict_needed=False)
                return True
            except NoSpace:
                victim = next((s for s in reversed(self.running) if s is not seq
                               and all(s is not c.seq for c in plan.chunks)), None)
                if victim is not None:
                    self._preempt(victim)
                    continue
                if admitting and len(self.running) > 1:
                    self._preempt(seq)      # back to the head of the queue; needed snapshots stay
                    return False
                try:
                    self.cache.ensure(seq.seq_id, seq.num_computed + n, evict_needed=True)
                    return True
                except NoSpace:
                    self._preempt(seq)
                    return False

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its cache, keep its tokens."""
        self.cache.free_seq(seq.seq_id)
        self.running.remove(seq)
        key = seq.request.resume_key
        if seq.num_cached and key in self.cache.snapshots:
            self.cache.snapshots[key].uses_left += 1   # it will restore from it again
        seq.status = "waiting"
        seq.num_computed = 0
        seq.num_cached = 0          # re-admission may restore from the snapshot again
        seq.saves = [s for s in sorted(seq.request.saves, key=lambda s: s.pos) if not self.cache.has(s.key)]
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _admit(self, seq: Sequence, plan: StepPlan) -> bool:
        req = seq.request
        if seq.num_generated == 0 and seq.forked_from is None:
            err = self._validate(seq)
            if err:
                seq.status = "finished"
                plan.errors.append((seq, err))
                return True
        if req.resume_key is not None and seq.num_generated == 0 and seq.num_cached == 0 \
                and not self.cache.has(req.resume_key) and self._expected(req.resume_key):
            return False  # the request that saves this prefix has not got there yet: keep plan order
        # admit only what can run to the end without preempting others (no preemption storms);
        # with nothing running, admit anyway: snapshots get evicted as needed
        shared = self.cache.snapshots[req.resume_key].pos if self.cache.has(req.resume_key) else 0
        if self.running and not self.cache.can_admit(self._final_len(seq), shared, self._promised()):
            return False
        try:
            if req.resume_key is not None and self.cache.has(req.resume_key) and seq.num_generated == 0 \
                    and seq.num_cached == 0:
                src, dst, copies = self.cache.restore(req.resume_key, seq.seq_id, evict_needed=not self.running)
                snap = self.cache.snapshots[req.resume_key]
                plan.restores.append((src, dst))
                plan.page_copies.extend(copies)
                seq.num_computed = snap.pos
                seq.num_cached = snap.pos
                self.cached_tokens += snap.pos
                if snap.pos >= len(seq.tokens):
                    if snap.logits is not None:
                        plan.ready.append((seq, snap.logits))   # sample from the saved logits
                    else:
                        # no logits kept: a miss, computed from scratch
                        plan.restores.pop()
                        self.cache.free_seq(seq.seq_id)
                        self.cache.new_seq(seq.seq_id)
                        self.cached_tokens -= snap.pos
                        seq.num_computed = seq.num_cached = 0
            else:
                self.cache.new_seq(seq.seq_id, evict_needed=not self.running)
        except NoSpace:
            return False
        seq.status = "running"
        return True

    @staticmethod
    def _final_len(seq: Sequence) -> int:
        return seq.num_prompt + seq.request.params.max_tokens

    def _promised(self) -> dict[int, int]:
        """Pages running sequences will still need to reach their final length."""
        out = {}
        for r in self.cache.ratios:
            out[r] = sum(max(0, self.cache.pages_needed(r, self._final_len(s)) - len(self.cache.seqs[s.seq_id].pages[r]))
                         for s in self.running if s.seq_id in self.cache.seqs)
        return out

    def _expected(self, key: object) -> bool:
        if key in self.cache.snapshots:
            return True
        return any(s.key == key for seq in (*self.running, *self.waiting) for s in seq.saves)

    def _validate(self, seq: Sequence) -> str | None:
        toks, p = seq.tokens, seq.request.params
        if not toks:
            return "empty prompt"
        if len(toks) + p.max_tokens > self.max_model_len:
            return (f"prompt of {len(toks)} tokens plus max_tokens {p.max_tokens} exceeds the model's "
                    f"context of {self.max_model_len} tokens")
        if not self.cache.fits_alone(len(toks) + p.max_tokens):
            return (f"prompt of {len(toks)} tokens plus max_tokens {p.max_tokens} does not fit in the "
                    f"KV-cache budget even alone")
        return None

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.seq_id in self.cache.seqs:
            self.cache.free_seq(seq.seq_id)
        seq.status = "finished"
