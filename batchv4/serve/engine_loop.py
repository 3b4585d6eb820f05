"""The server's engine thread: one `LLM`, built and then driven by one background thread that
steps it (schedule -> execute -> update) while there is work and sleeps when there is none.

Owns: the thread, its inbox (adds, aborts; thread-safe, drained before each step), the count of
requests in flight (the queue limit), per-step text deltas for streamed requests (from a
`TokenObserver`: the samples that got tokens this step), delivering results through each job's
`sink` callback (the HTTP side turns that into `loop.call_soon_threadsafe`), and a published
snapshot of the engine's counters. Every scheduler and cache access happens on this thread. Does
not own: HTTP or the OpenAI formats (`app`, `protocol`), the snapshot policy (`prefix_cache`),
the engine itself.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from batchv4.serve.prefix_cache import Candidates, PrefixPolicy, plan, unblock_waiting
from batchv4.tokenizer import THINK_END

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests in flight than the server's limit."""


class NotReady(Exception):
    """The engine is still loading (or failed to load)."""


@dataclass
class Job:
    """One engine request from the HTTP side. `sink(event)` is called on the engine thread with:
    ("delta", sample_index, text, finish_reason, new_tokens) for streamed jobs, where text is the
    sample's text so far that will not change any more (a possible stop string's start is held
    back) and new_tokens the (token id, logprobs) generated since the last delta; then ("done",
    RequestOutput) or ("error", message)."""

    request_id: str
    prompt_token_ids: list[int]
    params: object                       # SamplingParams
    thinking: bool
    candidates: Candidates | None
    stream: bool
    sink: Callable[[tuple], None]


@dataclass
class _Live:
    job: Job
    sent: dict[int, int] = field(default_factory=dict)      # sample index -> tokens already delivered
    shown: dict[int, int] = field(default_factory=dict)     # sample index -> characters delivered


class _Dirty:
    """TokenObserver: the sequences that got a token or finished during this step."""

    def __init__(self) -> None:
        self.seqs: dict[int, object] = {}

    def on_token(self, seq, token_id: int) -> None:
        self.seqs[seq.seq_id] = seq

    def on_reset(self, seq) -> None:      # preempted: its tokens (and text) stay
        pass

    def on_finish(self, seq) -> None:
        self.seqs[seq.seq_id] = seq


