"""The engine replicas of `--executor ray`: `ReplicaWorker` (one engine; a Ray actor, plain Python
so it runs without Ray in tests too) and the driver's `ReplicaPool` (one thread per replica takes
its chunks from a bounded queue, streams the replica's events, lists each committed part under one
lock, and sends a chunk again without its listed rows when Ray restarts a replica that died).

Owns: a replica's plan-generate-price-write loop and its part names, the pool's dispatch, retry
and progress. Does not own: routing or the job (`pipelines.ray_executor`), rows (`frontend`),
parts and manifest (`batchv4.io.writers`), generation (`batchv4.engine`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from batchv4.errors import UserError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4            # tries of one chunk (the first and three after replica failures)


@dataclass
class WorkItem:
    """One planned row, with all a replica needs to run, price and write it."""

    key: str
    token_ids: list
    req: Any                # RowRequest
    sampling: Any           # SamplingParams
    thinking: bool
    group: int              # the driver's plan group (the `_group` a local run amortizes by)
    api_hit: int            # the driver's whole-plan API hit prediction
    resume: int = 0         # tokens the plan restores from an earlier row of its group
    work: int = 0           # tokens the plan prefills for it, plus what it may generate


class ReplicaWorker:
    """One engine replica (a Ray actor; plain Python, so it runs without Ray in tests too)."""

    def __init__(self, cfg, replica: int, job: str, kept, llm_factory: Callable | None = None) -> None:
        from batchv4.accounting.cards import get_card, load_price_file
        from batchv4.pipelines.run import _default_llm

        self.cfg, self.replica, self.job, self.kept = cfg, replica, job, kept
        self.private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
        self.card = get_card(cfg.price, self.private)
        self.llm = (llm_factory or _default_llm)(cfg)
        self._tokenizer = None

    @property
    def tokenizer(self):            # what `_check_rows` reads (a Frontend's attribute locally)
        if self._tokenizer is None:
            from batchv4.pipelines.frontend import model_tokenizer

            self._tokenizer = model_tokenizer(self.cfg.tokenizer or self.cfg.model)
        return self._tokenizer

    def pid(self) -> int:
        return os.getpid()

    def run(self, chunk: int, attempt: int, items: list[WorkItem]):
        """Plan, generate and write `items` (whole plan groups); yields one event per committed
        part (`{"kind", "entry", "keys", "progress"}`) and, last, `{"kind": "stats", ...}`."""
        from batchv4.engine.scheduler import EngineRequest
        from batchv4.io.writers import PartWriter
        from batchv4.packing import PackConfig, PackInput, plan
        from batchv4.pipelines.run import _check_rows, _engine_error, _extra_body, _now
        from batchv4.pipelines.run_output import NO_STATS, amortize, output_rows

        cfg = self.cfg
        writer = PartWriter(cfg.output, kept=self.kept, storage_options=cfg.storage_options or None,
                            part_prefix=f"r{self.replica}-{self.job}-c{chunk:05d}-a{attempt}-", list_parts=False)
        by_key = {it.key: it for it in items}
        ns = (self.job, self.replica, chunk, attempt)     # this call's snapshot ids, apart from others'
        api_unit = PackConfig().api_unit

        def requests():
            for pr in plan(PackInput(it.key, it.token_ids) for it in items):
                it = by_key[pr.key]
                yield EngineRequest.from_plan(pr, it.sampling, it.thinking, namespace=ns,
                                              messages=it.req.messages, extra_body=_extra_body(it.req.params))

        before = {**NO_STATS, **self.llm.stats()}
        bufs = {"parts": ([], [], set()), "error_parts": ([], [], set())}     # rows, keys, groups
        progress = _zero_progress()

        def commit(kind: str):
            rows, keys, groups = bufs[kind]
            if kind == "parts":
                writer.write_part(amortize(rows))
            else:
                writer.write_errors(rows)
            entry = {**writer.manifest[kind][-1], "replica": self.replica, "groups": sorted(groups)}
            event = {"kind": kind, "entry": entry, "keys": list(keys), "progress": dict(progress)}
            bufs[kind] = ([], [], set())
            progress.update(_zero_progress())
            return event

        for out in self.llm.generate_stream(requests()):
            it = by_key[out.request_id]
            first = out.outputs[0]
            if first.finish_reason == "error":
                kind, rows = "error_parts", [_engine_error(it.req, first.error)]
            else:
                kind = "parts"
                rows = output_rows(it.req, it.group, out, self.card, self.llm, _now(), progress, it.api_hit,
                                   api_unit, self.private)
                if it.sampling.structured_outputs is not None:
                    _check_rows(rows, it.sampling.structured_outputs, self)
            buf = bufs[kind]
            buf[0].extend(rows)
            buf[1].append(it.key)
            buf[2].add(it.group)
            if len(buf[0]) >= cfg.part_rows:
                yield commit(kind)
        for kind in ("parts", "error_parts"):
            if bufs[kind][0]:
                yield commit(kind)
        after = {**NO_STATS, **self.llm.stats()}
        yield {"kind": "stats", "stats": {k: after[k] - before[k] if k != "peak_snapshots" else after[k]
                                          for k in NO_STATS}}


def _zero_progress() -> dict:
    return {"rows": 0, "prompt_tokens": 0, "prompt_cache_hit_tokens": 0, "completion_tokens": 0}


class _Stats:
    """The replicas' engine counters summed (what `summary` reads through `stats()`)."""

    def __init__(self) -> None:
        from batchv4.pipelines.run_output import NO_STATS

        self.totals = dict(NO_STATS)
        self.by_replica: dict[int, dict] = {}

    def add(self, replica: int, st: dict) -> None:
        mine = self.by_replica.setdefault(replica, {})
        for k, v in st.items():
            if k == "peak_snapshots":
                self.totals[k] = max(self.totals[k], v)
                mine[k] = max(mine.get(k, 0), v)
            else:
                self.totals[k] += v
                mine[k] = mine.get(k, 0) + v

    def stats(self) -> dict:
        return dict(self.totals)


