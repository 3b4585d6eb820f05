"""The engine before and after a change, on the engine benchmark's three workloads (tiny preset, fp32, CPU).

Run:  python benchmarks/bench_step.py --before /path/to/old/checkout [--repeats 3]

Each side runs in its own child process with its checkout first on `sys.path` (the old checkout's
`batchv4` package; the same workloads module, benchmarks/workloads.py of this checkout, for both),
in the order old, new, new, old per workload (each side's figure is the mean of its two children, so
neither side always runs first). In each child: `LLM("tiny", dtype="float32",
kv_cache_memory="256MiB")`, a 2-prompt warm-up, then the workload `--repeats` times on the same
engine (greedy, max_tokens 32, ignore_eos: every row generates exactly 32 tokens), the median wall
time, and the share of it in the model's forward (`stats()["forward_seconds"]`). Both sides do the
same work: same prompts, same budget and batch settings, same token counts; the seeded weights
may differ between versions, which does not change the work (fixed-length outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, statistics, sys, time
root, here, name, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
sys.path.insert(0, here)
import torch
import bench_engine
from batchv4 import LLM, SamplingParams
assert os.path.dirname(os.path.dirname(__import__("batchv4").__file__)) == os.path.abspath(root), "wrong checkout"
prompts = bench_engine.loads(small=True)[name]
llm = LLM("tiny", dtype="float32", kv_cache_memory="256MiB", max_num_batched_tokens=2048, max_num_seqs=32)
sp = SamplingParams(temperature=0, max_tokens=bench_engine.MAX_TOKENS, ignore_eos=True)
llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], sp)
times, fwd = [], []
for _ in range(repeats):
    f0 = llm.stats()["forward_seconds"]
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    times.append(time.perf_counter() - t)
    fwd.append(llm.stats()["forward_seconds"] - f0)
i = sorted(range(repeats), key=lambda k: times[k])[repeats // 2]
print(json.dumps({"seconds": times[i], "forward": fwd[i], "rows": len(prompts)}))
"""


def child(root: str, name: str, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    p = subprocess.run([sys.executable, "-c", CHILD, root, HERE, name, str(repeats)], capture_output=True,
                       text=True, env=env, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="an old checkout's root folder (git worktree)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import bench_engine

    new_root = os.path.dirname(HERE)
    print("| workload | rows | before s | after s | after / before | forward share before | after |")
    print("|---|---|---|---|---|---|---|")
    for name in bench_engine.loads(small=True):
        # ABBA: old, new, new, old; each side: the mean of its two children
        a1 = child(args.before, name, args.repeats)
        b1 = child(new_root, name, args.repeats)
        b2 = child(new_root, name, args.repeats)
        a2 = child(args.before, name, args.repeats)
        old = {k: (a1[k] + a2[k]) / 2 for k in ("seconds", "forward")} | {"rows": a1["rows"]}
        new = {k: (b1[k] + b2[k]) / 2 for k in ("seconds", "forward")} | {"rows": b1["rows"]}
        print(f"| {name} | {new['rows']} | {old['seconds']:.2f} | {new['seconds']:.2f} | "
              f"{new['seconds'] / old['seconds']:.2f} | {old['forward'] / old['seconds']:.0%} | "
              f"{new['forward'] / new['seconds']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
