"""The model's speed: prefill throughput of the packed forward, and how long a seeded build takes.

    python benchmarks/bench_model.py [--part forward|build|all] [--reps 3]

forward: achieved GFLOP/s against a plain torch.matmul of the same dtype measured in the same run,
with transformers' forward on the same weights beside it. FLOPs are counted by torch's
FlopCounterMode on one forward (the matmuls and einsums the model really runs), then the forward is
timed without the counter. Both sides do the same work: the whole prefill, and logits only at the
last position of each sequence (ours through `ForwardBatch.logits_indices`, transformers' through
`logits_to_keep=1`); a full-vocabulary head at every position would dominate the tiny preset.
build: the seeded random build of the tiny preset, median of `--build-reps` (default 5): the
previous init (one generator over all tensors, float32 temporaries, a randperm per routing-table
row; kept below as `init_random_before`) against `init_random` and `Transformer.random`, and a
whole `LLM("tiny")` with each.
Ratios, not absolute times, are the result: this machine is shared and noisy.
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
            # the same work as ours: the whole prefill, logits at each sequence's last position
            with torch.no_grad():
                return hf(ids, logits_to_keep=1).logits                       # [seqs, 1, V]

        res["transformers_s"] = median_time(theirs, reps)
        res["speedup_vs_transformers"] = res["transformers_s"] / t_ours
    return res


@torch.no_grad()
def init_random_before(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """`Transformer.init_random` as it was, for the before/after figure: one generator drawn in
    parameter order, float32 temporaries copied in, a randperm per routing-table row."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("_base", "attn_sink", ".bias", "ape")):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("_scale") or "norm" in name:
            p.copy_(torch.ones(p.shape) + torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            E = model.cfg.n_routed_experts
            b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def bench_build(reps: int) -> None:
    from batchv4.engine.llm import LLM

    cfg = ModelConfig.load("tiny")

    def med(fn) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    before = med(lambda: init_random_before(Transformer(cfg), 0))
    after = med(lambda: Transformer(cfg).init_random(0))
    direct = med(lambda: Transformer.random(cfg, 0))
    llm_after = med(lambda: LLM("tiny"))
    new_random = Transformer.random
    # the engine's previous build of a preset: float32 init, then a conversion to (device, dtype)
    Transformer.random = classmethod(lambda cls, c, seed=0, layers=None, *, dtype=torch.float32, device="cpu",
                                     std=0.02, **b: init_random_before(cls(c, layers, **b), seed, std).to(device, dtype))
    try:
        llm_before = med(lambda: LLM("tiny"))
    finally:
        Transformer.random = new_random
    print(f"seeded build of the tiny preset ({sum(p.numel() for p in Transformer(cfg).parameters()) / 1e6:.1f} M "
          f"parameters), median of {reps}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | before s | after s | speedup |")
    print("|---|---|---|---|")
    print(f"| Transformer(cfg).init_random(0) | {before:.2f} | {after:.2f} | {before / after:.1f}x |")
    print(f"| Transformer.random(cfg, 0) | {before:.2f} | {direct:.2f} | {before / direct:.1f}x |")
    print(f"| LLM(\"tiny\") (tokenizer, 512 MiB of cache pools included) | {llm_before:.2f} | {llm_after:.2f} | "
          f"{llm_before / llm_after:.1f}x |", flush=True)


def bench_forward(reps: int) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    runs = [
        (ModelConfig.load("tiny"), 4, 256, torch.float32, True),
        (ModelConfig(**WIDE), 2, 512, torch.float32, True),
        (ModelConfig(**WIDE), 2, 512, torch.bfloat16, False),
    ]
    print("prefill of `tokens` in `tokens / seqs`-token sequences; logits at each sequence's last position "
          "(ours: logits_indices, transformers: logits_to_keep=1)")
    print("| config | dtype | tokens | GFLOP | ours GFLOP/s | matmul GFLOP/s | fraction | vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg, seqs, n, dt, hf in runs:
        r = bench(cfg, seqs, n, reps, dt, hf)
        vs = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "-"
        print(f"| {r['config']} | {r['dtype']} | {r['tokens']} | {r['gflop']:.1f} | {r['ours_gflops']:.1f} | "
              f"{r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | {vs} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("forward", "build", "all"), default="all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build-reps", type=int, default=5)
    args = ap.parse_args()
    if args.part in ("build", "all"):
        bench_build(args.build_reps)
    if args.part in ("forward", "all"):
        bench_forward(args.reps)


if __name__ == "__main__":
    main()
