"""Benchmark packing: planning throughput and memory, and prefill saved against vLLM-style APC.

Run:  python benchmarks/bench_packing.py [--rows 100000] [--tokens 500] [--memory] [--arrays]
      [--skip-lru] [--datasets doc-questions,system-few-shot,unique]

For each synthetic dataset (seeded) it reports the plan's speed (rows/s, tokens/s), its stats, and
the prompt tokens prefilled by (a) no cache, (b) a vLLM-style block LRU cache running the rows in
input order (`naive_lru_prefill`, 16-token blocks, two capacities), (c) the same LRU running the
rows in plan order, and (d) the plan itself, with ratios against the plan. `--memory` repeats the
planning under tracemalloc (slower) to report the peak Python heap.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from typing import Callable

import numpy as np

from batchv4.packing import PackInput, PlanStats, naive_lru_prefill, plan

VOCAB = 128_000


def doc_questions(rows: int, tokens: int, rng: np.random.Generator) -> list[PackInput]:
    """Documents asked 8 questions each; the question is ~10% of the prompt; rows shuffled."""
    q_len = max(1, tokens // 10)
    docs = [rng.integers(0, VOCAB, tokens - q_len).tolist() for _ in range(rows // 8 + 1)]
    items = [PackInput(i, docs[i // 8] + rng.integers(0, VOCAB, q_len).tolist()) for i in range(rows)]
    order = rng.permutation(rows)
    return [items[i] for i in order]


def system_few_shot(rows: int, tokens: int, rng: np.random.Generator) -> list[PackInput]:
    """4 system prompts (40%) x 3 few-shot blocks each (30%) + a unique request (30%)."""
    systems = [rng.integers(0, VOCAB, int(tokens * 0.4)).tolist() for _ in range(4)]
    shots = [[rng.integers(0, VOCAB, int(tokens * 0.3)).tolist() for _ in range(3)] for _ in range(4)]
    out = []
    for i in range(rows):
        s, f = int(rng.integers(4)), int(rng.integers(3))
        head = systems[s] + shots[s][f]
        out.append(PackInput(i, head + rng.integers(0, VOCAB, tokens - len(head)).tolist()))
    return out


def unique(rows: int, tokens: int, rng: np.random.Generator) -> list[PackInput]:
    """No sharing at all: the planner's worst case for speed, nothing to gain."""
    return [PackInput(i, rng.integers(0, VOCAB, tokens).tolist()) for i in range(rows)]


DATASETS: dict[str, Callable[[int, int, np.random.Generator], list[PackInput]]] = {
    "doc-questions": doc_questions,
    "system-few-shot": system_few_shot,
    "unique": unique,
}


def run_plan(items: list[PackInput]) -> tuple[float, float, PlanStats, list[object]]:
    """Wall and CPU seconds (the machine is shared: CPU time is the steadier of the two)."""
    stats = PlanStats()
    order = []
    start, cpu = time.perf_counter(), time.process_time()
    for request in plan(items, stats=stats):
        order.append(request.key)
    return time.perf_counter() - start, time.process_time() - cpu, stats, order


def peak_heap(items: list[PackInput]) -> int:
    tracemalloc.start()
    try:
        for _ in plan(items):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=500, help="tokens per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--memory", action="store_true", help="also measure the peak heap (slow)")
    parser.add_argument("--arrays", action="store_true", help="token ids as int32 numpy arrays, not lists")
    parser.add_argument("--skip-lru", action="store_true", help="skip the LRU baselines (slow)")
    args = parser.parse_args()

    for name in args.datasets.split(","):
        items = DATASETS[name](args.rows, args.tokens, np.random.default_rng(args.seed))
        if args.arrays:
            items = [PackInput(it.key, np.asarray(it.token_ids, dtype=np.int32)) for it in items]
        # The dataset is held whole here (a pipeline streams it); keep the cyclic GC from rescanning
        # its millions of list items on every full collection, which would double the times.
        gc.freeze()
        seconds, cpu, stats, order = run_plan(items)
        by_key = {item.key: item for item in items}
        planned = [by_key[k] for k in order]
        print(f"== {name}: {stats.rows} rows, {stats.prompt_tokens} prompt tokens")
        print(f"plan: {seconds:.2f} s wall, {cpu:.2f} s CPU: {stats.rows / cpu:,.0f} rows/s, "
              f"{stats.prompt_tokens / cpu / 1e6:.2f} M tokens/s per CPU s, spilled={stats.spilled}, "
              f"windows={stats.windows}, groups={stats.groups}, snapshots={stats.snapshots}, "
              f"max_live_snapshots={stats.max_live_snapshots}")
        print(f"tree_tokens={stats.tree_tokens} (reuse {stats.reuse_ratio:.2f}x), "
              f"planned_prefill={stats.planned_prefill_tokens} ({stats.planned_reuse_ratio:.2f}x), "
              f"split_recompute={stats.split_recompute_tokens}, "
              f"api_hit={stats.api_hit_tokens} ({stats.api_hit_ratio:.1%})")
        base = stats.planned_prefill_tokens
        print(f"  {'prefill by':38s} {'tokens':>12s} {'x plan':>7s}")
        print(f"  {'no cache':38s} {stats.prompt_tokens:12d} {stats.prompt_tokens / base:7.2f}")
        for capacity in () if args.skip_lru else (1 << 17, 1 << 14):  # 2M, 262k tokens
            start = time.perf_counter()
            lru = naive_lru_prefill(items, 16, capacity)
            lru_s = time.perf_counter() - start
            ordered = naive_lru_prefill(planned, 16, capacity)
            label = f"LRU {capacity * 16 // 1000}k tok, input order"
            print(f"  {label:38s} {lru:12d} {lru / base:7.2f}   ({lru_s:.1f} s)")
            label = f"LRU {capacity * 16 // 1000}k tok, plan order"
            print(f"  {label:38s} {ordered:12d} {ordered / base:7.2f}")
        print(f"  {'plan (snapshots at branch points)':38s} {base:12d} {1.0:7.2f}")
        if args.memory:
            print(f"peak Python heap while planning: {peak_heap(items) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
