"""Benchmark the pipelines: `estimate` against raw `tokenizers`, its peak memory, and how much of a
`run` is spent outside the engine.

Run:  python benchmarks/bench_pipeline.py [--rows 20000] [--memory-rows 250000,1000000]
      [--run-rows 48] [--run-tokens 16] [--run-memory-rows 100000,400000] [--repeats 3]
      [--before CHECKOUT[,CHECKOUT]] [--cost-tokens 16]
      [--skip estimate,memory,run,runmem,costcheck]

(a) estimate throughput: a seeded JSONL of document-question prompts (shared prefixes, as in a
    summarization job). The same rows are chat-encoded to the exact strings the estimate tokenizes,
    and HF `tokenizers` `Tokenizer.encode_batch` encodes them (timed alone: the baseline has no
    reading, chat encoding, packing or pricing to do). The estimate runs whole (read, build,
    chat-encode, tokenize, pack, price) on the file, in a child process that imports this working
    tree's code; `--before` adds older checkouts (`git worktree add /tmp/bv4-before 87bcad5`), each
    in its own child importing that checkout (checked by module path). Each child warms up with
    one untimed estimate; then raw and every estimate alternate `--repeats` times. Reported: the
    best time of each, its ratio to raw in tokens/s (target >= 0.9x), and the median of the
    per-round ratios. "Outside the tokenizer" is (estimate seconds - its tokenize stage's seconds)
    / rows, the time with no tokenization under way; "beyond raw" is (estimate - raw) / rows.
    "Front-end work" is the same estimate with every encode looked up from a cache of the real
    tokenizer's results (`LookupEncoder`, best of 3): all the per-row work but the tokenizer's.
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
(e) costcheck: `estimate` and `run` (engine stand-in returning `--cost-tokens` tokens per row) on
    the rows of (a), with the clock fixed for both; the estimate told the stand-in's completion
    length (`output_tokens=(k, k, k)`). Its predicted API cost and API cache hits must equal what
    the run charged (the sums in its summary.json).
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
_CHILD = """
import json, os, sys, time
root, path = sys.argv[1], sys.argv[2]
# the editable install maps batchv4, batchv4.pipelines and batchv4.kernels to this repository's
# folders: point them at the checkout's (the child also runs in it, so its batchv4 comes first)
import __editable___batchv4_0_1_0_finder as finder
here = os.path.dirname(finder.MAPPING["batchv4"])
finder.MAPPING.update({k: root + v[len(here):] for k, v in finder.MAPPING.items()})
import batchv4
from batchv4.pipelines import estimate as mod
files = [batchv4.__file__, mod.__file__]
if not all(f.startswith(root + "/") for f in files):
    raise SystemExit(f"imported {files}, not {root}")
print(json.dumps({"files": files}), flush=True)
mod.estimate(mod.EstimateConfig(input=path))        # warm-up (imports, tokenizer load), untimed
for line in sys.stdin:
    if line.strip() == "lookup":                    # from now on, encodes are looked up (see LookupEncoder)
        sys.path.insert(0, sys.argv[3])
        from bench_pipeline import LookupEncoder
        from batchv4.tokenizer import load_tokenizer
        tok = load_tokenizer()
        tok._tok = LookupEncoder(tok._tok)
        continue
    t = time.perf_counter()
    res = mod.estimate(mod.EstimateConfig(input=path))
    dt = time.perf_counter() - t
    sec = res["seconds"]
    print(json.dumps({"seconds": dt, "tokenize": sec.get("tokenize_stage", sec["tokenize"]),
                      "tokens": res["tokens"]["prompt_tokens"]}), flush=True)
"""


class _Child:
    """A checkout's estimate in a child process, one timed run per `run()`."""

    def __init__(self, root: str, path: str, name: str | None = None) -> None:
        root = os.path.abspath(root)
        self.name = name or f"{os.path.basename(root)} @ " + subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        self.p = subprocess.Popen([sys.executable, "-c", _CHILD, root, path, os.path.dirname(os.path.abspath(__file__))],
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=root)
        self.files = self._read()["files"]

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the child process failed")
        return json.loads(line)

    def run(self) -> dict:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return self._read()

    def lookup(self) -> None:
        self.p.stdin.write("lookup\n")
        self.p.stdin.flush()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


