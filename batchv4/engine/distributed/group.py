"""The process group of a rank group: init and teardown, backends and timeouts.

Tensors of the expert exchange go over the default group (NCCL on CUDA, gloo on CPU); control
messages (requests dealt to ranks, finished outputs, readiness) go over a second group that is
always gloo, so control messages never need a device; they travel as JSON (`wire`), never pickle. Every collective has the group's timeout: a
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
        """Rank 0 gives objs[r] to rank r; every rank returns its own (JSON on the wire: `wire`)."""
        import torch
        import torch.distributed as dist

        from batchv4.engine.distributed.wire import decode, encode

        if self.rank == 0:
            blobs = [encode(o) for o in objs]
            size = torch.tensor([max(len(b) for b in blobs)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.ctrl)
        n = int(size.item())
        mine = torch.zeros(n + 8, dtype=torch.uint8)
        chunks = [_pack(b, n) for b in blobs] if self.rank == 0 else None
        dist.scatter(mine, chunks, src=0, group=self.ctrl)
        return decode(_unpack(mine))

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        import torch
        import torch.distributed as dist

        from batchv4.engine.distributed.wire import decode, encode

        blob = encode(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(blob)], dtype=torch.int64), group=self.ctrl)
        n = max(int(t.item()) for t in sizes)
        got = [torch.zeros(n + 8, dtype=torch.uint8) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(_pack(blob, n), got, dst=0, group=self.ctrl)
        return [decode(_unpack(t)) for t in got] if self.rank == 0 else None

    def close(self) -> None:
        import torch.distributed as dist

        if self._open and dist.is_initialized():
            self._open = False
            dist.destroy_process_group()


def _pack(blob: bytes, n: int):
    """blob as a uint8 tensor of n + 8 bytes: its length (8 bytes, little endian), then it, padded."""
    import torch

    buf = bytearray(len(blob).to_bytes(8, "little") + blob + bytes(n - len(blob)))
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def _unpack(t) -> bytes:
    raw = t.numpy().tobytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")]
