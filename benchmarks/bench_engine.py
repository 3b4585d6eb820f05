"""Engine benchmark: three workloads, batchv4 beside the alternatives, in one script run.

    python benchmarks/bench_engine.py            # all parts (about 5-10 minutes on 2 cores)
    python benchmarks/bench_engine.py --part work|throughput|memory|flash|long

For each workload (benchmarks/workloads.py), with max_tokens 32 and the same settings everywhere:
- work: prefill tokens actually computed (llm.stats(), recomputes included) / tokens in the prefix
  tree (the least possible work), beside the same figure for the input's own order with an LRU
  cache of whole 16-token blocks (what vLLM's automatic prefix caching does), both with a budget
  that holds a group's working set and with one that holds only a few groups;
- throughput: end-to-end time against transformers' `generate` on the same weights, prompts and
  max_tokens, batch 16 with left padding; transformers is timed on one batch of 16 and scaled;
- memory: paged bytes per cached token against the compressed size, snapshots held, at the tiny
  and the V4-Flash geometry with a runner that does no math (`LLM(dry_run=True)`);
- work, too, is bookkeeping and runs with `dry_run` (the real scheduler and cache manager);
- long: peak memory of one 64k-token prompt (chunked prefill; no square mask in memory).
Ratios, not absolute times: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import workloads  # noqa: E402

MAX_TOKENS = 32


def loads(small: bool = False):
    if small:   # the real-math runs (CPU time)
        return {
            "a_doc_questions": workloads.shuffled(workloads.doc_questions(n_docs=2, doc_len=(1000, 2000))),
            "b_dataset_gen": workloads.shuffled(workloads.dataset_generation(n=32)),
            "c_unique": workloads.shuffled(workloads.unique_prompts(n=16)),
        }
    return {
        "a_doc_questions": workloads.shuffled(workloads.doc_questions(n_docs=12)),
        "b_dataset_gen": workloads.shuffled(workloads.dataset_generation(n=256)),
        "c_unique": workloads.shuffled(workloads.unique_prompts(n=64)),
    }


def make_llm(mem: str, **kw):
    from batchv4 import LLM

    return LLM("tiny", dtype="float32", kv_cache_memory=mem, max_num_batched_tokens=2048, max_num_seqs=32, **kw)


def run_ours(llm, prompts):
    from batchv4 import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    before = llm.stats()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t
    st = llm.stats()
    return dt, {k: st[k] - before[k] if isinstance(st[k], (int, float)) and k in before else st[k] for k in st}


def lru_prefill(prompts, capacity_tokens):
    from batchv4.packing import PackInput, naive_lru_prefill

    return naive_lru_prefill([PackInput(i, p) for i, p in enumerate(prompts)], 16, max(1, capacity_tokens // 16))


def part_work():
    """Bookkeeping only (`dry_run`: the real scheduler and cache manager, a runner without math)."""
    print("\n## Prefill work: computed / tree tokens (lower is better, 1.00 is the least possible)\n")
    print("| workload | budget | tree tokens | batchv4 (planned order) | LRU 16-token blocks, input order, same capacity | preemptions | evictions |")
    print("|---|---|---|---|---|---|---|")
    for name, prompts in loads().items():
        tree = workloads.tree_tokens(prompts)
        for label, mem, snaps in (("holds a group", "256MiB", 64), ("a few groups", "12MiB", 4)):
            llm = make_llm(mem, max_snapshots=snaps, dry_run=True)
            _, st = run_ours(llm, prompts)
            cm, lay = llm.cache, llm.layout
            cap_tokens = min(cm.pages[r].n * lay.page_size * r for r in lay.ratios)
            ours = st["prefill_tokens"] / tree
            lru = lru_prefill(prompts, cap_tokens) / tree
            print(f"| {name} | {label} | {tree:,} | {ours:.3f} | {lru:.3f} | {st['preemptions']} | "
                  f"{st['snapshot_evictions']} |", flush=True)


def hf_time(llm, prompts, repeats: int = 3):
    """transformers generate, batch 16, left padding, greedy, max_new_tokens 32; seconds per row
    (median of `repeats` runs). A 2-row, 2-token generate warms it up first (untimed)."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "model"))
    import transformers
    from hf_oracle import hf_model_like

    transformers.logging.set_verbosity_error()
    hf = hf_model_like(llm.model)

    def generate(batch, new_tokens):
        L = max(len(p) for p in batch)
        ids = torch.full((len(batch), L), 1, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=1)

    generate([p[:64] for p in prompts[:2]], 2)
    batch = prompts[:16]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(batch, MAX_TOKENS)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(batch)


