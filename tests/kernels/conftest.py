"""Kernel tests run Triton through its CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, so it is set here, before
the test modules import `batchv4.kernels` (whose kernel bodies are imported lazily anyway).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    # Spacing of bf16 values around |x|: 2^(floor(log2|x|) - 7), floored at the smallest normal's.
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp(min=2.0**-126))) - 7)


def _bf16_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, of_max: bool = False) -> None:
    """Assert |actual - expected| <= ulps bf16 ULPs of expected (elementwise), or with of_max,
    <= ulps ULPs of max|expected| (for outputs computed from an intermediate rounded to bf16)."""
    e = expected.float()
    spacing = _bf16_ulp(e.abs().max()) if of_max else _bf16_ulp(e)
    err = (actual.float() - e).abs()
    bad = err > ulps * spacing
    assert not bad.any(), f"{int(bad.sum())} elements off by more than {ulps} bf16 ulp; max err {err.max():.3g}"


@pytest.fixture
def bf16_close():
    """The interpreter's bf16 results may differ from torch by 1 ULP (different fp32 sum order)."""
    return _bf16_close
