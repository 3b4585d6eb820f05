"""Triton kernel of the compressor's per-block softmax accumulators (imported lazily by
`compressor.py`).

Owns: one program per (block b, BLOCK_C channels): over the block's token slots, separately per
channel, the max gate, the sum of exp(g - max) and the exp-weighted sum of the values, in fp32.
Does not own: argument checks, merging accumulators, the projections, the reference.
"""

import triton
import triton.language as tl


@triton.jit
def block_stats_kernel(a_ptr, g_ptr, out_ptr, L, C, RATIO, OFFSET, stride_a, stride_g, stride_ob, stride_os,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Block b holds token rows b*RATIO - OFFSET + r for slots r < RATIO; rows outside [0, L) are
    # empty slots (gate -inf, value 0), so the first and the last block may be partial.
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    rows = b * RATIO - OFFSET + r
    c_mask = offs_c < C
    mask = ((r < RATIO) & (rows >= 0) & (rows < L))[:, None] & c_mask[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + offs_c[None, :], mask=mask, other=float("-inf"))
    a = tl.load(a_ptr + rows[:, None] * stride_a + offs_c[None, :], mask=mask, other=0.0)
    mx = tl.max(g, axis=0)
    # a channel without any token keeps max -inf; exp() is taken against 0 there (all terms 0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(g - safe[None, :])
    den = tl.sum(e, axis=0)
    num = tl.sum(e * a, axis=0)
    base = out_ptr + b * stride_ob + offs_c
    tl.store(base, mx, mask=c_mask)
    tl.store(base + stride_os, den, mask=c_mask)
    tl.store(base + 2 * stride_os, num, mask=c_mask)
