"""Prefill throughput of the packed forward, as achieved GFLOP/s against a plain torch.matmul of
the same dtype measured in the same run, with transformers' forward on the same weights beside it.

    python benchmarks/bench_model.py [--reps 3]

FLOPs are counted by torch's FlopCounterMode on one forward (the matmuls and einsums the model
really runs), then the forward is timed without the counter. Ratios, not absolute times, are the
result: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from batchv4.config import ModelConfig
from batchv4.model.forward_batch import CachePools, ForwardBatch
from batchv4.model.model import Transformer

WIDE = dict(vocab_size=4096, dim=1024, n_layers=4, n_heads=8, head_dim=256, rope_head_dim=64, q_lora_rank=512,
            o_groups=2, o_lora_rank=512, window_size=128, compress_ratios=(0, 128, 4, 128), index_n_heads=8,
            index_head_dim=64, index_topk=64, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=1024,
            n_hash_layers=1, n_mtp_layers=0, original_seq_len=4096, rope_factor=4.0, name="wide")


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_gflops(dim: int, dtype, reps: int) -> float:
    a = torch.randn(2048, dim, dtype=dtype)
    b = torch.randn(dim, dim, dtype=dtype)
    t = median_time(lambda: a @ b, reps * 3)
    return 2 * 2048 * dim * dim / t / 1e9


def bench(cfg: ModelConfig, seqs: int, seq_len: int, reps: int, dtype, with_hf: bool) -> dict:
    torch.manual_seed(0)
    model = Transformer(cfg).init_random(0).to(dtype).eval()
    layout = model.cache_layout(dtype, page_size=64)
    pages = {r: seqs * layout.pages_for(r, seq_len) + 1 for r in layout.ratios}
    ids = torch.randint(3, cfg.vocab_size, (seqs, seq_len))
    table = {r: [list(range(i * layout.pages_for(r, seq_len), (i + 1) * layout.pages_for(r, seq_len)))
                 for i in range(seqs)] for r in layout.ratios}

    def ours():
        pools = CachePools.allocate(layout, seqs, pages)
        fb = ForwardBatch.build([(ids[i].tolist(), 0, i) for i in range(seqs)], table)
        return model(fb, pools)

    with FlopCounterMode(display=False) as fc:
        ours()
    flops = fc.get_total_flops()
    t_ours = median_time(ours, reps)
    res = {"config": cfg.name, "dtype": str(dtype).replace("torch.", ""), "tokens": seqs * seq_len,
           "gflop": flops / 1e9, "ours_s": t_ours, "ours_gflops": flops / t_ours / 1e9,
           "matmul_gflops": matmul_gflops(cfg.dim, dtype, reps)}
    res["fraction_of_matmul"] = res["ours_gflops"] / res["matmul_gflops"]
    if with_hf:
        import sys

        sys.path.insert(0, "tests/model")
        from hf_oracle import hf_model_like

        hf = hf_model_like(model.float()).to(dtype)
        model.to(dtype)

        def theirs():
            with torch.no_grad():
                return hf(ids).logits

        res["transformers_s"] = median_time(theirs, reps)
        res["speedup_vs_transformers"] = res["transformers_s"] / t_ours
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    runs = [
        (ModelConfig.load("tiny"), 4, 256, torch.float32, True),
        (ModelConfig(**WIDE), 2, 512, torch.float32, True),
        (ModelConfig(**WIDE), 2, 512, torch.bfloat16, False),
    ]
    print("| config | dtype | tokens | GFLOP | ours GFLOP/s | matmul GFLOP/s | fraction | vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg, seqs, n, dt, hf in runs:
        r = bench(cfg, seqs, n, args.reps, dt, hf)
        vs = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "-"
        print(f"| {r['config']} | {r['dtype']} | {r['tokens']} | {r['gflop']:.1f} | {r['ours_gflops']:.1f} | "
              f"{r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | {vs} |", flush=True)


if __name__ == "__main__":
    main()
