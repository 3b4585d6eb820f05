"""Triton kernels of mHC (manifold-constrained hyper-connections), imported lazily by `mhc.py`.

Owns: `mhc_pre_kernel`, one program per BLOCK_T tokens doing, in one launch, the projection of
the flattened streams on fn together with their sum of squares (one read of X), the RMS factor,
pre/post gates and the whole Sinkhorn normalisation in registers, then the pre-mix u (a second
read of X, mostly from L2); and `mhc_post_kernel`, the post-mix X_new = post*y + M^T X.
Does not own: argument checks, the reference.

Layouts in registers: pre/post logits are [BLOCK_T, NV] (column i = stream i, NV >= 16 for the
dot); the mixing matrix is [BLOCK_T, NP*NP] with column i*NP + j holding M[i][j], reshaped to
[BLOCK_T, NP, NP]; padded rows/columns are held at exactly 0 after the softmax.
"""

import triton
import triton.language as tl

from ._jit import round_to_bf16_grid


@triton.jit
def mhc_pre_kernel(
    x_ptr, fn_ptr, base_ptr, scale_ptr, u_ptr, post_ptr, comb_ptr,
    T, D, rms_eps, hc_eps, iters,
    stride_xt, stride_ft, stride_ut,
    NS: tl.constexpr, NV: tl.constexpr, NP: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_mask = rows < T
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xt
    nd = NS * D
    cv = tl.arange(0, NV)
    cv_ok = cv < NS
    cc = tl.arange(0, NP * NP)
    ci = cc // NP
    cj = cc % NP
    cc_ok = (ci < NS) & (cj < NS)
    comb_row = 2 * NS + ci * NS + cj  # row of fn / base that produces M[i][j]

    # Pass 1 over X: projections on fn and the sum of squares.
    z_pre = tl.zeros((BLOCK_T, NV), dtype=tl.float32)
    z_post = tl.zeros((BLOCK_T, NV), dtype=tl.float32)
    z_comb = tl.zeros((BLOCK_T, NP * NP), dtype=tl.float32)
    ssq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, nd, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < nd
        x = tl.load(x_rows + offs_k[None, :], mask=r_mask[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ssq += tl.sum(x * x, axis=1)
        f = tl.load(fn_ptr + cv[None, :] * stride_ft + offs_k[:, None], mask=k_ok[:, None] & cv_ok[None, :], other=0.0)
        z_pre = tl.dot(x, f, z_pre, input_precision="ieee")
        f = tl.load(fn_ptr + (NS + cv[None, :]) * stride_ft + offs_k[:, None], mask=k_ok[:, None] & cv_ok[None, :],
                    other=0.0)
        z_post = tl.dot(x, f, z_post, input_precision="ieee")
        f = tl.load(fn_ptr + comb_row[None, :] * stride_ft + offs_k[:, None], mask=k_ok[:, None] & cc_ok[None, :],
                    other=0.0)
        z_comb = tl.dot(x, f, z_comb, input_precision="ieee")
    rs = tl.rsqrt(ssq / nd + rms_eps)[:, None]  # RMS over all n*D values, applied after the matmul

    # Gates.
    s_pre = tl.load(scale_ptr)
    s_post = tl.load(scale_ptr + 1)
    s_comb = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(z_pre * rs * s_pre + tl.load(base_ptr + cv, mask=cv_ok, other=0.0)[None, :]) + hc_eps
    post = 2.0 * tl.sigmoid(z_post * rs * s_post + tl.load(base_ptr + NS + cv, mask=cv_ok, other=0.0)[None, :])
    out_rows = rows[:, None].to(tl.int64)
    tl.store(post_ptr + out_rows * NS + cv[None, :], post, mask=r_mask[:, None] & cv_ok[None, :])

    # Sinkhorn: softmax over j, +eps, column normalise, then (iters-1) x (row, column) normalise.
    logit = z_comb * rs * s_comb + tl.load(base_ptr + comb_row, mask=cc_ok, other=0.0)[None, :]
    ii = tl.arange(0, NP)
    ok3 = ((ii[:, None] < NS) & (ii[None, :] < NS))[None, :, :]  # [1, NP, NP]
    logit = tl.where(ok3, tl.reshape(logit, (BLOCK_T, NP, NP)), -1e30)
    e = tl.exp(logit - tl.max(logit, axis=2)[:, :, None])
    m = tl.where(ok3, e / tl.sum(e, axis=2)[:, :, None] + hc_eps, 0.0)
    m = m / (tl.sum(m, axis=1)[:, None, :] + hc_eps)
    for _ in range(1, iters):
        m = m / (tl.sum(m, axis=2)[:, :, None] + hc_eps)
        m = m / (tl.sum(m, axis=1)[:, None, :] + hc_eps)
    m2 = tl.reshape(m, (BLOCK_T, NP * NP))
    tl.store(comb_ptr + out_rows * (NS * NS) + (ci * NS + cj)[None, :], m2, mask=r_mask[:, None] & cc_ok[None, :])

    # Pass 2 over X: u = sum_i pre[i] * X[:, i, :].
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for i in tl.static_range(NS):
            pre_i = tl.sum(tl.where(cv[None, :] == i, pre, 0.0), axis=1)
            xi = tl.load(x_rows + i * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += pre_i[:, None] * xi
        if OUT_BF16:
            acc = round_to_bf16_grid(acc)
        tl.store(u_ptr + out_rows * stride_ut + offs_d[None, :], acc.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mhc_post_kernel(
    y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, D,
    stride_yt, stride_xt, stride_ot,
    NS: tl.constexpr, NP: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[t, j, :] = post[t, j] * y[t, :] + sum_i M[t, i, j] * x[t, i, :]
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    s = tl.arange(0, NP)
    s_ok = s < NS
    x = tl.load(x_ptr + t * stride_xt + s[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)  # [NP (i), BLOCK_D]
    y = tl.load(y_ptr + t * stride_yt + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * NS + s, mask=s_ok, other=0.0)
    m = tl.load(comb_ptr + t * NS * NS + s[:, None] * NS + s[None, :], mask=s_ok[:, None] & s_ok[None, :],
                other=0.0)  # [NP (i), NP (j)]
    mixed = tl.sum(m[:, :, None] * x[:, None, :], axis=0)  # [NP (j), BLOCK_D]
    out = post[:, None] * y[None, :] + mixed
    if OUT_BF16:
        out = round_to_bf16_grid(out)
    tl.store(out_ptr + t * stride_ot + s[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=s_ok[:, None] & d_ok[None, :])