class LookupEncoder:
    """Stands in for the HF tokenizer inside `V4Tokenizer`: `encode_batch(_fast)` looks up the
    encodings the real one made for the same texts (made on first sight). An estimate that uses
    it does all its own work but no tokenizing, with no tokenizer threads beside it: its time is
    the front-end's work per row, the figure least disturbed by a noisy machine."""

    def __init__(self, real) -> None:
        self.real, self.seen = real, {}

    def encode_batch_fast(self, texts, add_special_tokens=False):
        new = [t for t in texts if t not in self.seen]
        if new:
            self.seen.update(zip(new, self.real.encode_batch_fast(new, add_special_tokens=add_special_tokens)))
        return [self.seen[t] for t in texts]

    encode_batch = encode_batch_fast

    def __getattr__(self, name):
        return getattr(self.real, name)


def bench_estimate(rows: int, repeats: int, tmp: str, before: list[str]) -> list[tuple]:
    from tokenizers import Tokenizer

    from batchv4.tokenizer import bundled_tokenizer_path, encode_chat

    path = os.path.join(tmp, "estimate.jsonl")
    data = list(make_rows(rows))
    write_jsonl(path, data)
    texts = [encode_chat([{"role": "user", "content": r["prompt"]}], False) for r in data]
    del data
    raw = Tokenizer.from_file(bundled_tokenizer_path())
    # every estimate runs in a child process of its own, this checkout's too: none shares its heap
    # (and so its garbage collector's work) with this process's texts
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ests = [_Child(here, path, "this working tree")] + [_Child(root, path) for root in before]
    for e in ests:
        print(f"{e.name} imports {', '.join(e.files)}")

    def baseline(encode) -> dict:
        t = time.perf_counter()
        enc = encode(texts, add_special_tokens=False)
        return {"seconds": time.perf_counter() - t, "tokens": sum(len(e.ids) for e in enc)}

    baseline(raw.encode_batch)              # warm-up, untimed (the children warmed up as they started)
    # encode_batch_fast (no character offsets) is what V4Tokenizer calls: beside the target's
    # baseline, so the tokenizer's own share of any gain shows
    sides = [("raw", lambda: baseline(raw.encode_batch)), ("fast", lambda: baseline(raw.encode_batch_fast))]
    sides += [(e.name, e.run) for e in ests]
    best: dict[str, dict] = {}
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for _ in range(repeats):
        for name, fn in sides:               # alternate, so each side sees the same machine
            r = fn()
            times[name].append(r["seconds"])
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    # the front-end's own work: the same estimates with encodes looked up (LookupEncoder), best of 3
    work: dict[str, float] = {}
    for e in ests:
        e.lookup()
    for _ in range(3):
        for e in ests:
            work[e.name] = min(work.get(e.name, float("inf")), e.run()["seconds"])
    for e in ests:
        e.close()
    tokens = best["raw"]["tokens"]
    for name, r in best.items():
        if r["tokens"] != tokens:
            raise SystemExit(f"{name} counted {r['tokens']} tokens, encode_batch {tokens}: not the same texts")
    raw_s = best["raw"]["seconds"]
    out = [("raw `Tokenizer.encode_batch` (chat-encoded strings)", f"{rows:,}", f"{tokens:,}", f"{raw_s:.2f}",
            f"{_median(times['raw']):.2f}", f"{tokens / raw_s:,.0f}", "1.00x", "1.00x", "-", "-", "-")]
    fast = best["fast"]["seconds"]
    out.append(("raw `Tokenizer.encode_batch_fast` (same strings)", f"{rows:,}", f"{tokens:,}", f"{fast:.2f}",
                f"{_median(times['fast']):.2f}", f"{tokens / fast:,.0f}", f"{raw_s / fast:.2f}x",
                f"{_median([a / b for a, b in zip(times['raw'], times['fast'])]):.2f}x", "-", "-", "-"))
    for e in ests:
        r = best[e.name]
        outside = (r["seconds"] - r["tokenize"]) / rows * 1e6
        beyond = (r["seconds"] - raw_s) / rows * 1e6
        # each round timed raw and this side back to back: the median of their ratios
        rounds = _median([a / b for a, b in zip(times["raw"], times[e.name])])
        out.append((f"`estimate` whole, {e.name}", f"{rows:,}", f"{tokens:,}", f"{r['seconds']:.2f}",
                    f"{_median(times[e.name]):.2f}", f"{tokens / r['seconds']:,.0f}", f"{raw_s / r['seconds']:.2f}x",
                    f"{rounds:.2f}x", f"{r['tokenize']:.2f} s ({raw_s / r['tokenize']:.2f}x)",
                    f"{outside:.0f} / {beyond:.0f}", f"{work[e.name] / rows * 1e6:.0f}"))
    return out


