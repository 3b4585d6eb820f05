"""The remote backend and the server, measured against `batchv4 serve` with the tiny model (CPU).

Run:  python benchmarks/bench_remote.py [--concurrency 8] [--repeats 3]

Part 1, order for the provider's cache. Two workloads (a shared system prompt of about 500 tokens
before 48 short requests; 4 documents of about 600 tokens times 8 questions, rows shuffled), each
sent to one `batchv4 serve` process two ways, alternating, with a fresh server per side and
repeat (so no side finds the other's cache):
  - planned: `run --backend openai` (plan order; a prefix's first request answered before the rest);
  - input order: the official `openai` AsyncOpenAI client sending the rows in the file's order with
    the same concurrency (what a plain script does).
Both send the same requests (same messages, max_tokens 8, greedy) and read hits from the server's
usage. Reported: cache-hit tokens of each side, wall time (median), and the planned side's hits
against what `batchv4 estimate` predicts for an API (goal: >= 95%).

Part 2, the server's overhead: 64 distinct prompts (max_tokens 16, ignore_eos: the same tokens on
both sides), sent by 32 concurrent clients to `batchv4 serve`, against `LLM.generate` on the same
prompts in one process (same engine settings: max_num_seqs 32, 2048-token steps). Median wall time
of `--repeats`, ratio serve / generate. The server also tokenizes, answers over HTTP and batches
requests as they arrive; `generate` gets the whole list at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "serve"))

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def workloads() -> dict[str, list[dict]]:
    rng = random.Random(0)
    system = "You are a careful assistant. " + text(rng, 480)
    shared = [{"id": f"s{i}", "messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": f"Request {i}: " + text(rng, 12)}]}
              for i in range(48)]
    docs = [f"Document {d}. " + text(rng, 580) for d in range(4)]
    dq = [{"id": f"d{d}q{q}", "messages": [{"role": "user", "content": docs[d] + f"\n\nQuestion {q}: " + text(rng, 10)}]}
          for d in range(4) for q in range(8)]
    rng.shuffle(dq)
    return {"shared_system_prompt": shared, "documents_x_questions": dq}


def write(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def estimate_hits(path: str) -> int:
    p = subprocess.run([sys.executable, "-m", "batchv4", "estimate", path, "--max-tokens", "8", "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)["tokens"]["api_cache_hit_tokens"]


def planned(path: str, url: str, out: str, concurrency: int) -> tuple[float, int]:
    from batchv4.pipelines.run import RunConfig, run

    t = time.perf_counter()
    s = run(RunConfig(input=path, output=out, model="tiny", backend="openai", base_urls=(url,), max_tokens=8,
                      concurrency=concurrency, quiet=True))
    return time.perf_counter() - t, s["totals"]["prompt_cache_hit_tokens"]


def input_order(rows: list[dict], url: str, concurrency: int) -> tuple[float, int]:
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=url, api_key="none", max_retries=8)
        sem = asyncio.Semaphore(concurrency)
        hits = 0

        async def one(r):
            nonlocal hits
            async with sem:
                resp = await client.chat.completions.create(model="tiny", messages=r["messages"], max_tokens=8,
                                                            temperature=0)
                hits += resp.usage.prompt_tokens_details.cached_tokens or 0

        t = time.perf_counter()
        await asyncio.gather(*(one(r) for r in rows))
        dt = time.perf_counter() - t
        await client.close()
        return dt, hits

    return asyncio.run(main())


def part1(args) -> None:
    from server import start_server

    print("| workload | rows | estimate's API hits | planned hits | planned / estimate | input-order hits | "
          "planned s | input-order s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in workloads().items():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "in.jsonl")
            write(rows, path)
            predicted = estimate_hits(path)
            res = {"planned": [], "input": []}
            for rep in range(args.repeats):
                for side in (("planned", "input") if rep % 2 == 0 else ("input", "planned")):
                    with start_server("--max-num-seqs", "32") as url:
                        if side == "planned":
                            res[side].append(planned(path, url + "/v1", os.path.join(d, f"out{rep}"), args.concurrency))
                        else:
                            res[side].append(input_order(rows, url + "/v1", args.concurrency))
            ph = statistics.median(h for _, h in res["planned"])
            ih = statistics.median(h for _, h in res["input"])
            pt = statistics.median(t for t, _ in res["planned"])
            it = statistics.median(t for t, _ in res["input"])
            print(f"| {name} | {len(rows)} | {predicted:,} | {ph:,} | {ph / max(1, predicted):.1%} | {ih:,} | "
                  f"{pt:.1f} | {it:.1f} |", flush=True)


def part2(args) -> None:
    from openai import AsyncOpenAI
    from server import start_server

    from batchv4 import LLM, SamplingParams

    rng = random.Random(1)
    prompts = [f"Prompt {i}: " + text(rng, 20) for i in range(64)]
    llm = LLM("tiny", max_num_seqs=32, max_num_batched_tokens=2048)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(convs[:2], sp)

    async def clients(url):
        client = AsyncOpenAI(base_url=url, api_key="none")
        queue = list(convs)

        async def worker():
            while queue:
                m = queue.pop()
                await client.chat.completions.create(model="tiny", messages=m, max_tokens=16, temperature=0,
                                                     extra_body={"ignore_eos": True})

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(32)))
        dt = time.perf_counter() - t
        await client.close()
        return dt

    gen, srv = [], []
    with start_server("--max-num-seqs", "32", "--max-batched-tokens", "2048") as url:
        asyncio.run(clients(url + "/v1"))      # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            llm.chat(convs, sp)
            gen.append(time.perf_counter() - t)
            srv.append(asyncio.run(clients(url + "/v1")))
    g, s = statistics.median(gen), statistics.median(srv)
    print(f"\n| 64 prompts x 16 tokens | LLM.generate s | serve, 32 clients s | serve / generate |")
    print("|---|---|---|---|")
    print(f"| median of {args.repeats} | {g:.2f} | {s:.2f} | {s / g:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", choices=("1", "2", "both"), default="both")
    args = ap.parse_args()
    if args.part in ("1", "both"):
        part1(args)
    if args.part in ("2", "both"):
        part2(args)


if __name__ == "__main__":
    main()
