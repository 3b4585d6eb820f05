"""mHC (manifold-constrained hyper-connections): pre and post mixing, dispatchers + references.

Owns (deepseek-v4.md section 2.2), for n residual streams X [T, n, D]:
  mhc_pre:  z = (flatten(X) fp32 @ fn^T) * rsqrt(mean(flatten(X)^2) + rms_eps)
            pre = sigmoid(z[:n]*scale[0] + base[:n]) + hc_eps;  post = 2*sigmoid(z[n:2n]*scale[1] + base[n:2n])
            M = softmax_j(z[2n:]*scale[2] + base[2n:] as [n, n]) + hc_eps, column-normalised, then
                (iters-1) x (row-normalise, column-normalise), each with +hc_eps in the denominator
            u = sum_i pre[i] * X[:, i, :]  (fp32, cast to X's dtype)
            -> (u [T, D], post [T, n] fp32, M [T, n, n] fp32)
  mhc_post: X_new[:, j, :] = post[j] * y + sum_i M[i][j] * X[:, i, :]  (cast to X's dtype)
Does not own: the sublayers between pre and post, the final hc_head collapse, parameter loading.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_ACT_DTYPES, cdiv, check_last_dim_contiguous, check_tensor, interpreting, next_pow2
from ._common import pick_triton


def mhc_pre(
    x: torch.Tensor,  # [T, n, D] bf16/fp16/fp32 residual streams
    fn: torch.Tensor,  # [n*(n+2), n*D] fp32
    base: torch.Tensor,  # [n*(n+2)] fp32
    scale: torch.Tensor,  # [3] fp32: pre, post, comb scales
    rms_eps: float = 1e-6,
    hc_eps: float = 1e-6,
    iters: int = 20,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # u [T, D] x.dtype, post [T, n] fp32, M [T, n, n] fp32
    _check_pre(x, fn, base, scale, iters)
    if pick_triton(use_triton, [x, fn, base, scale]):
        return mhc_pre_triton(x, fn, base, scale, rms_eps, hc_eps, iters)
    return mhc_pre_ref(x, fn, base, scale, rms_eps, hc_eps, iters)


def mhc_pre_ref(x, fn, base, scale, rms_eps=1e-6, hc_eps=1e-6, iters=20):
    t, n, d = x.shape
    xf = x.reshape(t, n * d).float()
    z = (xf @ fn.float().T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + rms_eps)  # [T, n(n+2)]
    pre = torch.sigmoid(z[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(z[:, n:2 * n] * scale[1] + base[n:2 * n])
    m = (z[:, 2 * n:] * scale[2] + base[2 * n:]).view(t, n, n)  # m[:, i, j]
    m = torch.softmax(m, dim=-1) + hc_eps
    m = m / (m.sum(dim=1, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=2, keepdim=True) + hc_eps)
        m = m / (m.sum(dim=1, keepdim=True) + hc_eps)
    u = (pre[:, :, None] * x.float()).sum(1).to(x.dtype)
    return u, post, m


def mhc_pre_triton(x, fn, base, scale, rms_eps=1e-6, hc_eps=1e-6, iters=20):
    from . import _mhc_jit as jit

    t, n, d = x.shape
    u = torch.empty(t, d, dtype=x.dtype, device=x.device)
    post = torch.empty(t, n, dtype=torch.float32, device=x.device)
    comb = torch.empty(t, n, n, dtype=torch.float32, device=x.device)
    if t == 0:
        return u, post, comb
    x2 = x.reshape(t, n * d)
    block_t = 16  # the dot's minimum M; ptxas: 16 x 64 tiles stay at ~106 registers, 128-wide ones spill
    block_k = 64
    jit.mhc_pre_kernel[(cdiv(t, block_t),)](
        x2, fn, base, scale, u, post, comb,
        t, d, float(rms_eps), float(hc_eps), int(iters),
        x2.stride(0), fn.stride(0), u.stride(0),
        NS=n, NV=next_pow2(n, 16), NP=next_pow2(n, 4), OUT_BF16=x.dtype == torch.bfloat16,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=min(next_pow2(d), 256), num_warps=4,
    )
    return u, post, comb


def mhc_post(
    y: torch.Tensor,  # [T, D] sublayer output
    x: torch.Tensor,  # [T, n, D] residual streams (the ones mhc_pre read)
    post: torch.Tensor,  # [T, n] fp32
    comb: torch.Tensor,  # [T, n, n] fp32, M[i][j]
    use_triton: bool | None = None,
) -> torch.Tensor:  # [T, n, D] in x's dtype
    _check_post(y, x, post, comb)
    if pick_triton(use_triton, [y, x, post, comb]):
        return mhc_post_triton(y, x, post, comb)
    return mhc_post_ref(y, x, post, comb)


def mhc_post_ref(y, x, post, comb):
    mixed = torch.einsum("tij,tid->tjd", comb.float(), x.float())  # output stream j gets sum_i M[i][j] X_i
    return (post.float()[:, :, None] * y.float()[:, None, :] + mixed).to(x.dtype)


def mhc_post_triton(y, x, post, comb):
    from . import _mhc_jit as jit

    t, n, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t == 0:
        return out
    block_d = min(next_pow2(d), 64 if interpreting() else 512)
    jit.mhc_post_kernel[(t, cdiv(d, block_d))](
        y, x, post, comb, out, d, y.stride(0), x.stride(0), out.stride(0),
        NS=n, NP=next_pow2(n, 2), OUT_BF16=x.dtype == torch.bfloat16, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _check_pre(x, fn, base, scale, iters) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_ACT_DTYPES)
    t, n, d = x.shape
    dev = x.device
    mixes = n * (n + 2)
    check_tensor("fn", fn, dtypes=(torch.float32,), shape=(mixes, n * d), device=dev)
    check_tensor("base", base, dtypes=(torch.float32,), shape=(mixes,), device=dev)
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=(3,), device=dev)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous ([T, n, D] row-major)")
    check_last_dim_contiguous("fn", fn)
    for name, v in (("base", base), ("scale", scale)):
        if not v.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _check_post(y, x, post, comb) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_ACT_DTYPES)
    t, n, d = x.shape
    dev = x.device
    check_tensor("y", y, dtypes=FLOAT_ACT_DTYPES, shape=(t, d), device=dev)
    check_tensor("post", post, dtypes=(torch.float32,), shape=(t, n), device=dev)
    check_tensor("comb", comb, dtypes=(torch.float32,), shape=(t, n, n), device=dev)
    if not x.is_contiguous() or not post.is_contiguous() or not comb.is_contiguous():
        raise ValueError("x, post and comb must be contiguous")
    check_last_dim_contiguous("y", y)