class EngineLoop:
    def __init__(self, build: Callable[[], object], prefix_unit: int = 64, max_queue: int = 1024,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._build = build
        self.prefix_unit = prefix_unit
        self.max_queue = max_queue
        self._on_failure = on_failure
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._inflight = 0
        self._closing = False
        self._stats: dict = {"running": 0, "waiting": 0}
        self._engine_stats: dict = {}
        self.llm = None
        self.policy: PrefixPolicy | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="batchv4-engine", daemon=True)
        # engine thread only
        self._live: dict[str, _Live] = {}
        self._cands: dict[str, Candidates] = {}
        self._dirty = _Dirty()
        self._totals = {"requests_finished": 0, "requests_aborted": 0, "requests_failed": 0}

    # ---- any thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        return "ready" if self.ready.is_set() else "loading"

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none): raises NotReady or QueueFull."""
        with self._cv:
            if not self.ready.is_set() or self._closing:
                raise NotReady()
            if self._inflight + len(jobs) > self.max_queue:
                raise QueueFull()
            self._inflight += len(jobs)
            self._inbox.extend(("add", j) for j in jobs)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def stats(self) -> dict:
        """The counters the engine thread published after its last step (or drain)."""
        with self._cv:
            return dict(self._stats, requests=self._inflight)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            llm = self._build()
            self.policy = PrefixPolicy.for_tokenizer(llm.tokenizer, self.prefix_unit)
            llm.scheduler.observers.append(self._dirty)
            self.llm = llm
        except BaseException as e:  # noqa: BLE001 - reported through the server, which exits
            from batchv4.errors import UserError

            self.error = e
            if not isinstance(e, (UserError, OSError)):      # a bug: its traceback (the caller says the rest)
                log.error("the engine failed to start: %s", e, exc_info=True)
            if self._on_failure is not None:
                self._on_failure(e)
            return
        self._publish()
        self.ready.set()
        log.info("engine ready")
        sch = llm.scheduler
        while True:
            with self._cv:
                while not self._inbox and not self._closing and not sch.has_work():
                    self._cv.wait()
                if self._closing:
                    break
                items, self._inbox = self._inbox, []
            for kind, x in items:
                if kind == "add":
                    self._add(x)
                else:
                    self._abort(x)
            if sch.has_work():
                unblock_waiting(sch, self._cands)
                try:
                    outs = llm.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails what was in flight, not the server
                    log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                    # the step's plan was never applied: start again from an empty cache
                    sch.abort_all()
                    llm.runner.kept_logits.clear()
                    self._dirty.seqs = {}
                    self._publish()
                    continue
                self._deliver(outs)
            self._publish()
        self._fail_all("the server is shutting down")

    def _add(self, job: Job) -> None:
        from batchv4.engine.scheduler import EngineRequest

        llm = self.llm
        req = EngineRequest(job.request_id, job.prompt_token_ids, job.params, thinking=job.thinking)
        err = llm.check_request(req)            # the same checks as LLM.generate_stream's
        if err:
            self._end(job, ("error", err))
            return
        if job.candidates is not None:
            req.resume_key, req.resume_pos, req.saves = plan(llm.cache, job.candidates)
            self._cands[job.request_id] = job.candidates
        self._live[job.request_id] = _Live(job)
        llm.scheduler.add_request(req)

    def _abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return                                # finished already (its result is on its way)
        self._cands.pop(request_id, None)
        self.llm.scheduler.abort(request_id)
        self._totals["requests_aborted"] += 1
        self._release(1)
        self._dirty.seqs = {k: s for k, s in self._dirty.seqs.items() if s.request.request_id != request_id}

    def _deliver(self, outs: list) -> None:
        dirty, self._dirty.seqs = self._dirty.seqs, {}
        for seq in dirty.values():
            live = self._live.get(seq.request.request_id)
            if live is None or not live.job.stream:
                continue
            self._delta(live, seq)
        for out in outs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if out.failed:
                msg = next(o.error for o in out.outputs if o.error)
                self._totals["requests_failed"] += 1
                self._end(live.job, ("error", msg))
            else:
                self._totals["requests_finished"] += 1
                self._end(live.job, ("done", out))

    def _delta(self, live: _Live, seq) -> None:
        i = seq.sample_index
        text = seq.detok.text if seq.detok is not None else ""
        finished = seq.status == "finished"
        if not finished:
            # hold back what a stop string completed later would cut, and a `</think>` not whole yet
            hold = max((len(s) for s in seq.request.params.stop), default=1) - 1
            if live.job.thinking and THINK_END not in text:
                hold = max(hold, next((k for k in range(len(THINK_END) - 1, 0, -1)
                                       if text.endswith(THINK_END[:k])), 0))
            if hold > 0:
                text = text[: max(live.shown.get(i, 0), len(text) - hold)]
        generated = seq.tokens[seq.num_prompt:]
        start = live.sent.get(i, 0)
        new = generated[start:]
        lps = seq.out_logprobs[start:] if seq.request.params.logprobs is not None else [None] * len(new)
        if not new and len(text) == live.shown.get(i, 0) and not finished:
            return
        live.sent[i] = len(generated)
        live.shown[i] = len(text)
        self._send(live.job, ("delta", i, text, seq.finish_reason if finished else None, list(zip(new, lps))))

    def _end(self, job: Job, event: tuple) -> None:
        """A job's last event (each job ends exactly once: here, or aborted by its client)."""
        self._live.pop(job.request_id, None)
        self._cands.pop(job.request_id, None)
        self._release(1)
        self._send(job, event)

    def _fail_all(self, msg: str) -> None:
        for rid, live in list(self._live.items()):
            self.llm.scheduler.abort(rid)
            self._end(live.job, ("error", msg))

    def _release(self, n: int) -> None:
        with self._cv:
            self._inflight -= n

    def _send(self, job: Job, event: tuple) -> None:
        try:
            job.sink(event)
        except Exception as e:  # noqa: BLE001 - a client's event loop gone must not stop the engine
            log.debug("could not deliver to %s: %s", job.request_id, e)

    def _publish(self) -> None:
        llm = self.llm
        sch, cache = llm.scheduler, llm.cache
        st = {
            "running": len(sch.running),
            "waiting": len(sch.waiting),
            "seqs_held": len(cache.seqs),
            "seq_pages": sum(len(ids) for sc in cache.seqs.values() for ids in sc.pages.values()),
            "pages_in_use": sum(p.num_used for p in cache.pages.values()),
            "slots_in_use": cache.slots.num_used,
            "snapshots_held": len(cache.snapshots),
        }
        with self._cv:
            self._stats = st
            self._engine_stats = dict(llm.stats(), **self._totals)

    def engine_stats(self) -> dict:
        """`LLM.stats()` and the server's request totals, as of the last step."""
        with self._cv:
            return dict(self._engine_stats, **self._stats, requests=self._inflight)
