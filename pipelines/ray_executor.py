"""`--executor ray`: one `run` job over a pool of engine replicas (Ray actors), prefix-affine and
exactly once, writing the same output folder a local run writes.

Flow: the driver does what a local run does up to the plan (check options, claim the folder, take
over an earlier run, skip rows already done, plan), with the input read by Ray tasks
(`_ReadTasks`, one per fragment) and the row front-end's building and tokenizing in Ray CPU tasks
(`_FrontTasks`) -> it deals plan groups to replicas by tokens
(`pipelines.routing.Router`), whole, or a group longer than two chunks cut at branch points
(`pipelines.routing.split_group`), in chunks -> each replica (`ReplicaWorker`, one engine) plans its chunk again with the same
packing, generates, prices rows with the same `output_rows`, and writes parts atomically under
names no other replica, chunk, attempt or invocation uses (`part-r{R}-{job}-c{C}-a{A}-NNNNN`),
streaming one event per committed part back -> the driver lists each committed part in the one
manifest (with the replica and the plan groups it holds). A replica that dies mid-chunk is
restarted by Ray and the chunk is sent again without the rows of the parts already listed; parts
it wrote but never reported are never listed, so they are ignored. A whole job killed and run
again resumes like a local run (the same `take_over`, fingerprint and `--overwrite`).

Owns: the replica actor, the driver's dispatch, retry and listing, and the `ray.data.Dataset`
entry point. Does not own: routing (`pipelines.routing`), rows (`frontend`), resume
(`run_resume`), parts and manifest (`batchv4.io.writers`), or generation (`batchv4.engine`).
Imported only for `--executor ray`: the local executor never imports Ray.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from batchv4.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["ReplicaWorker", "WorkItem", "import_ray", "run_dataset", "run_ray"]

MAX_ATTEMPTS = 4            # tries of one chunk (the first and three after replica failures)
CHUNK_ROWS = 256            # rows per chunk sent to a replica at least (4 parts' worth if more)
_RAY_PART = re.compile(r"^\.?(part|errors)-r\d+-[0-9a-f]+-c\d+-a\d+-\d{5,}\.parquet(\.tmp-[0-9a-f]+)?$")


def import_ray():
    """Ray, or a one-line UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'batchv4[ray]'") from None
    return ray


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


class _Pool:
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


class _ReadTasks:
    """The input read by Ray tasks, one per fragment (`InputSource.fragments`: Parquet row groups,
    byte ranges of JSON lines, other files whole), up to two per cluster CPU out at once. Each
    task parses its fragment with batchv4's readers (a bad line is a row with its error, as
    locally); the driver numbers the rows and lines as the fragments come back in order and hands
    on batches of `batch_rows`."""

    FRAGMENT_BYTES = 16 << 20

    def __init__(self, ray, src, batch_rows: int) -> None:
        self.ray, self.src, self.batch_rows = ray, src, batch_rows
        self.task = ray.remote(num_cpus=1, max_retries=3)(_read_fragment)
        self.depth = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.submitted = 0

    def batches(self):
        from collections import deque

        frags = iter(self.src.fragments(target_bytes=self.FRAGMENT_BYTES))
        ref = self.ray.put(self.src)
        out: deque = deque()

        def submit() -> None:
            f = next(frags, None)
            if f is not None:
                self.submitted += 1
                out.append((f, self.task.remote(ref, f)))

        for _ in range(self.depth):
            submit()
        index, lines, batch = 0, {}, []
        while out:
            f, pending = out.popleft()
            rows, n = _unwrapped(self.ray, pending)
            submit()
            for r in self.src.place(f, rows, index, lines.get(f.file, 0)):
                batch.append(r)
                if len(batch) >= self.batch_rows:
                    yield batch
                    batch = []
            index += len(rows)
            lines[f.file] = lines.get(f.file, 0) + n
        if batch:
            yield batch


def _read_fragment(src, frag):
    return src.read_fragment(frag)


