"""`RankGroup`: N ranks behind the backend protocol, rank 0 in the caller's process.

`RankGroup(model, data_parallel_size=N, enable_expert_parallel=True, **LLM options)` (also what
`LLM(..., data_parallel_size=N)` returns) starts ranks 1..N-1 as worker processes
(`python -m batchv4.engine.distributed.worker`), joins them in a process group (a file rendezvous
in a private temp folder; gloo on CPU, NCCL on CUDA with rank r on cuda:r), and builds its own
engine as rank 0: with expert parallelism every rank holds 1/N of the routed experts and reads only
those from the checkpoint; without it every rank holds all of them (plain data parallel).

`generate_stream` deals requests to ranks by prefix group: a request of a group already dealt goes
to the same rank (its snapshots live in that rank's cache), a new group goes to the rank with the
fewest outstanding tokens (prompt + max tokens), and each rank has at most 2 x max_num_seqs
requests outstanding. All ranks step together (`worker.local_step`); rank 0 yields what any rank
finished. The pipelines see one backend: `generate_stream`, `stats`, plus `LLM`'s `generate`/`chat`.

Failure: a rank that raises writes its error and exits; one that is killed just exits. Its peers'
collectives then fail (closed sockets) or time out (`timeout_s`), and rank 0 raises `RankError`
naming the rank and its error, after stopping every other rank. Rank 0 never waits on a child
without a bound. Owns: start, dealing, failure, teardown. Does not own: the step (`worker.py`),
the exchange (`ep_moe.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from typing import Iterable, Iterator

from batchv4.engine.distributed.group import Group, RankGroupSpec
from batchv4.engine.distributed.wire import encode
from batchv4.engine.distributed.worker import build_rank_llm, end_stream, local_step, rank_stats
from batchv4.engine.llm import LLM, resolve_device
from batchv4.engine.outputs import RequestOutput
from batchv4.errors import UserError

log = logging.getLogger(__name__)


class RankError(UserError):
    """A rank of a rank group failed; the message names the rank and its error (one line)."""


def _stop(procs: list, tmp: str | None, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def _teardown(procs: list, tmp: str | None) -> None:
    """What an unclosed rank group leaves when it is collected or the process exits: the children
    (killed: nobody will deal them work again) and this process's membership of the group."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    _stop(procs, tmp, 1.0)
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


