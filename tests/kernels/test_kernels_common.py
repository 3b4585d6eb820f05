"""Backend choice and shared number-format helpers (kernels/_common.py, kernels/quant.py)."""

import pytest
import torch

from batchv4.kernels._common import pick_triton
from batchv4.kernels.quant import pow2_scale_ref


def test_backend_is_chosen_by_device_not_by_a_flag(monkeypatch):
    cpu = torch.zeros(2, device="cpu")
    assert pick_triton(None, [cpu]) is False  # CPU tensors: reference, even under the interpreter
    assert pick_triton(False, [cpu]) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pick_triton(True, [cpu, None]) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pick_triton(True, [cpu])
    if torch.cuda.is_available():
        assert pick_triton(None, [torch.zeros(2, device="cuda")]) is True


def test_pow2_scale_is_exact_at_powers_of_two():
    amax = torch.tensor([448.0, 448.0 * 2**-10, 449.0, 0.0, 1e-4 * 0.5, 448.0 * 2**20 * (1 + 2**-23)])
    s = pow2_scale_ref(amax, 448.0)
    floor = pow2_scale_ref(torch.tensor([1e-4]), 448.0).item()
    assert s.tolist() == [1.0, 2.0**-10, 2.0, floor, floor, 2.0**21]
