"""Structured outputs and dedup, measured (tiny preset, fp32, CPU).

Run:  python benchmarks/bench_structured.py [--repeats 3] [--dedup-rows 100000]

1. Per-token cost of constrained decoding against unconstrained, at batch 32 and batch 1: the
   constrained side decodes under a JSON schema (greedy, max_tokens 96); the unconstrained side
   then generates exactly as many tokens per row (ignore_eos, max_tokens = that row's constrained
   length), so both sides compute the same tokens; the same engine, alternating, median of
   `--repeats`. Reported: seconds per generated token on each side, and the ratio.
2. Grammar compile time for a typical schema (a fresh schema each time, so no cache), and the
   one-off llguidance tokenizer build over the V4 vocabulary.
3. Dedup throughput: `--dedup-rows` synthetic rows of about 30 words, 10% planted near copies,
   through `pipelines.dedup.Deduper` (threshold 0.8): rows per second.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "horror"]}, "minItems": 1,
               "maxItems": 3},
    "rating": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["title", "year", "genres", "rating"], "additionalProperties": False}


def part1(args) -> None:
    import torch

    from batchv4 import LLM, SamplingParams
    from batchv4.structured import StructuredOutputsParams

    torch.set_num_threads(2)
    llm = LLM("tiny", dtype="float32", max_num_seqs=32)
    so = StructuredOutputsParams(json=SCHEMA)
    print("| batch | constrained s/token | unconstrained s/token | ratio | tokens per side |")
    print("|---|---|---|---|---|")
    for batch in (32, 1):
        convs = [[{"role": "user", "content": f"Describe film number {i}."}] for i in range(batch)]
        llm.chat(convs[:1], SamplingParams(temperature=0, max_tokens=8, structured_outputs=so))   # warm-up
        con, unc, n_tok = [], [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=96, structured_outputs=so))
            dt_c = time.perf_counter() - t
            lens = [len(o.outputs[0].token_ids) for o in outs]
            n_tok = sum(lens)
            sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
            t = time.perf_counter()
            llm.chat(convs, sps)
            dt_u = time.perf_counter() - t
            con.append(dt_c / n_tok)
            unc.append(dt_u / n_tok)
        c, u = statistics.median(con), statistics.median(unc)
        print(f"| {batch} | {c * 1e3:.2f} ms | {u * 1e3:.2f} ms | {c / u:.3f} | {n_tok} |", flush=True)


def part2() -> None:
    from batchv4.structured import StructuredOutputsParams
    from batchv4.structured.grammars import Compiler
    from batchv4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    t = time.perf_counter()
    comp = Compiler(tok, 129280)
    build = time.perf_counter() - t
    times = []
    for i in range(10):
        schema = dict(SCHEMA, properties={**SCHEMA["properties"], f"extra{i}": {"type": "string"}})
        t = time.perf_counter()
        comp.matcher(StructuredOutputsParams(json=schema))
        times.append(time.perf_counter() - t)
    print(f"\nllguidance tokenizer build (once per tokenizer): {build:.2f} s; grammar compile + matcher for a "
          f"fresh 5-field schema: median {statistics.median(times) * 1e3:.2f} ms of 10")


def part3(args) -> None:
    from batchv4.pipelines.dedup import Deduper

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    rows = []
    for i in range(args.dedup_rows):
        if rows and rng.random() < 0.1:
            src = rows[rng.randrange(len(rows))][1].split()
            src[rng.randrange(len(src))] = "changed"
            rows.append((i, " ".join(src)))
        else:
            rows.append((i, " ".join(rng.choice(words) for _ in range(30))))
    d = Deduper(0.8)
    t = time.perf_counter()
    dropped = sum(d.decide(k, text)[0].kind is not None for k, text in rows)
    dt = time.perf_counter() - t
    print(f"\ndedup: {len(rows):,} rows in {dt:.1f} s = {len(rows) / dt:,.0f} rows/s ({dropped:,} dropped)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dedup-rows", type=int, default=100_000)
    args = ap.parse_args()
    part1(args)
    part2()
    part3(args)


if __name__ == "__main__":
    main()
