"""Ray executor benchmark (issue 15): what prefix-affine routing saves, and what Ray costs.

    python benchmarks/bench_ray.py                 # both parts (a few minutes on 2 cores)
    python benchmarks/bench_ray.py --part routing|ray

- routing: the engine benchmark's workloads (`bench_engine.loads()`), dealt to 4, 8 and 16
  in-process engines that do no math (`LLM("tiny", dry_run=True)`: the real scheduler and cache
  manager), by prefix-affine routing (whole plan groups to the replica with the least work so far,
  work = what the plan prefills plus what a row may generate, as the executor counts it), by the
  same with groups cut at branch points into pieces of at least a fair share of rows
  (`pipelines.routing.split_group`, as the executor does with its chunk size), and by
  round-robin blocks of 16 input rows (what a prefix-blind dataset split does). Each engine plans
  its own rows (`llm.generate`, the same packing); the figure is prefill computed over all
  engines / prefix-tree tokens of the whole input (1.00 is the least possible), beside the
  load balance (most tokens on one engine / the mean).
- ray: one small job (`batchv4 run` on the tiny model, real math, CPU) locally, and on a local
  Ray cluster with 1 and with 2 replicas; wall seconds of each and of starting the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_engine  # noqa: E402
import workloads  # noqa: E402

BLOCK_ROWS = 16


def _prefill(shares: list[list[list[int]]]) -> int:
    from batchv4 import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=bench_engine.MAX_TOKENS, ignore_eos=True)
    total = 0
    for prompts in shares:
        if not prompts:
            continue
        llm = bench_engine.make_llm("2GiB", dry_run=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        total += llm.stats()["prefill_tokens"]
    return total


def _balance(shares: list[list[list[int]]]) -> float:
    loads = [sum(len(p) + bench_engine.MAX_TOKENS for p in s) for s in shares]
    return max(loads) / (sum(loads) / len(loads))


def part_routing() -> None:
    from batchv4.packing import PackInput, plan_with_stats
    from batchv4.pipelines.routing import Router, group_cost, round_robin_blocks, split_group

    print("\n## Routing: prefill computed / prefix-tree tokens (lower is better; 1.00 is the least)\n")
    print("| workload | replicas | tree tokens | prefix-affine | affine + split | round-robin blocks of 16 | "
          "balance affine | balance split | balance round-robin |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, prompts in bench_engine.loads().items():
        planned, stats = plan_with_stats([PackInput(i, p) for i, p in enumerate(prompts)])
        groups: dict[int, list] = {}
        for pr in planned:
            groups.setdefault(pr.group, []).append(pr)
        order = sorted(groups)
        # the executor's costs: what the plan prefills for a row plus what it may generate
        work = {g: [group_cost(pr.prefill_tokens, bench_engine.MAX_TOKENS) for pr in groups[g]] for g in order}
        for n in (4, 8, 16):
            affine: list[list[list[int]]] = [[] for _ in range(n)]
            router = Router(n)
            for g in order:
                affine[router.assign(sum(work[g]))].extend(prompts[pr.key] for pr in groups[g])
            split: list[list[list[int]]] = [[] for _ in range(n)]
            router, piece_rows = Router(n), -(-len(prompts) // n)      # pieces of a fair share of rows
            for g in order:
                rows = groups[g]
                for a, b, recompute in split_group([pr.resume_pos for pr in rows], work[g], piece_rows):
                    split[router.assign(sum(work[g][a:b]) + recompute)].extend(prompts[pr.key] for pr in rows[a:b])
            rr: list[list[list[int]]] = [[] for _ in range(n)]
            for i, r in enumerate(round_robin_blocks(len(prompts), n, BLOCK_ROWS)):
                rr[r].append(prompts[i])
            a, s_, b = (_prefill(x) / stats.tree_tokens for x in (affine, split, rr))
            print(f"| {name} | {n} | {stats.tree_tokens:,} | {a:.3f} | {s_:.3f} | {b:.3f} | {_balance(affine):.2f} | "
                  f"{_balance(split):.2f} | {_balance(rr):.2f} |", flush=True)


def part_ray() -> None:
    import logging

    import ray

    from batchv4.pipelines.ray_executor import run_ray
    from batchv4.pipelines.run import RunConfig, run

    rows = [{"id": f"r{i}", "prompt": f"Document {i % 6}: " + "the river runs to the sea. " * 20 + f"Question {i}?"}
            for i in range(48)]
    tmp = tempfile.mkdtemp(prefix="bench-ray-")
    src = os.path.join(tmp, "in.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    base = dict(input=src, model="tiny", device="cpu", max_tokens=16, kv_cache_memory="256MiB", quiet=True)
    print(f"\n## One small job: {len(rows)} rows (6 documents), tiny model, max_tokens 16, CPU\n")
    print("| executor | wall s | prefill tokens computed | output rows |")
    print("|---|---|---|---|")
    t = time.perf_counter()
    s = run(RunConfig(output=os.path.join(tmp, "local"), **base))
    print(f"| local | {time.perf_counter() - t:.1f} | {s['this_run']['prefill_tokens_computed']:,} | "
          f"{s['counts']['output_rows']} |", flush=True)
    t = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=200 * 2**20)
    start = time.perf_counter() - t
    for n in (1, 2):
        t = time.perf_counter()
        s = run_ray(RunConfig(output=os.path.join(tmp, f"ray{n}"), executor="ray", replicas=n, **base))
        wall = time.perf_counter() - t
        print(f"| ray, {n} replica(s) | {wall:.1f} (engine build {s['this_run']['seconds_by_stage']['engine_build']:.1f}) | "
              f"{s['this_run']['prefill_tokens_computed']:,} | {s['counts']['output_rows']} |", flush=True)
    print(f"\nStarting the local Ray cluster (ray.init, not in the rows above): {start:.1f} s.")
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["routing", "ray"], default=None)
    a = ap.parse_args()
    if a.part in (None, "routing"):
        part_routing()
    if a.part in (None, "ray"):
        part_ray()


if __name__ == "__main__":
    main()
