"""Small building blocks of DeepSeek-V4: RMSNorm, the (optionally FP8) linear, interleaved partial
RoPE with YaRN, and mHC (hyper-connection) mixing.

Owns: the numerics of these pieces (fp32 where the reference computes in fp32). Does not own: the
attention, compressor or MoE modules (see `attention.py`, `moe.py`), nor any cache state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from batchv4.config import ModelConfig
from batchv4.model import quant


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 math, weight applied in fp32, one cast at the end (reference numerics)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T. `weight` is a float tensor, or float8_e4m3fn with a float32 `scale` buffer of
    128x128 blocks (kept quantized and resident).

    A resident FP8 weight runs, with `use_kernels`, through `batchv4.kernels.fp8_gemm` (the
    activation quantized to e4m3 per row and 128-wide block, then the block-scaled GEMM: what the
    official inference code does); without, it is dequantized per call and multiplied in x's dtype
    (the activation is not quantized). Float weights take the plain matmul either way."""

    def __init__(self, in_features: int, out_features: int, use_kernels: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.use_kernels = use_kernels
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("scale", None)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.float8_e4m3fn:
            return quant.dequant_fp8_block(w, self.scale).to(dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def _fp8_kernel(self) -> bool:
        return self.use_kernels and self.weight.dtype == torch.float8_e4m3fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        if self._fp8_kernel():
            from batchv4.kernels.fp8_gemm import fp8_linear

            y = fp8_linear(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scale, use_triton=True)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense_weight(x.dtype))

    def forward_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """The grouped projection (V4's wo_a): x [T, G, in] -> [T, out], group g through the
        g-th block of out/G rows of `weight` [out, in]."""
        T, G = x.shape[0], groups
        rows = self.out_features // G
        # each group's rows must start on a 128-row scale block for the kernel's per-group slice
        if self._fp8_kernel() and rows % 128 == 0:
            from batchv4.kernels.fp8_gemm import fp8_linear

            b = rows // 128
            return torch.cat([fp8_linear(x[:, g].contiguous(), self.weight[g * rows:(g + 1) * rows],
                                         self.scale[g * b:(g + 1) * b], use_triton=True) for g in range(G)], dim=-1)
        wa = self.dense_weight(x.dtype).view(G, rows, -1)                             # [G, r, in]
        return torch.einsum("tgi,gri->tgr", x, wa).reshape(T, -1)


# ---- RoPE ----------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """Inverse frequencies [rope_head_dim/2] fp32. Compressed layers use compress_rope_theta + YaRN
    (no mscale); window-only layers the plain base."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if compressed and cfg.rope_factor and cfg.rope_factor != 1.0:
        def corr(rot: float) -> float:
            return dim * math.log(cfg.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(corr(cfg.beta_fast)), 0)
        hi = min(math.ceil(corr(cfg.beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        inv = inv / cfg.rope_factor * ramp + inv * (1 - ramp)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N] int -> cos, sin [N, rope_dim/2] fp32."""
    f = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return f.cos(), f.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the LAST 2*cos.shape[-1] dims of x.

    x [N, ..., Dh]; cos/sin [N, R/2] broadcast over the middle dims. Returns a new tensor, x's dtype.
    """
    r = cos.shape[-1] * 2
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    rope = x[..., -r:].float()
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], out.to(x.dtype)], dim=-1)


# ---- mHC -----------------------------------------------------------------------------------------

def mhc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, n, D] -> (u [T, D] in x.dtype, post [T, n] fp32, comb [T, n, n] fp32).

    comb[i][j] weighs input stream i into output stream j (applied transposed in mhc_post).
    """
    n = cfg.hc_mult
    xf = x.flatten(1).float()                                             # [T, n*D]
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.norm_eps)
    z = F.linear(xf, fn.float())                                          # [T, n(n+2)]
    basef, scalef = base.float(), scale.float()
    pre = torch.sigmoid(z[:, :n] * scalef[0] + basef[:n]) + cfg.hc_eps
    post = 2 * torch.sigmoid(z[:, n:2 * n] * scalef[1] + basef[n:2 * n])
    comb = (z[:, 2 * n:] * scalef[2] + basef[2 * n:]).view(-1, n, n)
    # Sinkhorn on [T, n, n]: in place, as these tiny ops cost their dispatch more than their math
    comb = torch.softmax(comb, dim=-1).add_(cfg.hc_eps)
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(cfg.hc_eps))
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(cfg.hc_eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(cfg.hc_eps))
    u = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
    return u, post, comb


def mhc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """y [T, D] sublayer output, x [T, n, D] streams -> new streams [T, n, D] in x.dtype."""
    dt = x.dtype
    return post.to(dt).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), x)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            cfg: ModelConfig) -> torch.Tensor:
    """Final collapse of the streams: x [T, n, D] -> [T, D] (no Sinkhorn, no post)."""
    xf = x.flatten(1).float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.norm_eps)
    w = torch.sigmoid(F.linear(xf, fn.float()) * scale.float() + base.float()) + cfg.hc_eps
    return (w.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
