"""Benchmark the pipelines: `estimate` against raw `tokenizers`, its peak memory, and how much of a
`run` is spent outside the engine.

Run:  python benchmarks/bench_pipeline.py [--rows 20000] [--memory-rows 250000,1000000]
      [--run-rows 48] [--run-tokens 16] [--run-memory-rows 100000,400000] [--repeats 3]
      [--skip estimate,memory,run,runmem]

(a) estimate throughput: a seeded JSONL of document-question prompts (shared prefixes, as in a
    summarization job). The same rows are chat-encoded to the exact strings the estimate tokenizes,
    and HF `tokenizers` `Tokenizer.encode_batch` encodes them (timed alone: the baseline has no
    reading, chat encoding, packing or pricing to do). The estimate runs whole (read, build,
    chat-encode, tokenize, pack, price) on the file. Both alternate `--repeats` times in this one
    process; the best time of each is reported, and their ratio in tokens/s (target >= 0.7x).
(b) estimate peak memory: a JSONL of N rows is written to a temporary folder, and
    `batchv4 estimate FILE --json` runs in a child process; peak RSS comes from
    `resource.getrusage(RUSAGE_CHILDREN)` of a fresh wrapper process per N, so each figure is that
    one child's. Bounded memory means the figure does not grow with N.
(c) run overhead: after a warm-up job (one-time imports), the same `run` job twice, once on the real `tiny` model and once on an engine
    stand-in with the engine's interface (`generate_stream` returns a fixed output of max_tokens
    tokens at once, `stats`; the planning is `run`'s own, as with the real engine). The stand-in's
    wall time is everything outside the engine (reading, tokenizing, packing, accounting,
    writing); its share of the real run's wall time is the overhead (target under 10%).
(d) run peak memory: `run` on N rows with the engine stand-in, in a fresh child process per N that
    reports its own peak RSS (VmHWM of /proc/self/status: unlike `ru_maxrss`, it is not carried
    over from the parent across fork and exec). Everything but the model is real: reading,
    tokenizing, the on-disk row records, the spilling planner, accounting and writing parts.
    Bounded memory means the figure does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

WORDS = ("the river city report budget plan market water energy policy school health road trade "
         "north south annual growth council member region system data model rate level value cost").split()


def make_rows(n: int, seed: int = 0, doc_words: int = 120, q_words: int = 12, per_doc: int = 4):
    """Documents of `doc_words` words, each asked `per_doc` questions."""
    rng = random.Random(seed)
    doc = ""
    for i in range(n):
        if i % per_doc == 0:
            doc = " ".join(rng.choice(WORDS) for _ in range(doc_words))
        q = " ".join(rng.choice(WORDS) for _ in range(q_words))
        yield {"id": f"r{i}", "prompt": f"Document:\n{doc}\n\nQuestion: {q}?"}


def write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ---- (a) estimate vs raw encode_batch -----------------------------------------------------------
def bench_estimate(rows: int, repeats: int, tmp: str) -> list[tuple]:
    from tokenizers import Tokenizer

    from batchv4.pipelines.estimate import EstimateConfig, estimate
    from batchv4.tokenizer import bundled_tokenizer_path, encode_chat

    path = os.path.join(tmp, "estimate.jsonl")
    data = list(make_rows(rows))
    write_jsonl(path, data)
    texts = [encode_chat([{"role": "user", "content": r["prompt"]}], False) for r in data]
    raw = Tokenizer.from_file(bundled_tokenizer_path())
    raw_best = est_best = float("inf")
    tokens = est_tokens = 0
    tokenize_s = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        enc = raw.encode_batch(texts, add_special_tokens=False)
        raw_best = min(raw_best, time.perf_counter() - t)
        tokens = sum(len(e.ids) for e in enc)
        del enc
        t = time.perf_counter()
        res = estimate(EstimateConfig(input=path))
        dt = time.perf_counter() - t
        if dt < est_best:
            est_best, tokenize_s = dt, res["seconds"]["tokenize"]
        est_tokens = res["tokens"]["prompt_tokens"]
    if est_tokens != tokens:
        raise SystemExit(f"estimate counted {est_tokens} tokens, encode_batch {tokens}: not the same texts")
    raw_tps, est_tps = tokens / raw_best, tokens / est_best
    return [
        ("raw `Tokenizer.encode_batch` (chat-encoded strings)", f"{rows:,}", f"{tokens:,}", f"{raw_best:.2f}",
         f"{raw_tps:,.0f}", "1.00x"),
        ("`estimate` whole (read, encode, tokenize, pack, price)", f"{rows:,}", f"{tokens:,}", f"{est_best:.2f}",
         f"{est_tps:,.0f}", f"{est_tps / raw_tps:.2f}x"),
        ("`estimate` tokenize stage only", f"{rows:,}", f"{tokens:,}", f"{tokenize_s:.2f}",
         f"{tokens / tokenize_s:,.0f}", f"{tokens / tokenize_s / raw_tps:.2f}x"),
    ]


# ---- (b) estimate peak memory -------------------------------------------------------------------
def _child_peak(path: str) -> None:
    """Wrapper process: run the estimate CLI as its only child; print its peak RSS and time."""
    import resource

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "from batchv4.cli import main; main()", "estimate", path, "--json"], capture_output=True,
                       text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    res = json.loads(p.stdout)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024, "seconds": dt, "rows": res["input"]["rows"],
                      "tokens": res["tokens"]["prompt_tokens"]}))


def _peak_rows(sizes: list[int], tmp: str, name: str, seed: int, child: list[str]) -> list[tuple]:
    """One table row per N: a JSONL of N rows, then `python THIS_FILE *child PATH [OUT]` in a fresh
    process, which prints {peak_mib, seconds, rows, tokens} as its last line."""
    out = []
    for n in sizes:
        path = os.path.join(tmp, f"{name}-{n}.jsonl")
        write_jsonl(path, make_rows(n, seed=seed, doc_words=16, q_words=6))
        size = os.path.getsize(path)
        args = [path] if child[0] == "_peak" else [path, os.path.join(tmp, f"out-{name}-{n}")]
        p = subprocess.run([sys.executable, __file__, *child, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if r["rows"] != n:
            raise SystemExit(f"{name}: {r['rows']} rows counted for {n} input rows")
        out.append((f"{n:,}", f"{size / 2**20:,.0f}", f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                    f"{r['peak_mib']:,.0f}"))
        os.unlink(path)
    return out


def bench_memory(sizes: list[int], tmp: str) -> list[tuple]:
    return _peak_rows(sizes, tmp, "rows", 1, ["_peak"])


# ---- (c) run: time outside the engine -----------------------------------------------------------
class InstantEngine:
    """The engine interface `run` uses (`generate_stream`, `stats`), with no model: every planned
    request comes back at once with a fixed output of max_tokens tokens."""

    def __init__(self) -> None:
        self.text = "a fixed answer"

    def generate_stream(self, requests):
        from batchv4.engine.outputs import CompletionOutput, RequestOutput

        for r in requests:
            m = r.params.max_tokens
            outs = [CompletionOutput(k, self.text, [100] * m, "length") for k in range(r.params.n)]
            yield RequestOutput(r.request_id, r.prompt_token_ids, r.resume_pos, outs)

    def stats(self) -> dict:
        return {"forward_seconds": 0.0, "prefill_tokens": 0, "decode_tokens": 0, "cached_prompt_tokens": 0,
                "preemptions": 0, "snapshot_evictions": 0, "peak_snapshots": 0}


def bench_run(rows: int, max_tokens: int, tmp: str) -> list[tuple]:
    from batchv4.pipelines.run import RunConfig, run

    path = os.path.join(tmp, "run.jsonl")
    write_jsonl(path, make_rows(rows, seed=2, doc_words=60, q_words=10))
    # warm up once so neither timed run pays the one-time imports (torch, genai-prices' table)
    warm = os.path.join(tmp, "warm.jsonl")
    write_jsonl(warm, make_rows(2, seed=3))
    run(RunConfig(input=warm, output=os.path.join(tmp, "out-warm"), max_tokens=2, quiet=True),
        llm_factory=lambda cfg: InstantEngine())
    res = {}
    for name, factory in (("stand-in", lambda cfg: InstantEngine()), ("tiny", None)):
        cfg = RunConfig(input=path, output=os.path.join(tmp, f"out-{name}"), max_tokens=max_tokens, quiet=True,
                        part_rows=16)
        t = time.perf_counter()
        summary = run(cfg, llm_factory=factory)
        res[name] = (time.perf_counter() - t, summary)
    real_s, real = res["tiny"]
    stand_s, stand = res["stand-in"]
    st = real["this_run"]["seconds_by_stage"]
    tokens = real["totals"]["prompt_tokens"] + real["totals"]["completion_tokens"]
    return [
        ("real `tiny` model", f"{rows}", f"{tokens:,}", f"{real_s:.2f}", "-",
         ", ".join(f"{k} {v:.2f}" for k, v in st.items())),
        ("engine stand-in (everything outside the engine)", f"{rows}", f"{tokens:,}", f"{stand_s:.2f}",
         f"{stand_s / real_s:.1%}", ", ".join(f"{k} {v:.2f}" for k, v in stand["this_run"]["seconds_by_stage"].items())),
    ]


# ---- (d) run peak memory ------------------------------------------------------------------------
def _child_run_peak(path: str, out: str) -> None:
    """Child process: one `run` on the stand-in; print its own peak RSS and time."""
    from batchv4.pipelines.run import RunConfig, run

    t = time.perf_counter()
    res = run(RunConfig(input=path, output=out, max_tokens=4, quiet=True, part_rows=4096),
              llm_factory=lambda cfg: InstantEngine())
    dt = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": hwm_kib / 1024, "seconds": dt,
                      "rows": res["counts"]["output_rows"], "tokens": res["totals"]["prompt_tokens"]}))


def bench_run_memory(sizes: list[int], tmp: str) -> list[tuple]:
    return _peak_rows(sizes, tmp, "run", 4, ["_runpeak"])


def table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_peak":
        _child_peak(sys.argv[2])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "_runpeak":
        _child_run_peak(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000, help="rows for the estimate throughput")
    ap.add_argument("--memory-rows", default="250000,1000000", help="comma-separated row counts for peak memory")
    ap.add_argument("--run-rows", type=int, default=48)
    ap.add_argument("--run-tokens", type=int, default=16, help="max tokens per row in the run benchmark")
    ap.add_argument("--run-memory-rows", default="100000,400000", help="comma-separated row counts for run memory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated: estimate,memory,run,runmem")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"command: python benchmarks/bench_pipeline.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"cpus: {os.cpu_count()}\n")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if "estimate" not in skip:
            print("### estimate throughput vs raw tokenizers (best of %d, same chat-encoded texts)\n" % args.repeats)
            print(table(("what", "rows", "tokens", "seconds", "tokens/s", "vs raw"),
                        bench_estimate(args.rows, args.repeats, tmp)) + "\n", flush=True)
        for part, title, rows, fn in (
                ("memory", "estimate peak memory (child process, RUSAGE_CHILDREN)", args.memory_rows, bench_memory),
                ("runmem", "run peak memory (engine stand-in, child process, VmHWM)", args.run_memory_rows,
                 bench_run_memory)):
            if part not in skip:
                sizes = [int(x) for x in rows.split(",") if x]
                print(f"### {title}\n")
                print(table(("rows", "file MiB", "prompt tokens", "seconds", "peak RSS MiB"),
                            fn(sizes, tmp)) + "\n", flush=True)
        if "run" not in skip:
            print(f"### run: wall time outside the engine ({args.run_rows} rows, max {args.run_tokens} tokens)\n")
            print(table(("engine", "rows", "tokens", "wall s", "share of real run", "seconds by stage"),
                        bench_run(args.run_rows, args.run_tokens, tmp)) + "\n", flush=True)


if __name__ == "__main__":
    main()
