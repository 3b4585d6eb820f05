"""The kernel benchmark's harness runs end to end on CPU (benchmarks/bench_kernels.py --cpu-smoke).

GPU time is scarce and a benchmark run is a single shot, so the harness itself (gate, input
builders, timing loop, report) is exercised here on interpreter-sized shapes. Only that CPU smoke
run happens in tests, in a subprocess of its own (the interpreter must be chosen before triton
compiles anything, which on a CUDA machine this test process has already done); the GPU
benchmark is `python benchmarks/bench_kernels.py` by hand.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_cpu_smoke_gate_and_timing_harness(tmp_path):
    out = tmp_path / "kernels.md"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--timings", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "Correctness gate: 21/21 passed" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"fused_moe fp4", "fp8_gemm", "act_quant", "sparse_attn csa prefill", "indexer_topk decode",
            "block_stats hca", "block_stats csa", "mhc_pre", "mhc_post"} <= kernels
    assert not any("error" in row for row in rows)
    assert any(row.rstrip(" |").endswith("x") for row in rows if "| triton |" in row)  # speedup column


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, main([]) is the full GPU benchmark")
def test_without_cuda_prints_one_line_and_exits_zero(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert capsys.readouterr().out.count("\n") == 1
