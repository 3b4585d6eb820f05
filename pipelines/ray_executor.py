"""`--executor ray`: one `run` job over a pool of engine replicas (Ray actors), prefix-affine and
exactly once, writing the same output folder a local run writes.

Flow: the driver does what a local run does up to the plan (check options, claim the folder, take
over an earlier run, skip rows already done, plan), with the input read by Ray tasks
(`ray_tasks.ReadTasks`, one per fragment) and the row front-end's tokenizing in Ray
CPU tasks (`ray_tasks.FrontTasks`) -> it deals plan groups to replicas by tokens
(`pipelines.routing.Router`), whole, or a group longer than two chunks cut at branch points
(`pipelines.routing.split_group`), in chunks -> each replica (`ray_replicas.ReplicaWorker`, one
engine) plans its chunk again with the same packing, generates, prices rows with the same `output_rows`, and writes parts atomically under
names no other replica, chunk, attempt or invocation uses (`part-r{R}-{job}-c{C}-a{A}-NNNNN`),
streaming one event per committed part back -> the driver lists each committed part in the one
manifest (with the replica and the plan groups it holds). A replica that dies mid-chunk is
restarted by Ray and the chunk is sent again without the rows of the parts already listed; parts
it wrote but never reported are never listed, so they are ignored. A whole job killed and run
again resumes like a local run (the same `take_over`, fingerprint and `--overwrite`).

Owns: the job on Ray (its head, the dealing of plan groups, the summary) and the `ray.data.Dataset`
entry point. Does not own: the replicas and their retries (`ray_replicas`), the read and
front-end tasks (`ray_tasks`), routing (`pipelines.routing`), rows (`frontend`), resume
(`run_resume`), parts and manifest (`batchv4.io.writers`), or generation (`batchv4.engine`).
Imported only for `--executor ray`: the local executor never imports Ray.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import replace
from typing import Callable

from batchv4.errors import UserError
from batchv4.pipelines.ray_replicas import ReplicaPool, ReplicaWorker, WorkItem
from batchv4.pipelines.ray_tasks import FrontTasks, ReadTasks

log = logging.getLogger(__name__)

__all__ = ["ReplicaWorker", "WorkItem", "import_ray", "run_dataset", "run_ray"]

CHUNK_ROWS = 256            # rows per chunk sent to a replica at least (4 parts' worth if more)
_RAY_PART = re.compile(r"^\.?(part|errors)-r\d+-[0-9a-f]+-c\d+-a\d+-\d{5,}\.parquet(\.tmp-[0-9a-f]+)?$")


def import_ray():
    """Ray, or a one-line UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'batchv4[ray]'") from None
    return ray


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
    from batchv4.pipelines.run import _Errors, _now, _read, job_counters
    from batchv4.pipelines.run_output import summary, write_json
    from batchv4.pipelines.run_resume import drop_stale

    so = cfg.storage_options or None
    t_start = time.perf_counter()
    timings, counts = job_counters()
    errors = _Errors(writer, cfg.part_rows, counts)
    _connect(ray, cfg)
    front, reads = FrontTasks(ray, fe), ReadTasks(ray, fe.src, cfg.read_batch_rows)
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
            pool = ReplicaPool(ray, cfg, fe.kept, writer, counts, pbar, on_event, llm_factory, uuid.uuid4().hex[:8])
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