class ReplicaPool:
    """The replicas, one driver thread each: a thread takes its replica's chunks from a bounded
    queue, streams the replica's events and lists each committed part (under one lock)."""

    def __init__(self, ray, cfg, kept, writer, counts, pbar, on_event, llm_factory, job: str) -> None:
        self.ray, self.writer, self.counts, self.pbar, self.on_event = ray, writer, counts, pbar, on_event
        self.stats = _Stats()
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.progress = _zero_progress()
        self.t0 = time.perf_counter()
        n = cfg.replicas
        wcfg, gpus = cfg, _replica_gpus(ray, cfg)
        if cfg.gpus_per_replica > 1:        # a replica is a rank group of G GPUs (G ranks on CPU)
            wcfg = replace(cfg, data_parallel_size=int(cfg.gpus_per_replica))
        actor = ray.remote(ReplicaWorker).options(num_cpus=cfg.cpus_per_replica, num_gpus=gpus,
                                                  max_restarts=MAX_ATTEMPTS, max_task_retries=0)
        self.actors = [actor.remote(wcfg, r, job, kept, llm_factory) for r in range(n)]
        self.queues = [queue.Queue(maxsize=2) for _ in range(n)]
        self.threads = [threading.Thread(target=self._serve, args=(r,), name=f"batchv4-replica-{r}", daemon=True)
                        for r in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, r: int, items: list[WorkItem]) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queues[r].put(items, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        for q in self.queues:
            while True:
                if self.error is not None:
                    break
                try:
                    q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue
        for t in self.threads:
            while t.is_alive() and self.error is None:
                t.join(0.2)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:       # already gone
                pass

    def _serve(self, r: int) -> None:
        chunk = 0
        while self.error is None:
            try:
                items = self.queues[r].get(timeout=0.2)
            except queue.Empty:
                continue
            if items is None:
                return
            try:
                self._run_chunk(r, chunk, items)
            except BaseException as e:      # re-raised in the driver's main thread
                if self.error is None:
                    self.error = e
                return
            chunk += 1

    def _run_chunk(self, r: int, chunk: int, items: list[WorkItem]) -> None:
        ray = self.ray
        dead = tuple(getattr(ray.exceptions, n) for n in ("RayActorError", "ActorUnavailableError")
                     if hasattr(ray.exceptions, n))
        done: set[str] = set()
        last: BaseException | None = None
        for attempt in range(MAX_ATTEMPTS):
            left = [it for it in items if it.key not in done]
            if not left:
                return
            if attempt:
                with self.lock:
                    self.counts["replica_retries"] = self.counts.get("replica_retries", 0) + 1
                    self.counts["retried_rows"] = self.counts.get("retried_rows", 0) + len(left)
                log.warning("replica %d failed (%s); chunk %d sent again: %d row(s)", r, last, chunk, len(left))
            try:
                for ref in self.actors[r].run.options(num_returns="streaming").remote(chunk, attempt, left):
                    self._commit(r, ray.get(ref), done)
                return
            except dead as e:
                last = e
                self._wait_alive(r)
        raise UserError(f"replica {r} failed {MAX_ATTEMPTS} times on one chunk; last: {str(last).splitlines()[0]}")

    def _wait_alive(self, r: int, timeout: float = 300.0) -> None:
        """Until Ray has restarted replica `r` (or given up on it: the next try then fails)."""
        ray = self.ray
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end and self.error is None:
            try:
                ray.get(self.actors[r].pid.remote(), timeout=30)
                return
            except ray.exceptions.ActorDiedError:
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)

    def _commit(self, r: int, ev: dict, done: set) -> None:
        with self.lock:
            if ev["kind"] == "stats":
                self.stats.add(r, ev["stats"])
                return
            self.writer.adopt(ev["kind"], ev["entry"])
            if ev["kind"] == "error_parts":
                self.counts["new_error_rows"] += ev["entry"]["rows"]
            done.update(ev["keys"])
            for k, v in ev["progress"].items():
                self.progress[k] += v
            self._show(len(ev["keys"]))
        if self.on_event is not None:
            self.on_event(r, self.actors[r], ev)

    def _show(self, n: int) -> None:
        if self.pbar is None:
            return
        p = self.progress
        secs = max(1e-9, time.perf_counter() - self.t0)
        self.pbar.update(n)
        self.pbar.set_postfix(tok_s=f"{(p['prompt_tokens'] + p['completion_tokens']) / secs:,.0f}",
                              cache_hit=f"{p['prompt_cache_hit_tokens'] / max(1, p['prompt_tokens']):.0%}")


def _replica_gpus(ray, cfg) -> float:
    """GPUs Ray reserves per replica: --gpus-per-replica, none with --device cpu (a replica of
    G > 1 is then G ranks over gloo); a one-line error when the cluster cannot hold one replica,
    where Ray would wait for GPUs forever."""
    if cfg.device == "cpu" or not cfg.gpus_per_replica:
        return 0
    have = ray.cluster_resources().get("GPU", 0)
    if have < cfg.gpus_per_replica:
        raise UserError(f"--gpus-per-replica {cfg.gpus_per_replica:g}: the Ray cluster has {have:g} GPU(s); "
                        "use --device cpu to run a replica's ranks on CPU")
    return cfg.gpus_per_replica
