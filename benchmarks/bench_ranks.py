"""Two ranks (attention data-parallel, experts expert-parallel over gloo) against one process on
the same workload, and the bytes the expert exchange sends per MoE layer per token against the
activation size (the floor: each token's hidden state must reach its experts' ranks and come back).

    python benchmarks/bench_ranks.py [--model test] [--prompts 32] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from batchv4.engine.llm import LLM
from batchv4.engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="test")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one process (ranks get 1 each)")
    a = ap.parse_args()
    ps = [{"prompt_token_ids": [(11 * i + 5 * j) % 400 + 2 for j in range(48 + i % 16)]} for i in range(a.prompts)]
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True) \
        if "ignore_eos" in SamplingParams.__dataclass_fields__ else SamplingParams(max_tokens=a.max_tokens, temperature=0)
    eng = dict(device="cpu", kv_cache_memory="64MiB", max_num_seqs=64)
    rows = []
    torch.set_num_threads(a.threads)
    one = LLM(a.model, **eng)
    one.generate(ps[:2], sp)                     # warm-up
    s0 = one.stats()["steps"]
    t = time.perf_counter()
    r1 = one.generate(ps, sp)
    rows.append(("1 process", a.threads, time.perf_counter() - t, one.stats()["steps"] - s0))
    del one
    torch.set_num_threads(1)
    g = LLM(a.model, **eng, data_parallel_size=2, enable_expert_parallel=True)
    g.generate(ps[:2], sp)
    s0 = [s["steps"] for s in g.stats()["ranks"]]
    b0 = g.stats()
    t = time.perf_counter()
    r2 = g.generate(ps, sp)
    dt = time.perf_counter() - t
    st = g.stats()
    rows.append(("2 ranks (EP)", 1, dt, max(s["steps"] - x for s, x in zip(st["ranks"], s0))))
    same = all(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(r1, r2))
    sent = st["exchange_bytes_sent"] - b0["exchange_bytes_sent"]
    tl = st["exchange_token_layers"] - b0["exchange_token_layers"]
    act = st["exchange_activation_bytes"] - b0["exchange_activation_bytes"]
    g.close()
    tokens = sum(len(p["prompt_token_ids"]) for p in ps) + a.prompts * a.max_tokens
    print(f"model {a.model}, {a.prompts} prompts, {a.max_tokens} new tokens each, {tokens:,} tokens; same tokens: {same}")
    print("| setup | threads per rank | wall s | steps | ms per step |")
    print("|---|---|---|---|---|")
    for name, th, w, n in rows:
        print(f"| {name} | {th} | {w:.2f} | {n} | {1000 * w / max(n, 1):.1f} |")
    print(f"ratio (2 ranks / 1 process wall): {rows[1][2] / rows[0][2]:.2f}x")
    print(f"exchange: {sent / max(tl, 1):,.0f} B sent to the other rank per MoE layer per token "
          f"(dispatch + combine), activation {act / max(tl, 1):,.0f} B per token")


if __name__ == "__main__":
    main()
