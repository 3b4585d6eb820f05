"""The process group of a rank group: init and teardown, backends and timeouts.

Tensors of the expert exchange go over the default group (NCCL on CUDA, gloo on CPU); control
messages (requests dealt to ranks, finished outputs, readiness) go over a second group that is
always gloo, so pickled objects never need a device. Every collective has the group's timeout: a
peer that stops answering becomes an error after `timeout_s`, never a hang. A peer that dies closes
its sockets, which gloo reports at once.

Owns: `RankGroupSpec` (what a rank needs to join) and `Group`. Does not own: what is sent.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field


@dataclass
class RankGroupSpec:
    world: int
    rendezvous: str                 # file:// path (one machine) or tcp://host:port
    device_type: str = "cpu"        # "cpu" -> gloo, "cuda" -> NCCL for the exchange
    timeout_s: float = 600.0
    llm_kwargs: dict = field(default_factory=dict)
    expert_parallel: bool = True
    threads: int | None = None      # torch threads per worker rank
    fault: dict | None = None       # tests only: {"rank": r, "step": s} raises in that rank's step s


class Group:
    """This process's membership: `rank`, `world`, `ctrl` (gloo group for objects)."""

    def __init__(self, spec: RankGroupSpec, rank: int) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, spec.world
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        backend = "nccl" if spec.device_type == "cuda" else "gloo"
        if spec.device_type == "cuda":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, init_method=spec.rendezvous, rank=rank, world_size=spec.world,
                                timeout=timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        self._open = True

    def scatter(self, objs: list | None):
        """Rank 0 gives objs[r] to rank r; every rank returns its own."""
        import torch.distributed as dist

        out = [None]
        dist.scatter_object_list(out, objs if self.rank == 0 else None, src=0, group=self.ctrl)
        return out[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        got = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, got, dst=0, group=self.ctrl)
        return got

    def close(self) -> None:
        import torch.distributed as dist

        if self._open and dist.is_initialized():
            self._open = False
            dist.destroy_process_group()
