"""Summarize (issue 14): memory of one long single pass, and the instructions' reuse over a corpus.

    .venv/bin/python benchmarks/bench_summarize.py memory   # 16k vs 128k tokens, `test` preset
    .venv/bin/python benchmarks/bench_summarize.py corpus   # 20 long documents through summarize

`memory`: each size runs in a fresh child process (so peak RSS is its own): `LLM("test")` with one
EngineRequest of N random token ids (chunked prefill at --max-batched-tokens 2048), 4 tokens out;
reports wall time, VmHWM (peak RSS), the cache's bytes per token and bytes held, and peak RSS minus
the cache's bytes. `corpus`: `pipelines.summarize` over 20 documents of ~3,000 tokens (standard-
library docstrings in different orders) on the folded `test` engine (tests/cli/cli_engines.py);
reports prefill computed / prompt tokens submitted, per round and in all.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(n: int) -> None:
    import torch

    from batchv4.engine.llm import LLM
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.engine.scheduler import EngineRequest

    torch.set_num_threads(2)
    llm = LLM("test", dtype="float32", device="cpu", kv_cache_memory="1GiB", max_model_len=n + 64,
              max_num_batched_tokens=2048, max_num_seqs=1)
    base = _vm("VmHWM")
    rng = random.Random(0)
    ids = [rng.randrange(2, 512) for _ in range(n)]
    t0 = time.perf_counter()
    outs = list(llm.generate_stream([EngineRequest("doc", ids, SamplingParams(max_tokens=4, temperature=0.0))]))
    wall = time.perf_counter() - t0
    st = llm.stats()
    per_token = llm.layout.bytes_per_token()
    cache = per_token * n                          # pages of compressed entries for the document
    print(json.dumps({"tokens": n, "wall_seconds": wall, "peak_rss": _vm("VmHWM"), "rss_after_build": base,
                      "completion_tokens": len(outs[0].outputs[0].token_ids), "bytes_per_token": per_token,
                      "cache_bytes": cache, "peak_rss_minus_cache": _vm("VmHWM") - cache,
                      "stats": {k: v for k, v in st.items() if isinstance(v, (int, float))}}))


def memory() -> None:
    rows = []
    for n in (16384, 32768, 65536, 131072):
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        p = subprocess.run([sys.executable, __file__, "child", str(n)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(json.dumps(r))
    for r in rows:
        print(f"{r['tokens']:>7,} tokens: {r['wall_seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
              f"cache {r['cache_bytes'] / 2**20:.1f} MiB, peak RSS minus cache {r['peak_rss_minus_cache'] / 2**20:.0f} MiB")
    a, b = rows[0], rows[-1]
    print(f"peak RSS minus cache: {a['peak_rss_minus_cache'] / 2**20:.0f} MiB vs "
          f"{b['peak_rss_minus_cache'] / 2**20:.0f} MiB")
    print(f"peak RSS: {a['peak_rss'] / 2**20:.0f} MiB at {a['tokens']:,} tokens, {b['peak_rss'] / 2**20:.0f} MiB at "
          f"{b['tokens']:,} tokens; growth {(b['peak_rss'] - a['peak_rss']) / 2**20:.0f} MiB for "
          f"{b['tokens'] - a['tokens']:,} more tokens = {(b['peak_rss'] - a['peak_rss']) / (b['tokens'] - a['tokens']):.0f} "
          f"B/token; time {a['wall_seconds']:.1f} s vs {b['wall_seconds']:.1f} s "
          f"(ratio {b['wall_seconds'] / a['wall_seconds']:.2f} for 8x the tokens)")


def corpus() -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "cli"))
    import cli_engines

    import batchv4.pipelines.run as run_mod
    from batchv4.pipelines.run_config import RunConfig
    from batchv4.pipelines.summarize import SummarizeConfig, summarize

    torch.set_num_threads(2)
    run_mod._default_llm = cli_engines.folded_llm
    mods = ["re", "json", "argparse", "unittest", "doctest", "inspect", "typing", "subprocess", "difflib"]
    texts = {m: inspect.getdoc(importlib.import_module(m)) or "" for m in mods}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.jsonl")
        with open(path, "w") as f:
            for i in range(20):
                order = rng.sample(mods, 5)
                f.write(json.dumps({"id": f"d{i:02d}", "text": "\n\n".join(texts[m] for m in order)}) + "\n")
        t0 = time.perf_counter()
        s = summarize(SummarizeConfig(RunConfig(input=path, output=os.path.join(tmp, "out"), model="test",
                                                device="cpu", max_model_len=1024, quiet=True),
                                      max_summary_tokens=64))
        wall = time.perf_counter() - t0
    submitted = s["totals"]["prompt_tokens"]
    computed = s["this_run"]["prefill_tokens_computed"]
    for r in s["rounds"]:
        print(f"{r['round']}: {r['rows']} rows, prefill computed {r['prefill_tokens_computed']:,}, "
              f"cached {r['cached_prompt_tokens']:,}")
    print(f"{s['counts']['documents']} documents, {s['counts']['chunks']} chunks, {s['counts']['merges']} merges; "
          f"prompt tokens submitted {submitted:,}, prefill computed {computed:,} ({computed / submitted:.3f}); "
          f"instruction prefix {s['cache']['instruction_prefix_tokens']} tokens; api cache hits "
          f"{s['totals']['api_cache_hit_tokens']:,}; wall {wall:.1f} s")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "memory"
    if what == "child":
        child(int(sys.argv[2]))
    elif what == "corpus":
        corpus()
    else:
        memory()