def _median(v: list[float]) -> float:
    v = sorted(v)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2


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
    print(json.dumps({"peak_mib": peak_kib / 1024, "seconds": dt, "rows": res["input_rows"],
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


# ---- (e) predicted cost vs charged -------------------------------------------------------------
def bench_costcheck(rows: int, k: int, tmp: str) -> list[tuple]:
    from datetime import datetime, timezone

    import batchv4.pipelines.run as run_module
    from batchv4.pipelines.estimate import EstimateConfig, estimate
    from batchv4.pipelines.run import RunConfig, run

    path = os.path.join(tmp, "costcheck.jsonl")
    write_jsonl(path, make_rows(rows))       # the rows of (a)
    when = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    est = estimate(EstimateConfig(input=path, max_tokens=k, output_tokens=(k, k, k)), now=when)
    fixed, run_module._now = run_module._now, lambda: when
    try:
        summary = run(RunConfig(input=path, output=os.path.join(tmp, "out-costcheck"), max_tokens=k, quiet=True),
                      llm_factory=lambda cfg: InstantEngine())
    finally:
        run_module._now = fixed
    t = summary["totals"]
    pairs = [("API cost, USD (card " + est["card"] + f", {when.isoformat()})", est["cost_usd"]["expected"], t["cost_usd"]),
             ("api_cache_hit_tokens", est["tokens"]["api_cache_hit_tokens"], t["api_cache_hit_tokens"]),
             ("prompt_tokens", est["tokens"]["prompt_tokens"], t["prompt_tokens"]),
             ("completion_tokens", est["output_rows"] * k, t["completion_tokens"]),
             ("rows", est["output_rows"], t["rows"])]
    out = []
    for what, predicted, charged in pairs:
        diff = charged - predicted
        rel = f"{diff / charged:.1e}" if charged else "-"
        fmt = (lambda v: f"{v:.9f}") if isinstance(predicted, float) else (lambda v: f"{v:,}")
        out.append((what, fmt(predicted), fmt(charged), fmt(diff), rel))
    return out


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
    ap.add_argument("--before", default="", help="comma-separated older checkouts to time beside (a)")
    ap.add_argument("--cost-tokens", type=int, default=16, help="the stand-in's completion length in (e)")
    ap.add_argument("--skip", default="", help="comma-separated: estimate,memory,run,runmem,costcheck")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"command: python benchmarks/bench_pipeline.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"cpus: {os.cpu_count()}\n")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if "estimate" not in skip:
            print("### estimate throughput vs raw tokenizers (best of %d, same chat-encoded texts)\n" % args.repeats)
            rows = bench_estimate(args.rows, args.repeats, tmp, [b for b in args.before.split(",") if b])
            print(table(("what", "rows", "tokens", "best s", "median s", "tokens/s (best)", "vs raw (best)",
                         "vs raw (median of rounds)", "its tokenize stage (best run)",
                         "us/row outside the tokenizer / beyond raw", "us/row of front-end work (encodes looked up)"),
                        rows) + "\n", flush=True)
        for part, title, rows, fn in (
                ("memory", "estimate peak memory (child process, RUSAGE_CHILDREN)", args.memory_rows, bench_memory),
                ("runmem", "run peak memory (engine stand-in, child process, VmHWM)", args.run_memory_rows,
                 bench_run_memory)):
            if part not in skip:
                sizes = [int(x) for x in rows.split(",") if x]
                print(f"### {title}\n")
                print(table(("rows", "file MiB", "prompt tokens", "seconds", "peak RSS MiB"),
                            fn(sizes, tmp)) + "\n", flush=True)
        if "costcheck" not in skip:
            print(f"### costcheck: estimate's prediction vs what run charged ({args.rows:,} rows, engine stand-in, "
                  f"{args.cost_tokens} tokens per row)\n")
            print(table(("figure", "estimate predicted", "run charged", "charged - predicted", "relative"),
                        bench_costcheck(args.rows, args.cost_tokens, tmp)) + "\n", flush=True)
        if "run" not in skip:
            print(f"### run: wall time outside the engine ({args.run_rows} rows, max {args.run_tokens} tokens)\n")
            print(table(("engine", "rows", "tokens", "wall s", "share of real run", "seconds by stage"),
                        bench_run(args.run_rows, args.run_tokens, tmp)) + "\n", flush=True)


if __name__ == "__main__":
    main()
