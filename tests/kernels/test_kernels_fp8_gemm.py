"""Block-scaled FP8 linear (kernels/fp8_gemm.py): activation quantization and GEMM."""

import pytest
import torch

from batchv4.kernels.fp8_gemm import act_quant, act_quant_ref, fp8_gemm, fp8_gemm_ref, fp8_linear, fp8_linear_ref
from batchv4.kernels.quant import quantize_fp8_block


def _activations(m, k):
    # Magnitudes spread over 2^-20 .. 2^10 so blocks hit e4m3 subnormals and binade carries.
    x = torch.randn(m, k) * torch.exp2(torch.randint(-20, 10, (m, k)).float())
    x[0, :] = 0.0  # an all-zero row: scale from the 1e-4 floor
    return x.bfloat16()


def test_act_quant_matches_reference_bit_for_bit():
    x = _activations(5, 300)  # ragged last block (300 = 2*128 + 44)
    q, s = act_quant(x, use_triton=True)
    q_ref, s_ref = act_quant_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_act_quant_scales_are_powers_of_two_and_fit_448():
    x = _activations(4, 256).float()
    q, s = act_quant_ref(x)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)
    blocks = x.view(4, 2, 128).abs().amax(-1)
    assert torch.all(blocks / s <= 448) and torch.all((blocks == 0) | (blocks / s > 224))


def test_act_quant_rounds_to_nearest_even_at_binade_edges():
    # 31.75 sits between e4m3 values 30 and 32 (step 2): a carry into the next binade.
    x = torch.tensor([[448.0, 31.75, -31.75, 17.0, 19.0, 0.0078125 * 1.5] + [0.0] * 122]).bfloat16()
    q, s = act_quant(x, use_triton=True)
    assert s.item() == 1.0
    assert q.float()[0, :6].tolist() == [448.0, 32.0, -32.0, 16.0, 20.0, 0.01171875]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_matches_reference(out_dtype, bf16_close):
    x = torch.randn(7, 200).bfloat16()
    w, ws = quantize_fp8_block(torch.randn(150, 200))  # N and K not multiples of 128
    xq, xs = act_quant_ref(x)
    out = fp8_gemm(xq, xs, w, ws, out_dtype, use_triton=True)
    ref = fp8_gemm_ref(xq, xs, w, ws, out_dtype)
    assert out.dtype == out_dtype and out.shape == (7, 150)
    if out_dtype == torch.bfloat16:
        bf16_close(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_fp8_linear_end_to_end_close_to_float_matmul(bf16_close):
    x = torch.randn(3, 256).bfloat16()
    w_float = torch.randn(64, 256) / 16
    w, ws = quantize_fp8_block(w_float)
    out = fp8_linear(x, w, ws, use_triton=True)
    bf16_close(out, fp8_linear_ref(x, w, ws))
    exact = x.float() @ w_float.T  # quantization error of e4m3 (3 mantissa bits) on both sides
    assert (out.float() - exact).abs().max() < 0.15 * exact.abs().max()


def test_fp8_gemm_rejects_bad_layouts():
    xq, xs = act_quant_ref(torch.randn(2, 256))
    w, ws = quantize_fp8_block(torch.randn(64, 256))
    with pytest.raises(ValueError, match="w must be"):
        fp8_gemm(xq, xs, w[:, :128].contiguous(), ws, use_triton=True)
    with pytest.raises(ValueError, match="ws must have shape"):
        fp8_gemm(xq, xs, w, ws[:, :1].contiguous(), use_triton=True)
    with pytest.raises(ValueError, match="xq must have dtype"):
        fp8_gemm(xq.float(), xs, w, ws, use_triton=True)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        act_quant(torch.randn(2, 3, 4))