def _unwrapped(ray, ref):
    """ray.get, re-raising a task's own exception (an unreadable file's one-line OSError)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class _FrontTasks:
    """The row front-end's row-only work (building requests, chat encoding, tokenizing) in Ray CPU
    tasks, one per read batch, up to two per cluster CPU out at once (`Frontend.batches(remote=)`);
    the driver reads the input and applies ids, duplicates, resume and limits in input order."""

    def __init__(self, ray, fe) -> None:
        self.ray = ray
        self.fe = ray.put(fe.shippable())
        self.task = ray.remote(num_cpus=1, max_retries=3)(_front_task)
        self.depth = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.submitted = 0

    def __call__(self, batch):
        self.submitted += 1
        return _Pending(self.ray, self.task.remote(self.fe, batch))


@dataclass
class _Pending:
    ray: Any
    ref: Any

    def result(self):
        return _unwrapped(self.ray, self.ref)


def _front_task(fe, batch):
    from batchv4.pipelines.frontend import front_stage

    return front_stage(fe, batch)


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


def _connect(ray, cfg) -> None:
    if ray.is_initialized():
        return
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


def run_ray(cfg, llm_factory: Callable | None = None, *, on_event: Callable | None = None) -> dict:
    """The `run` job on `cfg.replicas` Ray actors (connecting to `cfg.ray_address`, or starting a
    local cluster, unless Ray is initialized already). Returns the summary a local run returns,
    with `this_run.replicas` (engine counters per replica). `llm_factory(cfg)` builds each
    replica's engine; `on_event(replica, actor, event)` is called in the driver after each listed
    part (tests kill actors from it)."""
    from batchv4.io.outdir import claim_output
    from batchv4.io.writers import PartWriter, check_writable
    from batchv4.pipelines.run import prepare
    from batchv4.pipelines.run_resume import take_over
    from batchv4.pipelines.run_state import RunState

    ray = import_ray()
    cfg, fp, fe, card, private = prepare(cfg)
    so = cfg.storage_options or None
    with claim_output(cfg.output, fingerprint=fp, storage_options=so) as claim, RunState(fe.kept) as state:
        check_writable(cfg.output, so)
        take_over(cfg, fp, claim, state)
        if cfg.overwrite:
            _remove_replica_parts(cfg.output, so)
        writer = PartWriter(cfg.output, kept=fe.kept, meta={"fingerprint": fp, "config": cfg.public()},
                            storage_options=so)
        try:
            return _drive(ray, cfg, fp, fe, card, private, state, writer, llm_factory, on_event)
        except BaseException:
            if writer.manifest["parts"] or writer.manifest["error_parts"]:
                try:
                    writer.flush()
                except Exception as e:
                    log.warning("could not update the manifest after an error: %s", e)
            raise


def _drive(ray, cfg, fp, fe, card, private, state, writer, llm_factory, on_event) -> dict:
    from batchv4.packing import plan
    from batchv4.pipelines.frontend import progress_bar
    from batchv4.pipelines.routing import Router, group_cost, split_group
    from batchv4.pipelines.run import _Errors, _now, _read
    from batchv4.pipelines.run_output import summary, write_json
    from batchv4.pipelines.run_resume import drop_stale

    so = cfg.storage_options or None
    t_start = time.perf_counter()
    timings = {"read_build": 0.0, "tokenize": 0.0, "plan": 0.0, "engine_build": 0.0, "plan_engine": 0.0,
               "account_write": 0.0}
    counts = {"input_rows": 0, "skipped_done": 0, "new_error_rows": 0, "out_of_shard": 0, "planned_rows": 0,
              "stale_output_rows_removed": 0, "stale_error_rows_removed": 0}
    errors = _Errors(writer, cfg.part_rows, counts)
    _connect(ray, cfg)
    front, reads = _FrontTasks(ray, fe), _ReadTasks(ray, fe.src, cfg.read_batch_rows)
    planned = plan(_read(cfg, fe, state, errors, counts, timings, remote=front, rows=reads.batches()),
                   spill_dir=state.dir)
    t0 = time.perf_counter()
    first = next(planned, None)
    timings["plan"] = time.perf_counter() - t0 - timings["read_build"] - timings["tokenize"]
    counts["stale_output_rows_removed"], counts["stale_error_rows_removed"] = drop_stale(
        writer, state, fe.exhausted, counts["input_rows"])
    errors.flush()
    writer.flush()
    pool = None
    rows_before = writer.rows_written
    t_engine = time.perf_counter()
    try:
        if first is not None:
            t0 = time.perf_counter()
            pbar = progress_bar(cfg.quiet, "generate", "row", total=counts["planned_rows"])
            pool = _Pool(ray, cfg, fe.kept, writer, counts, pbar, on_event, llm_factory, uuid.uuid4().hex[:8])
            timings["engine_build"] = time.perf_counter() - t0
            router, chunk_rows = Router(cfg.replicas), max(CHUNK_ROWS, 4 * cfg.part_rows)
            pending: list[list[WorkItem]] = [[] for _ in range(cfg.replicas)]
            group: list[WorkItem] = []

            def deal() -> None:
                # a group larger than two chunks is cut at branch points into pieces dealt apart
                pieces = split_group([it.resume for it in group], [it.work for it in group], chunk_rows)
                for a, b, recompute in pieces:
                    r = router.assign(sum(it.work for it in group[a:b]) + recompute)
                    pending[r].extend(group[a:b])
                    if len(pending[r]) >= chunk_rows:
                        pool.submit(r, pending[r])
                        pending[r] = []
                if len(pieces) > 1:
                    counts["split_groups"] = counts.get("split_groups", 0) + 1
                    counts["split_recompute_tokens"] = counts.get("split_recompute_tokens", 0) + \
                        sum(p[2] for p in pieces)

            import itertools

            for pr in itertools.chain([first], planned):
                if group and pr.group != group[-1].group:
                    deal()
                    group = []
                req, sampling, thinking = state.get(pr.key)
                group.append(WorkItem(str(pr.key), list(pr.token_ids), req, sampling, thinking, pr.group,
                                      pr.api_hit_tokens, pr.resume_pos,
                                      group_cost(pr.prefill_tokens, sampling.max_tokens, sampling.n)))
            if group:
                deal()
            for r, items in enumerate(pending):
                if items:
                    pool.submit(r, items)
            pool.finish()
            if pbar is not None:
                pbar.close()
            counts["router_tokens_by_replica"] = list(router.load)
    finally:
        if pool is not None:
            pool.close()
    writer.flush()
    counts["new_output_rows"] = writer.rows_written - rows_before
    timings["plan_engine"] = time.perf_counter() - t_engine
    wall = time.perf_counter() - t_start
    stats = pool.stats if pool is not None else None
    result = summary(cfg, fp, writer, counts, timings, wall, stats, card, private, _now())
    result["this_run"]["executor"] = "ray"
    result["this_run"]["front_end_tasks"] = front.submitted
    result["this_run"]["read_tasks"] = reads.submitted
    result["this_run"]["replicas"] = {str(r): st for r, st in sorted(stats.by_replica.items())} if stats else {}
    write_json(cfg.output, "summary.json", result, so)
    if fe.src.format == "openai":
        from batchv4.io.openai_batch import write_openai_batch_output
        from batchv4.io.writers import iter_error_rows, iter_output_rows

        write_openai_batch_output(cfg.output, iter_output_rows(cfg.output, None, so),
                                  iter_error_rows(cfg.output, None, so), model=cfg.model, storage_options=so)
    return result


def _remove_replica_parts(url: str, so) -> None:
    """`--overwrite`: the replica part files an earlier run left (listed or not)."""
    from batchv4.io.urls import get_fs

    fs, path = get_fs(url, so)
    for p in fs.ls(path, detail=False):
        if _RAY_PART.match(p.rstrip("/").rsplit("/", 1)[-1]):
            fs.rm_file(p)


def run_dataset(ds, cfg, llm_factory: Callable | None = None, *, staging: str | None = None):
    """A `ray.data.Dataset` of input rows in, the `ray.data.Dataset` of its output rows out: the
    rows are written as Parquet into `staging` (default: the folder `OUTPUT.input` beside the
    output folder, replaced on each call; the output folder itself holds only the job), run as
    `run_ray` runs a file (the output folder is `cfg.output`, with resume and error rows: rows
    already done in it, by id and content, are not run again), and the listed parts are read
    back."""
    from batchv4.io.urls import get_fs, join
    from batchv4.io.writers import read_manifest

    ray = import_ray()
    so = cfg.storage_options or None
    fs, path = get_fs(cfg.output, so)
    staging = staging or cfg.output.rstrip("/") + ".input"
    sfs, spath = get_fs(staging, so)
    if sfs.exists(spath):
        sfs.rm(spath, recursive=True)
    ds.write_parquet(staging, filesystem=None if _is_local(sfs) else sfs)
    run_ray(replace(cfg, input=staging, fmt="parquet"), llm_factory)
    files = [join(fs, path, e["file"]) for e in read_manifest(cfg.output, so)["parts"]]
    return ray.data.read_parquet(files, filesystem=None if _is_local(fs) else fs)


def _is_local(fs) -> bool:
    from batchv4.io.urls import is_local

    return is_local(fs)
