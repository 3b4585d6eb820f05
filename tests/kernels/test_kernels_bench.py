"""The kernel benchmark's harness runs end to end on CPU (benchmarks/bench_kernels.py --cpu-smoke).

GPU time is scarce and a benchmark run is a single shot, so the harness itself (gate, input
builders, timing loop, report) is exercised here on interpreter-sized shapes.
"""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_gate_and_timing_harness(tmp_path):
    out = tmp_path / "kernels.md"
    assert _load().main(["--cpu-smoke", "--timings", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Correctness gate: 20/20 passed" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"fused_moe fp4", "fp8_gemm", "act_quant", "sparse_attn csa prefill", "indexer_topk decode",
            "compress_pool hca", "mhc_pre", "mhc_post"} <= kernels
    assert not any("error" in row for row in rows)
    assert any(row.rstrip(" |").endswith("x") for row in rows if "| triton |" in row)  # speedup column


def test_without_cuda_prints_one_line_and_exits_zero(capsys):
    assert _load().main([]) == 0
    assert capsys.readouterr().out.count("\n") == 1
