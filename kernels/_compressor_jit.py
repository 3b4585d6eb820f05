"""Triton kernel of the compressor's softmax pooling (imported lazily by `compressor.py`).

Owns: one program per (entry j, block of BLOCK_D channels): a softmax over the entry's token
slots, separately per channel, and the weighted sum of the values, in fp32.
Does not own: the projections, ape, norm/RoPE/quantization of the entries, the reference.
"""

import triton
import triton.language as tl


@triton.jit
def compress_pool_kernel(a_ptr, g_ptr, out_ptr, RATIO, d, stride_a, stride_g, stride_o,
                         OVERLAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Plain: entry j pools tokens j*RATIO .. j*RATIO+RATIO-1 over channels [0, d).
    # OVERLAP (CSA): the tokens of block j-1 over channels [0, d) plus the tokens of block j over
    # channels [d, 2d); block -1 does not exist (weight 0).
    j = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    d_mask = offs_d < d
    cur_rows = j * RATIO + r
    cur_mask = (r < RATIO)[:, None] & d_mask[None, :]
    cur_ch = offs_d
    if OVERLAP:
        cur_ch = offs_d + d
    g_cur = tl.load(g_ptr + cur_rows[:, None] * stride_g + cur_ch[None, :], mask=cur_mask, other=float("-inf"))
    a_cur = tl.load(a_ptr + cur_rows[:, None] * stride_a + cur_ch[None, :], mask=cur_mask, other=0.0)
    mx = tl.max(g_cur, axis=0)
    if OVERLAP:
        prev_rows = cur_rows - RATIO
        prev_mask = cur_mask & (j > 0)
        g_prev = tl.load(g_ptr + prev_rows[:, None] * stride_g + offs_d[None, :], mask=prev_mask,
                         other=float("-inf"))
        a_prev = tl.load(a_ptr + prev_rows[:, None] * stride_a + offs_d[None, :], mask=prev_mask, other=0.0)
        mx = tl.maximum(mx, tl.max(g_prev, axis=0))
    mx = tl.where(d_mask, mx, 0.0)  # padded channels: keep exp() finite
    e_cur = tl.exp(g_cur - mx[None, :])
    den = tl.sum(e_cur, axis=0)
    num = tl.sum(e_cur * a_cur, axis=0)
    if OVERLAP:
        e_prev = tl.exp(g_prev - mx[None, :])
        den += tl.sum(e_prev, axis=0)
        num += tl.sum(e_prev * a_prev, axis=0)
    den = tl.where(d_mask, den, 1.0)
    tl.store(out_ptr + j * stride_o + offs_d, num / den, mask=d_mask)
