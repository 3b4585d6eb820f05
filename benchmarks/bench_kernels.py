"""Benchmark of batchv4's Triton kernels against their torch references at V4-Flash shapes.

Owns: a correctness gate (every kernel against its `*_ref` on the device; exit 1 on mismatch),
then timings of each kernel, its torch reference and, where a user would try it,
`torch.compile(reference)`, reported as ms, TFLOP/s, GB/s, arithmetic intensity, the binding
roofline limit and the fraction of it reached. Bytes are the essential traffic (inputs read
once, outputs written once; gathered keys counted per distinct sequence), not what a given
implementation happens to move.
Does not own: the kernels or references (batchv4.kernels), end-to-end model benchmarks.

    python benchmarks/bench_kernels.py --out benchmarks/kernels.md     # CUDA machine, < ~4 min
    python benchmarks/bench_kernels.py --cpu-smoke                       # interpreter gate, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

PEAKS = {"bf16-tc": 989e12, "fp8-tc": 1979e12, "fp32": 67e12}  # H200 dense FLOP/s; --hbm-tbs for bytes
FLASH = dict(hidden=4096, experts=256, topk=6, inter=2048, heads=64, head_dim=512, window=128,
             attn_topk=512, idx_heads=64, idx_dim=128, hc=4, context=65536, page=64,
             tokens=(1, 8, 64, 512, 4096), quick_tokens=(1, 64, 4096), moe_other_tokens=(64, 4096),
             decode_batches=(1, 8, 64), prefill_tokens=4096, quant_k=8192,
             linears=((1024, 4096, "wq_a"), (4096, 8192, "wo_b")), pool_d=512, hca_ratio=128,
             pool_lengths=(4096, 65536), mhc_tokens=(1, 64, 4096, 16384))
# Same structure, interpreter-sized: `--cpu-smoke --timings` runs the whole harness on CPU.
TINY = dict(hidden=64, experts=4, topk=2, inter=32, heads=4, head_dim=64, window=8, attn_topk=8,
            idx_heads=4, idx_dim=32, hc=4, context=128, page=4, tokens=(1, 9), quick_tokens=(1, 9),
            moe_other_tokens=(9,), decode_batches=(1, 3), prefill_tokens=8, quant_k=256,
            linears=((64, 256, "tiny"),), pool_d=16, hca_ratio=8, pool_lengths=(64,), mhc_tokens=(1, 17))


@dataclass
class Case:
    kernel: str
    shape: str
    flops: float
    bytes: float
    peak: str  # key of PEAKS: the compute unit the kernel's math runs on
    impls: dict = field(default_factory=dict)  # label -> zero-argument callable, or ("compile", ref, args)
    ref_ms: float | None = None


# ---- correctness gate ------------------------------------------------------------------------------

def gate(torch, dev, tiny: bool) -> list[tuple[str, bool, str]]:
    from batchv4.kernels import compressor, fp8_gemm, indexer, mhc, moe, sparse_attn
    from batchv4.kernels.quant import quantize_fp4, quantize_fp8_block

    bf = torch.bfloat16
    results = []

    def check(name, fn):
        try:
            err = fn()
            results.append((name, err is None, err or "ok"))
        except Exception as exc:  # a crash is a failed gate, and the run goes on
            results.append((name, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
        print(f"gate {name}: {results[-1][2]}", file=sys.stderr, flush=True)

    def rel(out, ref, tol):
        out, ref = out.float(), ref.float()
        e = ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
        m = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
        return None if e <= tol and m <= 4 * tol else f"rel err {e:.2e}, max err {m:.2e} of max (tol {tol})"

    def moe_case(fmt, t):
        d, i, e, k = (64, 32, 4, 2) if tiny else (512, 256, 16, 4)
        x = torch.randn(t, d, device=dev, dtype=bf)
        ids = torch.rand(t, e, device=dev).topk(k).indices.int()
        ids[0, -1] = -1
        w = torch.rand(t, k, device=dev)
        ws = {n: torch.randn(e, *s, device=dev) / s[1] ** 0.5
              for n, s in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i)))}
        if fmt == "bf16":
            ws = {n: v.to(bf) for n, v in ws.items()}
        else:
            quant = quantize_fp8_block if fmt == "fp8" else quantize_fp4
            ws = {n2: v2 for n, v in ws.items() for n2, v2 in zip((n, n + "_scale"), quant(v))}
        out = moe.fused_moe(x, ids, w, swiglu_limit=10.0, use_triton=True, **ws)
        return rel(out, moe.fused_moe_ref(x, ids, w, swiglu_limit=10.0, **ws), 1e-2)

    for fmt in ("bf16", "fp8", "fp4"):
        for t in ((1, 9) if tiny else (1, 33, 600)):
            check(f"moe {fmt} T={t}", lambda fmt=fmt, t=t: moe_case(fmt, t))

    def fp8_case(m):
        kdim, n = (200, 150) if tiny else (1000, 700)
        x = torch.randn(m, kdim, device=dev, dtype=bf) * torch.exp2(torch.randint(-12, 6, (m, kdim), device=dev))
        q, s = fp8_gemm.act_quant(x, use_triton=True)
        q_ref, s_ref = fp8_gemm.act_quant_ref(x)
        if not (torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())):
            return "act_quant differs from act_quant_ref"
        w, ws = quantize_fp8_block(torch.randn(n, kdim, device=dev))
        return rel(fp8_gemm.fp8_gemm(q, s, w, ws, use_triton=True), fp8_gemm.fp8_gemm_ref(q, s, w, ws), 5e-3)

    for m in ((3,) if tiny else (1, 100, 1000)):
        check(f"fp8 act_quant+gemm M={m}", lambda m=m: fp8_case(m))

    def attn_case(mode, prefill):
        h, dh, win, p, topk, b = (4, 64, 8, 4, 5, 3) if tiny else (64, 512, 128, 16, 64, 3)
        slots, pages = b + 1, b * 16 + 2
        wkv = torch.randn(slots, win, dh, device=dev, dtype=bf)
        ckv = torch.randn(pages, p, dh, device=dev, dtype=bf)
        table = torch.randperm(pages, device=dev)[: b * 16].view(b, 16).int()
        slot = torch.randperm(slots, device=dev)[:b].int()
        sink = torch.randn(h, device=dev)
        if prefill:
            lens = [3, 0, 6] if tiny else [70, 0, 200]
            starts = [0, 5, 2 * win + 3]
            pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).int().to(dev)
            cu = torch.tensor([0, lens[0], lens[0] + lens[1], sum(lens)], device=dev).int()
        else:
            pos = torch.tensor([2, win + 5, 4 * win], device=dev).int()
        rows = pos.numel()
        q = torch.randn(rows, h, dh, device=dev, dtype=bf)
        n_vis = (pos.long() + 1) // 4
        kw = {}
        if mode == "csa":
            idx = (torch.rand(rows, topk, device=dev) * n_vis[:, None]).long().int()
            kw["topk_idx"] = torch.where(torch.rand(rows, topk, device=dev) < 0.2, -1, idx).int()
        elif mode == "hca":
            kw["n_comp"] = torch.minimum(n_vis, torch.tensor(16 * p, device=dev)).int()
        if prefill:
            args = (q, cu, pos, torch.randn(rows, dh, device=dev, dtype=bf), wkv, slot, ckv, table, sink, dh**-0.5)
            out = sparse_attn.sparse_attn_prefill(*args, use_triton=True, **kw)
            return rel(out, sparse_attn.sparse_attn_prefill_ref(*args, **kw), 1e-2)
        args = (q, pos, wkv, slot, ckv, table, sink, dh**-0.5)
        return rel(sparse_attn.sparse_attn_decode(*args, use_triton=True, **kw),
                   sparse_attn.sparse_attn_decode_ref(*args, **kw), 1e-2)

    for mode in ("window", "csa", "hca"):
        for prefill in (False, True):
            check(f"sparse_attn {mode} {'prefill' if prefill else 'decode'}",
                  lambda mode=mode, prefill=prefill: attn_case(mode, prefill))

    def indexer_case(integer, splits):
        hi, di, p, topk = (4, 32, 4, 6) if tiny else (64, 128, 16, 64)
        draw = (lambda *s: torch.randint(-2, 3, s, device=dev).float()) if integer else \
            (lambda *s: torch.randn(*s, device=dev))
        kpool = draw(40, p, di).to(bf)
        q, w = draw(5, hi, di).to(bf), draw(5, hi)
        table = torch.randperm(40, device=dev)[:40].view(2, 20).int()
        pos = torch.tensor([2, 21, 3, 40, 4 * 20 * p - 1], device=dev).int()
        cu = torch.tensor([0, 2, 5], device=dev).int()
        seq = torch.tensor([0, 0, 1, 1, 1], device=dev).int()
        out = indexer.indexer_topk_triton(q, w, kpool, table, pos, topk, seq, num_splits=splits)
        ref = indexer.indexer_topk_ref(q, w, kpool, table, pos, topk, cu)
        if integer:  # exact scores: indices must match exactly, ties included
            return None if torch.equal(out, ref) else "indices differ from indexer_topk_ref"
        # bf16 tensor-core dots reorder fp32 sums: compare the reference scores of the picks.
        keys = kpool.float()[table.long()].flatten(1, 2)  # [B, entries, Di]
        sc = torch.einsum("thd,tnd->thn", q.float(), keys[seq.long()]).relu().mul(w[:, :, None]).sum(1)
        got = torch.gather(sc, 1, out.clamp(min=0).long()).masked_fill(out < 0, 0)
        want = torch.gather(sc, 1, ref.clamp(min=0).long()).masked_fill(ref < 0, 0)
        return None if torch.equal(out < 0, ref < 0) and torch.allclose(got, want, rtol=1e-2, atol=1e-2) \
            else "selected scores differ from the reference's top-k"

    for integer in (True, False):
        for splits in (1, 3):
            check(f"indexer {'exact' if integer else 'random'} splits={splits}",
                  lambda integer=integer, splits=splits: indexer_case(integer, splits))

    def pool_case(overlap):
        d, ratio, length = (8, 4, 19) if tiny else (512, 4 if overlap else 128, 1000)
        c = 2 if overlap else 1
        a, g = torch.randn(length, c * d, device=dev), torch.randn(length, c * d, device=dev) * 3
        return rel(compressor.compress_pool(a, g, ratio, overlap, use_triton=True),
                   compressor.compress_pool_ref(a, g, ratio, overlap), 1e-5)

    check("compressor hca", lambda: pool_case(False))
    check("compressor csa", lambda: pool_case(True))

    def stats_case():
        # what the model's streaming compressor runs: a chunk that starts inside a block
        width, ratio, length, offset = (16, 4, 19, 3) if tiny else (1024, 4, 1000, 3)
        a, g = torch.randn(length, width, device=dev), torch.randn(length, width, device=dev) * 3
        out = compressor.block_stats(a, g, ratio, offset, use_triton=True)
        ref = compressor.block_stats_ref(a, g, ratio, offset)
        if not torch.equal(out[:, 0], ref[:, 0]):
            return "block maxima differ from block_stats_ref"
        return rel(out[:, 1:], ref[:, 1:], 1e-5)

    check("compressor block_stats offset", stats_case)

    def mhc_case():
        t, n, d = (5, 4, 64) if tiny else (300, 4, 1024)
        x = torch.randn(t, n, d, device=dev, dtype=bf)
        fn = torch.randn(n * (n + 2), n * d, device=dev) / (n * d) ** 0.5
        base, scale = torch.randn(n * (n + 2), device=dev), torch.rand(3, device=dev) + 0.5
        got = mhc.mhc_pre(x, fn, base, scale, iters=20, use_triton=True)
        want = mhc.mhc_pre_ref(x, fn, base, scale, iters=20)
        errs = [rel(a, b, tol) for a, b, tol in zip(got, want, (4e-3, 1e-4, 1e-4))]
        y = torch.randn(t, d, device=dev, dtype=bf)
        errs.append(rel(mhc.mhc_post(y, x, want[1], want[2], use_triton=True), mhc.mhc_post_ref(y, x, *want[1:]), 4e-3))
        bad = [f"{n}: {e}" for n, e in zip(("u", "post", "comb", "post-mix"), errs) if e]
        return "; ".join(bad) or None

    check("mhc pre+post", mhc_case)
    return results


# ---- timed cases at V4-Flash shapes --------------------------------------------------------------------

def build_cases(torch, dev, quick: bool, f: dict) -> list:
    """Each entry is (section, builder): builders allocate lazily so one section's memory is freed first."""
    from batchv4.kernels import compressor, fp8_gemm, indexer, mhc, moe, sparse_attn

    bf = torch.bfloat16
    tokens = f["quick_tokens"] if quick else f["tokens"]
    sections = []

    def moe_section(fmt, token_list):
        d, i, e, k = f["hidden"], f["inter"], f["experts"], f["topk"]
        ws = {}
        for n, shape in (("w1", (e, i, d)), ("w3", (e, i, d)), ("w2", (e, d, i))):
            if fmt == "fp4":
                ws[n] = torch.randint(0, 256, (*shape[:2], shape[2] // 2), device=dev, dtype=torch.uint8)
                ws[n + "_scale"] = torch.exp2(torch.randint(-9, -5, (*shape[:2], shape[2] // 32), device=dev).float())
            elif fmt == "fp8":
                ws[n] = (torch.randn(shape, device=dev, dtype=bf) * 64).to(torch.float8_e4m3fn)
                ws[n + "_scale"] = torch.full((e, -(-shape[1] // 128), -(-shape[2] // 128)), 2.0**-12, device=dev)
            else:
                ws[n] = torch.randn(shape, device=dev, dtype=bf) / 64
        bpw = {"fp4": 0.5 + 4 / 32, "fp8": 1 + 4 / 128**2, "bf16": 2}[fmt]
        cases = []
        for t in token_list:
            x = torch.randn(t, d, device=dev, dtype=bf)
            ids = torch.rand(t, e, device=dev).topk(k).indices.int()
            w = torch.rand(t, k, device=dev)
            active = torch.unique(ids).numel()
            c = Case(f"fused_moe {fmt}", f"T={t} E={e} k={k} D={d} I={i}", 2 * t * k * 3 * d * i,
                     active * 3 * d * i * bpw + 2 * t * d * 2, "bf16-tc")
            c.impls["triton"] = lambda x=x, ids=ids, w=w: moe.fused_moe(x, ids, w, swiglu_limit=10.0, use_triton=True, **ws)
            c.impls["torch ref"] = lambda x=x, ids=ids, w=w: moe.fused_moe_ref(x, ids, w, swiglu_limit=10.0, **ws)
            cases.append(c)
        return cases

    sections.append(("moe fp4", lambda: moe_section("fp4", tokens)))
    sections.append(("moe fp8", lambda: moe_section("fp8", f["moe_other_tokens"])))
    sections.append(("moe bf16", lambda: moe_section("bf16", f["moe_other_tokens"])))

    def fp8_section():
        cases = []
        for n, kdim, what in f["linears"]:
            w = (torch.randn(n, kdim, device=dev, dtype=bf) * 64).to(torch.float8_e4m3fn)
            ws = torch.full((-(-n // 128), -(-kdim // 128)), 2.0**-12, device=dev)
            for m in tokens:
                x = torch.randn(m, kdim, device=dev, dtype=bf)
                xq, xs = fp8_gemm.act_quant_ref(x)
                c = Case("fp8_gemm", f"{what} M={m} N={n} K={kdim}", 2 * m * n * kdim,
                         m * kdim + n * kdim + m * n * 2 + (m + n) * kdim / 128 * 4, "fp8-tc")
                c.impls["triton"] = lambda xq=xq, xs=xs, w=w, ws=ws: fp8_gemm.fp8_gemm(xq, xs, w, ws, use_triton=True)
                c.impls["torch ref"] = lambda xq=xq, xs=xs, w=w, ws=ws: fp8_gemm.fp8_gemm_ref(xq, xs, w, ws)
                c.impls["torch.compile(ref)"] = ("compile", fp8_gemm.fp8_gemm_ref, (xq, xs, w, ws))
                cases.append(c)
        kq = f["quant_k"]
        for m in tokens[-2:]:
            x = torch.randn(m, kq, device=dev, dtype=bf)
            c = Case("act_quant", f"M={m} K={kq}", 4 * m * kq, m * kq * 3 + m * kq / 128 * 4, "fp32")
            c.impls["triton"] = lambda x=x: fp8_gemm.act_quant(x, use_triton=True)
            c.impls["torch ref"] = lambda x=x: fp8_gemm.act_quant_ref(x)
            c.impls["torch.compile(ref)"] = ("compile", fp8_gemm.act_quant_ref, (x,))
            cases.append(c)
        return cases

    sections.append(("fp8 linear", fp8_section))

    def attn_section():
        h, dh, win, p, topk, ctx = f["heads"], f["head_dim"], f["window"], f["page"], f["attn_topk"], f["context"]
        n_ent = ctx // 4
        cases = []
        decode = f["decode_batches"]
        for mode, t, prefill in ([("csa", b, False) for b in decode] + [("hca", decode[-1], False)]
                                 + [("csa", f["prefill_tokens"], True)]):
            b = 1 if prefill else t
            pages = torch.arange(b * (n_ent // p), device=dev).view(b, -1).int()
            ckv = torch.randn(b * (n_ent // p), p, dh, device=dev, dtype=bf)
            wkv = torch.randn(b, win, dh, device=dev, dtype=bf)
            slot = torch.arange(b, device=dev).int()
            sink = torch.randn(h, device=dev)
            pos = (torch.arange(ctx - t, ctx, device=dev) if prefill else torch.full((b,), ctx - 1, device=dev)).int()
            q = torch.randn(t, h, dh, device=dev, dtype=bf)
            n_vis = (pos.long() + 1) // 4
            if mode == "csa":
                kw = dict(topk_idx=(torch.rand(t, n_ent, device=dev) * (torch.arange(n_ent, device=dev) < n_vis[:, None])
                                    ).topk(topk).indices.int())
                cand, uniq = win + topk, (torch.unique(kw["topk_idx"]).numel() if prefill else t * topk)
            else:
                kw = dict(n_comp=((pos + 1) // 128).int())
                cand, uniq = win + ctx // 128, t * (ctx // 128)
            kv_rows = uniq + (t + win if prefill else t * win)
            c = Case(f"sparse_attn {mode} {'prefill' if prefill else 'decode'}",
                     f"T={t} H={h} Dh={dh} cand={cand}", 4 * t * h * cand * dh, kv_rows * dh * 2 + 2 * t * h * dh * 2,
                     "bf16-tc")
            if prefill:
                cu = torch.tensor([0, t], device=dev).int()
                args = (q, cu, pos, torch.randn(t, dh, device=dev, dtype=bf), wkv, slot, ckv, pages, sink, dh**-0.5)
                c.impls["triton"] = lambda a=args, kw=kw: sparse_attn.sparse_attn_prefill(*a, use_triton=True, **kw)
                c.impls["torch ref"] = lambda a=args, kw=kw: sparse_attn.sparse_attn_prefill_ref(*a, **kw)
            else:
                args = (q, pos, wkv, slot, ckv, pages, sink, dh**-0.5)
                c.impls["triton"] = lambda a=args, kw=kw: sparse_attn.sparse_attn_decode(*a, use_triton=True, **kw)
                c.impls["torch ref"] = lambda a=args, kw=kw: sparse_attn.sparse_attn_decode_ref(*a, **kw)
            cases.append(c)
        return cases

    sections.append(("sparse attention", attn_section))

    def indexer_section():
        hi, di, p, topk, ctx = f["idx_heads"], f["idx_dim"], f["page"], f["attn_topk"], f["context"]
        n_ent = ctx // 4
        cases = []
        for t, prefill in [(b, False) for b in f["decode_batches"]] + [(f["prefill_tokens"], True)]:
            b = 1 if prefill else t
            table = torch.arange(b * (n_ent // p), device=dev).view(b, -1).int()
            kpool = torch.randn(b * (n_ent // p), p, di, device=dev, dtype=bf)
            pos = (torch.arange(ctx - t, ctx, device=dev) if prefill else torch.full((b,), ctx - 1, device=dev)).int()
            q, w = torch.randn(t, hi, di, device=dev, dtype=bf), torch.randn(t, hi, device=dev)
            cu = torch.tensor([0, t], device=dev).int() if prefill else None
            n_avg = float(((pos.float() + 1) // 4).mean())
            key_bytes = (n_ent if prefill else t * n_ent) * di * 2
            c = Case(f"indexer_topk {'prefill' if prefill else 'decode'}", f"T={t} Hi={hi} Di={di} N~{n_avg:.0f} k={topk}",
                     2 * t * hi * di * n_avg, key_bytes + t * hi * di * 2 + t * topk * 4, "bf16-tc")
            args = (q, w, kpool, table, pos, topk, cu)
            c.impls["triton"] = lambda a=args: indexer.indexer_topk(*a, use_triton=True)
            c.impls["torch ref"] = lambda a=args: indexer.indexer_topk_ref(*a)
            cases.append(c)
        return cases

    sections.append(("indexer", indexer_section))

    def small_section():
        cases = []
        pd = f["pool_d"]
        # the compressor's per-block accumulators (what the model runs per prefill chunk): CSA has
        # 2d channels (two overlapping halves), HCA d
        for kind, c_, ratio in (("csa", 2, 4), ("hca", 1, f["hca_ratio"])):
            for length in f["pool_lengths"]:
                a = torch.randn(length, c_ * pd, device=dev)
                g = torch.randn(length, c_ * pd, device=dev)
                nblk = -(-length // ratio)
                c = Case(f"block_stats {kind}", f"L={length} ratio={ratio} C={c_ * pd}",
                         4 * length * c_ * pd, 2 * length * c_ * pd * 4 + nblk * 3 * c_ * pd * 4, "fp32")
                c.impls["triton"] = lambda a=a, g=g, r=ratio: compressor.block_stats(a, g, r, 0, use_triton=True)
                c.impls["torch ref"] = lambda a=a, g=g, r=ratio: compressor.block_stats_ref(a, g, r, 0)
                c.impls["torch.compile(ref)"] = ("compile", compressor.block_stats_ref, (a, g, ratio, 0))
                cases.append(c)
        n, d = f["hc"], f["hidden"]
        fn = torch.randn(n * (n + 2), n * d, device=dev) / (n * d) ** 0.5
        base, scale = torch.randn(n * (n + 2), device=dev), torch.rand(3, device=dev)
        for t in f["mhc_tokens"]:
            x = torch.randn(t, n, d, device=dev, dtype=bf)
            c = Case("mhc_pre", f"T={t} n={n} D={d} iters=20", 2 * t * n * (n + 2) * n * d,
                     t * n * d * 2 + t * d * 2 + fn.numel() * 4, "fp32")
            c.impls["triton"] = lambda x=x: mhc.mhc_pre(x, fn, base, scale, iters=20, use_triton=True)
            c.impls["torch ref"] = lambda x=x: mhc.mhc_pre_ref(x, fn, base, scale, 1e-6, 1e-6, 20)
            c.impls["torch.compile(ref)"] = ("compile", mhc.mhc_pre_ref, (x, fn, base, scale, 1e-6, 1e-6, 20))
            cases.append(c)
            y, post = torch.randn(t, d, device=dev, dtype=bf), torch.rand(t, n, device=dev)
            comb = torch.rand(t, n, n, device=dev)
            c = Case("mhc_post", f"T={t} n={n} D={d}", t * n * d * (2 * n + 2), t * (2 * n * d + d) * 2, "fp32")
            c.impls["triton"] = lambda a=(y, x, post, comb): mhc.mhc_post(*a, use_triton=True)
            c.impls["torch ref"] = lambda a=(y, x, post, comb): mhc.mhc_post_ref(*a)
            c.impls["torch.compile(ref)"] = ("compile", mhc.mhc_post_ref, (y, x, post, comb))
            cases.append(c)
        return cases

    sections.append(("compressor + mhc", small_section))
    return sections


# ---- timing and reporting ----------------------------------------------------------------------------------

def time_ms(torch, fn, target_s=0.15, max_reps=25) -> float:
    if not torch.cuda.is_available():  # --cpu-smoke --timings: one call, only to exercise the harness
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    t0 = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - t0 < target_s):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Report:
    HEAD = ("| kernel | shape | impl | ms | TFLOP/s | GB/s | flop/B | binds | % of roofline | vs ref |\n"
            "|---|---|---|---:|---:|---:|---:|---|---:|---:|")

    def __init__(self, path, header, hbm):
        self.path, self.lines, self.hbm = path, [header, "", self.HEAD], hbm

    def add(self, case, impl, ms=None, ref_ms=None, error=None):
        peak = PEAKS[case.peak]
        ai = case.flops / max(case.bytes, 1)
        binds = f"{case.peak} compute" if ai > peak / self.hbm else "HBM"
        if error is not None:
            row = f"| {case.kernel} | {case.shape} | {impl} | error: {error} | | | {ai:.1f} | {binds} | | |"
        else:
            s = ms / 1e3
            ideal = max(case.flops / peak, case.bytes / self.hbm)
            vs = f"{ref_ms / ms:.2f}x" if ref_ms and impl != "torch ref" else ""
            row = (f"| {case.kernel} | {case.shape} | {impl} | {ms:.4f} | {case.flops / s / 1e12:.2f} | "
                   f"{case.bytes / s / 1e9:.0f} | {ai:.1f} | {binds} | {100 * ideal / s:.1f} | {vs} |")
        self.lines.append(row)
        print(row, flush=True)
        self.flush()

    def note(self, text):
        self.lines.append(text)
        print(text, flush=True)
        self.flush()

    def flush(self):
        if self.path:
            with open(self.path, "w") as fh:
                fh.write("\n".join(self.lines) + "\n")


def _free(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help="run only the gate, tiny shapes, Triton interpreter")
    ap.add_argument("--gate-only", action="store_true")
    ap.add_argument("--timings", action="store_true",
                    help="with --cpu-smoke: also run the timing harness on tiny shapes (numbers are meaningless)")
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(ref) timings")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new timing after this many seconds")
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    t_start = time.perf_counter()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to time (run with --cpu-smoke for the interpreter gate)")
        return 0
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.manual_seed(0)
    results = gate(torch, dev, tiny=args.cpu_smoke)
    failed = [r for r in results if not r[1]]
    import triton

    name = "CPU (Triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name(dev)
    header = (f"# Kernel benchmark: {name}\n\n`{' '.join(['python', *sys.argv])}`; torch {torch.__version__}, "
              f"triton {triton.__version__}; peaks: bf16 {PEAKS['bf16-tc'] / 1e12:.0f}, fp8 "
              f"{PEAKS['fp8-tc'] / 1e12:.0f}, fp32 {PEAKS['fp32'] / 1e12:.0f} TFLOP/s, HBM {args.hbm_tbs} TB/s.\n\n"
              f"Correctness gate: {len(results) - len(failed)}/{len(results)} passed"
              + "".join(f"\n- FAILED {n}: {m}" for n, _, m in failed))
    report = Report(args.out, header, args.hbm_tbs * 1e12)
    print(header, flush=True)
    if args.gate_only or (args.cpu_smoke and not args.timings):
        return 1 if failed else 0
    sizes = TINY if args.cpu_smoke else FLASH

    compile_jobs = []
    for section, builder in build_cases(torch, dev, args.quick, sizes):
        if time.perf_counter() - t_start > args.budget_s:
            report.note(f"\n(skipped {section}: time budget of {args.budget_s:.0f} s spent)")
            continue
        try:
            cases = builder()
        except Exception as exc:
            report.note(f"\n({section}: could not build inputs: {type(exc).__name__}: {exc})")
            _free(torch)
            continue
        for case in cases:
            ref_ms = None
            # The reference first, so the kernel's row can show its speedup over it.
            for impl, fn in sorted(case.impls.items(), key=lambda kv: kv[0] != "torch ref"):
                if isinstance(fn, tuple):  # torch.compile(ref): timed last, it compiles for a while
                    compile_jobs.append((case, impl, fn))
                    continue
                if time.perf_counter() - t_start > args.budget_s:
                    report.add(case, impl, error="skipped (time budget)")
                    continue
                try:
                    ms = time_ms(torch, fn)
                    ref_ms = ms if impl == "torch ref" else ref_ms
                    report.add(case, impl, ms, ref_ms)
                except Exception as exc:
                    report.add(case, impl, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    traceback.print_exc(file=sys.stderr)
                    _free(torch)
            case.ref_ms = ref_ms
        cases = case = fn = None  # their closures hold the section's tensors (12.9 GB of bf16 experts)
        _free(torch)
    if not (args.no_compile or args.cpu_smoke):
        report.note("\ntorch.compile(reference), default mode, compile time excluded. Not compiled: the MoE,\n"
                    "attention and indexer references, whose loops depend on the data (nonzero/.item()).\n\n"
                    + Report.HEAD)
        compiled = {}
        for case, impl, (_, ref_fn, ref_args) in compile_jobs:
            if time.perf_counter() - t_start > args.budget_s:
                report.add(case, impl, error="skipped (time budget)")
                continue
            try:
                fn = compiled.setdefault(ref_fn, torch.compile(ref_fn))
                report.add(case, impl, time_ms(torch, lambda: fn(*ref_args)), case.ref_ms)
            except Exception as exc:
                report.add(case, impl, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    report.note(f"\nTotal wall time {time.perf_counter() - t_start:.0f} s.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