def part_throughput(repeats: int = 3):
    print("\n## End-to-end time against transformers generate (tiny preset, fp32, CPU)\n")
    print(f"Both sides: median of {repeats} runs after a warm-up (batchv4: 2 prompts on the same engine, "
          "whose cache is emptied after each run; transformers: a 2-row generate)\n")
    print("| workload | rows | batchv4 s (median) | transformers s (median, 16-row batch scaled) | speedup |")
    print("|---|---|---|---|---|")
    for name, prompts in loads(small=True).items():
        llm = make_llm("256MiB")
        run_ours(llm, prompts[:2])
        dt = statistics.median(run_ours(llm, prompts)[0] for _ in range(repeats))
        per_row = hf_time(llm, prompts, repeats)
        theirs = per_row * len(prompts)
        print(f"| {name} | {len(prompts)} | {dt:.2f} | {theirs:.1f} | {theirs / dt:.1f}x |", flush=True)


def paged_overhead(llm) -> tuple[float, float]:
    """(allocated page bytes, allocated / bytes of the compressed entries actually held), now."""
    cm, lay = llm.cache, llm.layout
    filled: dict[tuple[int, int], int] = {}
    holders = [(sc.pages, n) for sid, sc in cm.seqs.items() for n in [_tokens_of(llm, sid)]]
    holders += [(s.pages, s.pos) for s in cm.snapshots.values()]
    for pages, ntok in holders:
        for r, ids in pages.items():
            entries = ntok // r
            for k, p in enumerate(ids):
                filled[(r, p)] = max(filled.get((r, p), 0), min(lay.page_size, entries - k * lay.page_size))
    used = sum(cnt for cnt in filled.values())
    if not used:
        return 0.0, float("nan")
    alloc = sum(lay.bytes_per_page(r) for (r, _p) in filled)
    per_entry = sum(lay.bytes_per_page(r) / lay.page_size * cnt for (r, _p), cnt in filled.items())
    return alloc, alloc / per_entry


def _tokens_of(llm, sid) -> int:
    for s in llm.scheduler.running:
        if s.seq_id == sid:
            return s.num_computed
    return 0


def part_memory(page_sizes=(16,)):
    print("\n## Cache memory: paged bytes per cached token vs compressed size, snapshots\n")
    print("| geometry | workload | page size | allocated / compressed (at peak allocation) | peak snapshots | "
          "snapshot bytes each | paged bytes per token (full pages) |")
    print("|---|---|---|---|---|---|---|")
    from batchv4 import SamplingParams

    for geom, page, (name, prompts) in [(g, ps, w) for g in ("tiny", "V4-Flash") for ps in page_sizes
                                        for w in loads().items()]:
            from batchv4 import LLM

            model = "tiny" if geom == "tiny" else "deepseek-v4-flash"
            llm = LLM(model, dtype="bfloat16", kv_cache_memory="8GiB", max_num_batched_tokens=2048,
                      max_num_seqs=32, page_size=page, dry_run=True)
            worst = [0.0, 1.0]       # at the step where allocated page bytes peak
            orig = llm.runner.execute

            def spy(plan, _orig=orig):
                out = _orig(plan)
                alloc, v = paged_overhead(llm)
                if alloc > worst[0]:
                    worst[:] = [alloc, v]
                return out

            llm.runner.execute = spy
            llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
            st = llm.stats()
            print(f"| {geom} | {name} | {page} | {worst[1]:.3f} | {st['peak_snapshots']} | "
                  f"{st['bytes_per_snapshot'] / 2**20:.2f} MiB | {st['page_bytes_per_token']:.0f} B |", flush=True)


LONG_CHILD = r"""
import resource, torch, sys
from batchv4 import LLM, SamplingParams
llm = LLM("test", dtype="float32", kv_cache_memory="1GiB", max_num_batched_tokens=2048, page_size=64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prompt = torch.randint(3, 512, (65536,), generator=torch.Generator().manual_seed(0)).tolist()
import time; t = time.perf_counter()
out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, dt, out[0].outputs[0].finish_reason)
"""


def part_long():
    print("\n## One 65,536-token prompt (test preset, fp32, chunks of 2,048)\n")
    r = subprocess.run([sys.executable, "-c", LONG_CHILD], capture_output=True, text=True, check=True)
    base, peak, dt, fr = r.stdout.split()
    dense = 65536 * 65536 * 4
    print(f"peak RSS {int(peak) / 1024:.0f} MiB ({(int(peak) - int(base)) / 1024:.0f} MiB above the loaded model), "
          f"prefill {float(dt):.0f} s, finish {fr}; a dense fp32 [L, L] mask alone would be {dense / 2**30:.0f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["work", "throughput", "memory", "long", "all"], default="all")
    ap.add_argument("--page-sizes", default="8", help="comma-separated page sizes (entries) for --part memory")
    a = ap.parse_args()
    sizes = tuple(int(x) for x in a.page_sizes.split(",") if x)
    parts = {"work": part_work, "throughput": part_throughput, "memory": lambda: part_memory(sizes),
             "long": part_long}
    for name, fn in parts.items():
        if a.part in (name, "all"):
            fn()


if __name__ == "__main__":
    main()
