"""The Ray CPU tasks of `--executor ray` ahead of the replicas: `ReadTasks` reads the input by
fragments with batchv4's own readers, `FrontTasks` tokenizes the requests the driver built
(`frontend.encode_stage`). Both keep a bounded number of tasks out and hand results on in input
order, so the driver numbers rows and applies ids, duplicates, resume and limits as a local run.

Owns: the tasks and their ordering. Does not own: reading (`batchv4.io.readers`), the front-end
(`pipelines.frontend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ReadTasks:
    """The input read by Ray tasks, one per fragment (`batchv4.io.fragments`: Parquet row groups,
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

        from batchv4.io.fragments import fragments, place

        frags = iter(fragments(self.src, target_bytes=self.FRAGMENT_BYTES))
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
            for r in place(self.src, f, rows, index, lines.get(f.file, 0)):
                batch.append(r)
                if len(batch) >= self.batch_rows:
                    yield batch
                    batch = []
            index += len(rows)
            lines[f.file] = lines.get(f.file, 0) + n
        if batch:
            yield batch


def _read_fragment(src, frag):
    from batchv4.io.fragments import read_fragment

    return read_fragment(src, frag)


def _unwrapped(ray, ref):
    """ray.get, re-raising a task's own exception (an unreadable file's one-line OSError)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class FrontTasks:
    """The row front-end's tokenizing (chat encoding and BPE, its costly part) in Ray CPU tasks,
    one per batch of requests to run, up to two per cluster CPU out at once
    (`Frontend.batches(remote=)`); the driver builds the requests and applies ids, duplicates,
    resume and limits in input order first, so rows already done are never tokenized."""

    def __init__(self, ray, fe) -> None:
        self.ray = ray
        self.fe = ray.put(fe.shippable())
        self.task = ray.remote(num_cpus=1, max_retries=3)(_front_task)
        self.depth = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.submitted = 0

    def __call__(self, requests):
        self.submitted += 1
        return _Pending(self.ray, self.task.remote(self.fe, requests))


@dataclass
class _Pending:
    ray: Any
    ref: Any

    def result(self):
        return _unwrapped(self.ray, self.ref)


def _front_task(fe, requests):
    from batchv4.pipelines.frontend import encode_stage

    return encode_stage(fe, requests)
