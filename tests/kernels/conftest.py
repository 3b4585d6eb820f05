"""Kernel tests: on the CUDA device where there is one, else through Triton's CPU interpreter.

Without CUDA, TRITON_INTERPRET=1 is set here, before any `@triton.jit` decorator runs (the test
modules import `batchv4.kernels`, whose kernel bodies are imported lazily anyway); with CUDA it is
left alone, so the real kernels compile and run, and every test builds its tensors on the device
(the default device of each test). triton is pinned in the `test` extra, so its absence fails
the run instead of skipping it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

try:
    import triton  # noqa: E402,F401
except ImportError as e:  # pragma: no cover - only where the test extra is not installed
    raise ImportError("tests/kernels need triton (pinned in the 'test' extra: pip install -e '.[test]')") from e

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed_and_device():
    torch.manual_seed(0)
    with torch.device(DEVICE):
        yield


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
