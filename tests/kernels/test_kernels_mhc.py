"""mHC pre/post mixing (kernels/mhc.py)."""

import pytest
import torch

from batchv4.kernels.mhc import mhc_post, mhc_post_ref, mhc_pre, mhc_pre_ref


def _params(n, d):
    return torch.randn(n * (n + 2), n * d) * 0.1, torch.randn(n * (n + 2)), torch.rand(3) + 0.5


@pytest.mark.parametrize("t, n, d, dtype", [(5, 4, 64, torch.bfloat16), (17, 2, 48, torch.float32)])
def test_pre_matches_reference(t, n, d, dtype, bf16_close):
    x = torch.randn(t, n, d).to(dtype)
    fn, base, scale = _params(n, d)
    u, post, comb = mhc_pre(x, fn, base, scale, iters=20, use_triton=True)
    u_ref, post_ref, comb_ref = mhc_pre_ref(x, fn, base, scale, iters=20)
    assert u.dtype == dtype and post.shape == (t, n) and comb.shape == (t, n, n)
    torch.testing.assert_close(post, post_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, comb_ref, rtol=1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        bf16_close(u, u_ref)
    else:
        torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)


def test_sinkhorn_output_is_nearly_doubly_stochastic():
    x = torch.randn(3, 4, 32)
    fn, base, scale = _params(4, 32)
    _, post, comb = mhc_pre(x, fn, base, scale, iters=20, use_triton=True)
    torch.testing.assert_close(comb.sum(1), torch.ones(3, 4), atol=1e-4, rtol=0)  # columns (last step)
    torch.testing.assert_close(comb.sum(2), torch.ones(3, 4), atol=2e-2, rtol=0)
    assert ((post > 0) & (post < 2)).all()


def test_one_iteration_is_softmax_then_column_normalisation():
    x = torch.randn(2, 4, 32)
    fn, base, scale = _params(4, 32)
    _, _, comb = mhc_pre(x, fn, base, scale, hc_eps=0.0, iters=1, use_triton=True)
    xf = x.reshape(2, -1)
    z = xf @ fn.T * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    m = torch.softmax((z[:, 8:] * scale[2] + base[8:]).view(2, 4, 4), -1)
    torch.testing.assert_close(comb, m / m.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_post_matches_reference_and_uses_the_transpose(dtype, bf16_close):
    t, n, d = 3, 4, 40
    x, y = torch.randn(t, n, d).to(dtype), torch.randn(t, d).to(dtype)
    post, comb = torch.rand(t, n) * 2, torch.rand(t, n, n)
    out = mhc_post(y, x, post, comb, use_triton=True)
    ref = mhc_post_ref(y, x, post, comb)
    if dtype == torch.bfloat16:
        bf16_close(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Output stream 1 receives sum_i M[i][1] X_i (column 1 of M), not row 1.
    want = post[0, 1] * y[0].float() + sum(comb[0, i, 1] * x[0, i].float() for i in range(n))
    torch.testing.assert_close(ref[0, 1].float(), want.to(dtype).float(), rtol=1e-2, atol=1e-2)


def test_bad_layouts_raise():
    x = torch.randn(2, 4, 16)
    fn, base, scale = _params(4, 16)
    with pytest.raises(ValueError, match="fn must have shape"):
        mhc_pre(x, fn[:, :32], base, scale)
    with pytest.raises(ValueError, match="iters must be"):
        mhc_pre(x, fn, base, scale, iters=0)
    with pytest.raises(ValueError, match="comb must have shape"):
        mhc_post(torch.randn(2, 16), x, torch.rand(2, 4), torch.rand(2, 4, 3))