class RankGroup(LLM):
    def __init__(self, model: str = "tiny", *args, data_parallel_size: int = 2,
                 enable_expert_parallel: bool = False, timeout_s: float = 600.0, _fault: dict | None = None,
                 **kw) -> None:
        """`timeout_s`: how long any rank waits for another inside a collective (a step of the
        slowest rank must fit), and for the others to start. `_fault`: tests only."""
        import gc

        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()       # an unclosed, unreachable rank group tears down here
            if dist.is_initialized():
                raise UserError("one rank group per process: close() the other one first")
        if args:
            raise TypeError("RankGroup takes the LLM options as keywords (model may be positional)")
        N = data_parallel_size
        if isinstance(N, bool) or not isinstance(N, int) or N < 2:
            raise UserError(f"data_parallel_size must be an integer >= 2 for a rank group, got {N!r}")
        device = resolve_device(kw.get("device", "auto"))
        if device.type == "cuda" and torch.cuda.device_count() < N:
            raise UserError(f"data_parallel_size {N} needs {N} CUDA devices; this machine has "
                            f"{torch.cuda.device_count()}")
        self.world = N
        self.enable_expert_parallel = enable_expert_parallel
        self._procs: list[subprocess.Popen] = []
        self._broken = False
        self._rank_stats: list[dict] = []
        self._tmp = tempfile.mkdtemp(prefix="batchv4-ranks-")
        self._finalizer = weakref.finalize(self, _teardown, self._procs, self._tmp)
        spec = RankGroupSpec(world=N, rendezvous="file://" + os.path.join(self._tmp, "rendezvous"),
                             device_type=device.type, timeout_s=timeout_s, llm_kwargs=dict(model=model, **kw),
                             expert_parallel=enable_expert_parallel, threads=torch.get_num_threads(), fault=_fault)
        self._timeout = timeout_s
        spec_file = os.path.join(self._tmp, "spec.json")
        with open(spec_file, "wb") as f:
            f.write(encode(spec))
        try:
            for r in range(1, N):
                self._procs.append(subprocess.Popen([sys.executable, "-m", "batchv4.engine.distributed.worker",
                                                     spec_file, str(r), self._tmp]))
            self._group = self._join(spec)
            err = None
            try:
                LLM.__init__(self, model, **kw, expert_shard=(0, N) if enable_expert_parallel else None)
            except Exception as e:
                err = e
            ready = self._collective(self._group.gather, f"{type(err).__name__}: {err}" if err else None)
            if err is not None:
                raise err
            bad = [(r, m) for r, m in enumerate(ready) if m]
            if bad:
                raise RankError(f"rank {bad[0][0]} could not build its engine: {bad[0][1]}")
            self._exchange = None
            if enable_expert_parallel:
                from batchv4.engine.distributed.ep_moe import AllToAllExchange

                self._exchange = AllToAllExchange(0, N, self.device)
                self._exchange.attach(self.model)
        except BaseException:
            self._broken = True
            self.close()
            raise

    # ---- start and failure -----------------------------------------------------------------------
    def _join(self, spec: RankGroupSpec) -> Group:
        """Join the process group as rank 0, watching the children while they start."""
        box: dict = {}

        def join() -> None:
            try:
                box["group"] = Group(spec, 0)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=join, name="batchv4-rendezvous", daemon=True)
        t.start()
        deadline = time.monotonic() + spec.timeout_s
        while t.is_alive():
            t.join(0.1)
            dead = self._dead_child()
            if dead is not None:
                raise dead
            if time.monotonic() > deadline:
                raise RankError(f"the ranks did not start within {spec.timeout_s:g} s")
        if "error" in box:
            raise RankError(f"rank 0 could not join the rank group: {box['error']}")
        return box["group"]

    def _dead_child(self) -> RankError | None:
        for r, p in enumerate(self._procs, start=1):
            rc = p.poll()
            if rc is not None and rc != 0:
                return RankError(f"rank {r} failed: {self._child_error(r, rc)}")
        return None

    def _child_error(self, r: int, rc: int | None) -> str:
        path = os.path.join(self._tmp, f"rank{r}.error")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.readline().strip()
        if rc is not None and rc < 0:
            return f"killed by signal {-rc}"
        return f"exited with status {rc}" if rc is not None else "stopped answering"

    def _collective(self, fn, *args):
        """A control collective; a failure becomes the RankError of the rank that caused it."""
        try:
            return fn(*args)
        except Exception as e:
            raise self._failure(e) from e

    def _failure(self, e: BaseException, grace: float = 5.0) -> RankError:
        self._broken = True
        deadline = time.monotonic() + grace    # the failed rank's own exit is at most this far behind
        while time.monotonic() < deadline:
            dead = self._dead_child()
            if dead is not None:
                return dead
            if all(p.poll() is not None for p in self._procs):
                break
            time.sleep(0.05)
        alive = [r for r, p in enumerate(self._procs, start=1) if p.poll() is None]
        return RankError(f"the rank group broke: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         + (f" (ranks {alive} still running)" if alive else ""))

    def close(self) -> None:
        """Stop every rank (an orderly exit when the group is healthy, else kill after a grace)."""
        group = getattr(self, "_group", None)
        if group is not None and not self._broken:
            try:
                group.scatter([("exit", None)] * self.world)
            except Exception:
                self._broken = True
        if self._broken:
            for p in self._procs:
                if p.poll() is None:
                    p.kill()
        _stop(self._procs, self._tmp)
        if group is not None:
            try:
                group.close()     # gloo's teardown does not wait on peers, dead ones included
            except Exception as e:
                log.warning("rank group teardown: %s", e)
        self._group = None
        self._finalizer.detach()

    # ---- the backend protocol ------------------------------------------------------------------------
    def generate_stream(self, requests: Iterable) -> Iterator[RequestOutput]:
        if self._group is None:
            raise RankError("this rank group is closed")
        N = self.world
        it = iter(requests)
        exhausted = False
        held = None
        lookahead = 2 * self.scheduler.max_num_seqs
        outstanding, load = [0] * N, [0] * N
        owner: dict[str, tuple[int, int]] = {}
        groups: OrderedDict = OrderedDict()      # prefix group -> rank (the most recent 100,000)
        try:
            while True:
                deals: list[list] = [[] for _ in range(N)]
                while not exhausted:
                    if held is None:
                        try:
                            held = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                    r = self._rank_for(held, load, outstanding, groups)
                    if outstanding[r] >= lookahead:
                        break
                    tokens = len(held.prompt_token_ids) + held.params.max_tokens * held.params.n
                    deals[r].append(held)
                    owner[held.request_id] = (r, tokens)
                    outstanding[r] += 1
                    load[r] += tokens
                    held = None
                if exhausted and not any(outstanding):
                    break
                self._collective(self._group.scatter, [("step", d) for d in deals])
                try:
                    mine = local_step(self, self._exchange, deals[0])
                except Exception as e:
                    # a peer that failed inside the exchange, or rank 0's own error (then the
                    # others wait in a collective, and close() stops them)
                    failure = self._failure(e)
                    if "failed" in str(failure):
                        raise failure from e
                    raise
                for outs, _ in self._collective(self._group.gather, (mine, self.scheduler.has_work())):
                    for out in outs:
                        r, tokens = owner.pop(out.request_id)
                        outstanding[r] -= 1
                        load[r] -= tokens
                        yield out
        finally:
            if self._broken:
                self.close()
            else:
                self._end_stream()

    def _rank_for(self, req, load: list[int], outstanding: list[int], groups: OrderedDict) -> int:
        g = req.group
        if g is not None and g in groups:
            groups.move_to_end(g)
            return groups[g]
        r = min(range(self.world), key=lambda i: (load[i], outstanding[i], i))
        if g is not None:
            groups[g] = r
            if len(groups) > 100_000:
                groups.popitem(last=False)
        return r

    def _end_stream(self) -> None:
        self._collective(self._group.scatter, [("end", None)] * self.world)
        end_stream(self)
        self._rank_stats = self._collective(self._group.gather, rank_stats(self, self._exchange))

    def stats(self) -> dict:
        """Counters summed over the ranks (as of the last finished stream for ranks 1..N-1), and
        each rank's own under "ranks"."""
        ranks = [rank_stats(self, self._exchange)] + list(self._rank_stats[1:])
        total: dict = {}
        for s in ranks:
            for k, v in s.items():
                if isinstance(v, dict):
                    d = total.setdefault(k, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        for k in ("page_bytes_per_token", "bytes_per_snapshot"):
            if k in ranks[0]:
                total[k] = ranks[0][k]
        total["ranks"] = ranks
        total["data_parallel_size"] = self.world
        return total


__all__ = ["RankError", "RankGroup", "build_rank_llm"]
