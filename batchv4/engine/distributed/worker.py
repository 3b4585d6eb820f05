"""One rank's part of a lockstep step, and the worker process that runs ranks 1..N-1.

Every step, on every rank: rank 0 deals requests (`Group.scatter`), each rank adds its share to its
own engine, runs one ordinary `LLM.step()` when it has work, then `finish_step()` on the exchange
(so a rank without work still joins every MoE layer of the others, with 0 tokens), and rank 0
gathers the finished outputs (`Group.gather`). Commands from rank 0: ("step", requests),
("end", None) (a stream ended: drop what is held, reply with stats) and ("exit", None).

A worker that fails after joining writes its error to `<error_dir>/rank<r>.error` and exits with
status 1; its closed sockets end the peers' collectives, and rank 0 reads the file. Owns: the worker
loop and `local_step`. Does not own: dealing (`launcher.py`) or the exchange (`ep_moe.py`).

Run as `python -m batchv4.engine.distributed.worker SPEC_FILE RANK ERROR_DIR`.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

log = logging.getLogger(__name__)


def build_rank_llm(spec, rank: int):
    """This rank's engine (its block of experts when expert parallel) and its exchange (or None)."""
    import torch

    from batchv4.engine.llm import LLM

    kw = dict(spec.llm_kwargs)
    if spec.device_type == "cuda":
        kw["device"] = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    shard = (rank, spec.world) if spec.expert_parallel else None
    llm = LLM(**kw, expert_shard=shard)
    exchange = None
    if shard is not None:
        from batchv4.engine.distributed.ep_moe import AllToAllExchange

        exchange = AllToAllExchange(rank, spec.world, llm.device)
        exchange.attach(llm.model)
    return llm, exchange


def local_step(llm, exchange, requests: list) -> list:
    """Add `requests` to this rank's engine, run one step if it has work, take part in the others'
    exchanges; the outputs that finished (rejected requests included)."""
    from batchv4.engine.outputs import RequestOutput

    outs = []
    for req in requests:
        err = llm.check_request(req)
        if err:
            outs.append(RequestOutput.error(req.request_id, list(req.prompt_token_ids), err, n=req.params.n))
        else:
            llm.scheduler.add_request(req)
    if llm.scheduler.has_work():
        outs.extend(llm.step())
    if exchange is not None:
        exchange.finish_step()
    return outs


def end_stream(llm) -> None:
    llm.scheduler.abort_all()
    llm.runner.kept_logits.clear()


def rank_stats(llm, exchange) -> dict:
    """This rank's own engine counters (`LLM.stats`, not a rank group's sum) and exchange bytes."""
    from batchv4.engine.llm import LLM

    s = LLM.stats(llm)
    if exchange is not None:
        s["exchange_bytes_sent"] = exchange.bytes_sent
        s["exchange_token_layers"] = exchange.token_layers
        s["exchange_activation_bytes"] = exchange.activation_bytes
    return s


def serve(group, llm, exchange, fault: dict | None = None) -> None:
    """The worker loop (ranks 1..N-1)."""
    steps = 0
    while True:
        cmd, payload = group.scatter(None)
        if cmd == "exit":
            return
        if cmd == "end":
            end_stream(llm)
            group.gather(rank_stats(llm, exchange))
            continue
        steps += 1
        if fault and fault.get("rank") == group.rank and fault.get("step") == steps:
            raise RuntimeError(f"injected fault at step {steps}")
        outs = local_step(llm, exchange, payload)
        group.gather((outs, llm.scheduler.has_work()))


def main(argv: list[str]) -> int:
    spec_file, rank, error_dir = argv[0], int(argv[1]), argv[2]
    from batchv4.engine.distributed.wire import decode

    with open(spec_file, "rb") as f:
        spec = decode(f.read())
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(levelname)s %(message)s")
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    from batchv4.engine.distributed.group import Group

    group = Group(spec, rank)
    try:
        try:
            llm, exchange = build_rank_llm(spec, rank)
            ready = None
        except Exception as e:   # reported to rank 0 through the readiness gather, not a crash
            llm = exchange = None
            ready = f"{type(e).__name__}: {e}"
        group.gather(ready)
        if ready is not None:
            return 1
        serve(group, llm, exchange, spec.fault)
    except BaseException as e:
        with open(os.path.join(error_dir, f"rank{rank}.error"), "w", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)            # no teardown handshake: the peers see the closed sockets at once
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
