"""The token-budget scheduler: each step hands out one budget shared by chunked prefill and decode
of many sequences, admits waiting requests in the plan's order, restores their prefix from a
snapshot, cuts prefill chunks at the plan's save points, and preempts by recompute when pages run
short; after the step, `update()` applies what the runner computed.

Owns: sequence and request states, `schedule()` (a plain `StepPlan`) and `update()` (the only place
that appends tokens, checks stops, forks the samples of n > 1, marks snapshots ready and frees).
It reaches the cache manager only through its verbs. Does not own: page/slot ids (CacheManager),
tensors or the model (ModelRunner), sampling (Sampler), output assembly (`outputs`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

from batchv4.engine.cache_manager import CacheManager, NoSpace
from batchv4.engine.step import ReadySample, ScheduledChunk, StepPlan, StepResult, TokenObserver


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
    # what a backend that takes text rather than token ids needs (the remote API backend): the
    # row's chat messages and any OpenAI body fields it passes through (tools, response_format, ...)
    messages: list | None = None
    extra_body: dict | None = None

    @classmethod
    def from_plan(cls, planned, params, thinking: bool = False, namespace: object = None,
                  messages: list | None = None, extra_body: dict | None = None) -> EngineRequest:
        """A `batchv4.packing.PlannedRequest` as an engine request. Its snapshots are keyed
        `(namespace, snap_id)`: one namespace per plan keeps two plans' snapshot ids apart."""
        return cls(str(planned.key), list(planned.token_ids), params,
                   resume_key=None if planned.resume_snap is None else (namespace, planned.resume_snap),
                   resume_pos=planned.resume_pos,
                   saves=tuple(SavePlan((namespace, s.snap_id), s.pos, s.uses) for s in planned.saves),
                   thinking=thinking, group=planned.group, messages=messages, extra_body=extra_body)


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
    engine_seconds: float = 0.0                 # its share of the forward time of the steps it was in

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass
class FinishedRequest:
    """A request whose samples have all finished (or that failed: `error`)."""

    request: EngineRequest
    seqs: list[Sequence]          # in sample order
    error: str | None = None


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, make_detok: Callable[[object], object] | None = None,
                 observers: Seq[TokenObserver] = ()) -> None:
        self.cache = cache
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.make_detok = make_detok          # SamplingParams -> a stop checker with .append(token)
        self.observers = list(observers)      # per-step hook: told of every token, reset and finish
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, list[Sequence]] = {}   # request id -> its samples' sequences
        self._next_seq = 0
        self._fork_copies: list[tuple] = []   # pool copies of forks made in update(), before the next forward
        self.preemptions = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.cached_tokens = 0

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> Sequence:
        """Queue a request (sample 0; the other samples fork when its prompt is done)."""
        seq = self._new_seq(req, 0)
        self.requests[req.request_id] = [seq]
        self.add(seq)
        return seq

    def _new_seq(self, req: EngineRequest, sample_index: int) -> Sequence:
        self._next_seq += 1
        seq = Sequence(self._next_seq, req, sample_index, list(req.prompt_token_ids), len(req.prompt_token_ids))
        if self.make_detok is not None:
            seq.detok = self.make_detok(req.params)
        return seq

    def add(self, seq: Sequence) -> None:
        seq.saves = sorted(seq.request.saves, key=lambda s: s.pos)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._fork_copies)

    def abort_all(self) -> None:
        """Drop every request (a consumer stopped early): sequences, pages and snapshots freed."""
        for seq in [*self.running, *self.waiting]:
            seq.status = "finished"
            for o in self.observers:
                o.on_finish(seq)
        self.running.clear()
        self.waiting.clear()
        self.requests.clear()
        self._fork_copies.clear()
        self.cache.clear()

    def abort(self, request_id: str) -> bool:
        """Drop one request (its client went away), between steps: its waiting and running
        sequences are finished and freed, the pool copies of forks of it not made yet are dropped,
        and a restore it still had planned no longer keeps its snapshot needed. Snapshots it saved
        stay (others may resume from them). False if the request is not known (finished or never
        added)."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return False
        first = group[0]
        req = first.request
        if req.resume_key is not None and first.status == "waiting" and first.num_cached == 0 \
                and first.num_generated == 0 and self.cache.exists(req.resume_key):
            self.cache.drop_use(req.resume_key)   # the plan counted this restore; it will never come
        # forks made in the last update(): their copies target the forks' own slot and new pages
        targets = set()
        for seq in group:
            if seq.forked_from is not None and seq.seq_id in self.cache.seqs:
                slot, pages = self.cache.view(seq.seq_id)
                targets.add(("slot", slot))
                targets.update(("page", r, p) for r, ids in pages.items() for p in ids)
        if targets:
            self._fork_copies = [c for c in self._fork_copies
                                 if (("slot", c[2]) if c[0] == "slot" else ("page", c[1], c[3])) not in targets]
        for seq in group:
            if seq.status == "finished":
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq)
        return True

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        plan.copies_before.extend(self._fork_copies)      # first: they read slots freed since
        self._fork_copies = []
        budget = self.budget
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != "running":
                continue
            n = self._chunk_len(seq, budget)
            if n == 0 or not self._reserve(seq, n, plan):
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
        plan.dropped = self.cache.drain_dropped()
        return plan

    def _add_chunk(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        ch = self._chunk(seq, n)
        ch.slot, ch.pages = self.cache.view(seq.seq_id)
        plan.chunks.append(ch)
        if ch.save_key is not None:
            # registered now (not ready until the step runs) so that requests resuming from it wait
            save = next(s for s in seq.request.saves if s.key == ch.save_key)
            try:
                src, dst = self.cache.save(seq.seq_id, save.key, save.pos, save.uses)
                plan.copies_after.append(("slot", src, dst))
                plan.keep_logits.append(save.key)
            except NoSpace:
                ch.save_key = None  # no room for the snapshot: later branches recompute (a cache miss)
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
        sample = end == len(seq.tokens)
        ch = ScheduledChunk(seq, seq.num_computed, n, sample or save is not None, sample,
                            None if save is None else save.key, self._samples_at(seq) if sample else 1)
        seq.num_computed = end
        return ch

    @staticmethod
    def _samples_at(seq: Sequence) -> int:
        """Tokens to sample where `seq`'s prompt ends: all n samples' first tokens for sample 0 of a
        request with n > 1 (the others fork from it in update()), else one."""
        n = seq.request.params.n
        return n if n > 1 and seq.sample_index == 0 and seq.num_generated == 0 else 1

    def _reserve(self, seq: Sequence, n: int, plan: StepPlan, admitting: bool = False) -> bool:
        """Pages for seq's next n tokens, preempting the most recently admitted others if needed."""
        while True:
            try:
                # keep the snapshots the plan still needs while others can make room
                self.cache.ensure(seq.seq_id, seq.num_computed + n, evict_needed=False)
                return True
            except NoSpace:
                victim = next((s for s in reversed(self.running) if s is not seq
                               and all(s is not c.seq for c in plan.chunks)
                               and all(s is not r.seq for r in plan.ready)), None)
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
        if seq.num_cached:
            self.cache.give_back_use(seq.request.resume_key)   # it will restore from it again
        seq.status = "waiting"
        seq.num_computed = 0
        seq.num_cached = 0          # re-admission may restore from the snapshot again
        seq.saves = [s for s in sorted(seq.request.saves, key=lambda s: s.pos) if not self.cache.has(s.key)]
        self.waiting.appendleft(seq)
        self.preemptions += 1
        for o in self.observers:
            o.on_reset(seq)

    def _admit(self, seq: Sequence, plan: StepPlan) -> bool:
        req = seq.request
        if seq.num_generated == 0 and seq.forked_from is None:
            err = self._validate(seq)
            if err:
                seq.status = "finished"
                plan.errors.append((seq, err))
                return True
        fresh = seq.num_generated == 0 and seq.num_cached == 0
        if req.resume_key is not None and fresh and not self.cache.has(req.resume_key) \
                and self._expected(req.resume_key):
            return False  # the request that saves this prefix has not got there yet: keep plan order
        # admit only what can run to the end without preempting others (no preemption storms);
        # with nothing running, admit anyway: snapshots get evicted as needed
        shared = self.cache.snapshot_pos(req.resume_key) or 0
        if self.running and not self.cache.can_admit(self._final_len(seq), shared, self._promised()):
            return False
        try:
            if req.resume_key is not None and self.cache.has(req.resume_key) and fresh:
                self._restore(seq, plan)
            else:
                self.cache.new_seq(seq.seq_id, evict_needed=not self.running)
        except NoSpace:
            return False
        seq.status = "running"
        return True

    def _restore(self, seq: Sequence, plan: StepPlan) -> None:
        key = seq.request.resume_key
        pos = self.cache.snapshot_pos(key)
        if pos >= len(seq.tokens) and not self.cache.snapshot_has_logits(key):
            self.cache.new_seq(seq.seq_id, evict_needed=not self.running)   # no logits kept: a miss
            return
        src, dst, copies = self.cache.restore(key, seq.seq_id, evict_needed=not self.running)
        plan.copies_before.append(("slot", src, dst))
        plan.copies_before.extend(("page", r, a, b) for r, a, b in copies)
        seq.num_computed = seq.num_cached = pos
        self.cached_tokens += pos
        if pos >= len(seq.tokens):
            plan.ready.append(ReadySample(seq, key, self._samples_at(seq)))   # sample from the kept logits

    @staticmethod
    def _final_len(seq: Sequence) -> int:
        return seq.num_prompt + seq.request.params.max_tokens

    def _promised(self) -> dict[int, int]:
        """Pages running sequences will still need to reach their final length."""
        return {r: sum(max(0, self.cache.pages_needed(r, self._final_len(s)) - self.cache.pages_held(s.seq_id, r))
                       for s in self.running)
                for r in self.cache.ratios}

    def _expected(self, key: object) -> bool:
        if self.cache.exists(key):
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

    # ---- after the step ---------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[FinishedRequest]:
        """Apply what the runner computed: snapshots filled, tokens appended (stops checked), the
        samples of n > 1 forked, failed requests ended, finished sequences freed. Returns the
        requests that are now complete."""
        for key, has_logits in result.saved.items():
            self.cache.mark_ready(key, has_logits)
        total = sum(c.num_tokens for c in plan.chunks)
        for c in plan.chunks:       # a step's forward time, shared by its sequences' token counts
            c.seq.engine_seconds += result.forward_seconds * c.num_tokens / total
        done: list[FinishedRequest] = []
        for seq, msg in plan.errors:
            self._fail(seq.request, msg, done)
        touched: list[Sequence] = []
        for seq in [c.seq for c in plan.chunks] + [r.seq for r in plan.ready]:
            rid = seq.request.request_id
            if seq.seq_id in result.errors:
                self._fail(seq.request, result.errors[seq.seq_id], done)
                continue
            for tok in result.sampled.get(seq.seq_id, ()):
                if rid not in self.requests:
                    break
                if tok.sample_index == seq.sample_index:
                    self._append(seq, tok)
                    touched.append(seq)
                else:
                    child = self._fork(seq, tok)
                    if child is not None:
                        touched.append(child)
        for seq in touched:
            if seq.finish_reason is not None and seq.status != "finished":
                self.finish(seq)
                group = self.requests.get(seq.request.request_id)
                if group is not None and len(group) == seq.request.params.n \
                        and all(x.status == "finished" for x in group):
                    del self.requests[seq.request.request_id]
                    done.append(FinishedRequest(seq.request, sorted(group, key=lambda q: q.sample_index)))
        return done

    def _append(self, seq: Sequence, tok) -> None:
        seq.tokens.append(tok.token_id)
        if seq.request.params.logprobs is not None:
            seq.out_logprobs.append(tok.top_logprobs)
        for o in self.observers:
            o.on_token(seq, tok.token_id)
        stop = seq.detok.append(tok.token_id) if seq.detok is not None else None
        if stop is not None:
            seq.finish_reason, seq.stop_reason = stop.finish_reason, stop.stop_reason
        elif seq.num_generated >= seq.request.params.max_tokens:
            seq.finish_reason = "length"

    def _fork(self, parent: Sequence, tok) -> Sequence | None:
        """Sample `tok.sample_index` of parent's request: it shares the prompt's cache (copies made
        before the next forward) and starts from its first token; with no room to share, it
        recomputes its prompt (and samples its own first token) later."""
        req = parent.request
        child = self._new_seq(req, tok.sample_index)
        child.forked_from = parent.seq_id
        self.requests[req.request_id].append(child)
        try:
            src, dst, copies = self.cache.fork(parent.seq_id, child.seq_id, parent.num_prompt)
        except NoSpace:
            self.add(child)
            return None
        self._fork_copies.append(("slot", src, dst))
        self._fork_copies.extend(("page", r, a, b) for r, a, b in copies)
        child.num_computed = parent.num_prompt
        child.num_cached = parent.num_cached
        child.status = "running"
        self.running.append(child)
        self._append(child, tok)
        return child

    def _fail(self, req: EngineRequest, msg: str, done: list[FinishedRequest]) -> None:
        group = self.requests.pop(req.request_id, None)
        if group is None:
            return
        for seq in group:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq)
        done.append(FinishedRequest(req, group, msg))

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free_seq_if_held(seq.seq_id)
        seq.status = "finished"
        for o in self.observers:
            o.on_finish(seq)
