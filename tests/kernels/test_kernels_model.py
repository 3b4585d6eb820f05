"""The model with the Triton kernels on (run by the interpreter on CPU) against the same weights with
them off: fused MoE, sparse attention, indexer top-k, compressor accumulators and mHC inside the
packed forward, and the FP8 GEMM for resident FP8 linears."""

import sys
from pathlib import Path

import pytest
import torch

from batchv4.config import ModelConfig
from batchv4.kernels import compressor as compressor_kernels
from batchv4.kernels import fp8_gemm
from batchv4.model import quant
from batchv4.model.checkpoint import load_checkpoint, save_official_checkpoint
from batchv4.model.layers import Linear
from batchv4.model.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from cache_harness import Harness  # noqa: E402


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed), device="cpu").tolist()


def _twins(cfg: ModelConfig, seed: int) -> tuple[Transformer, Transformer]:
    """The same random weights, built with the kernels off and on."""
    off = Transformer(cfg).float().init_random(seed, std=0.1)
    on = Transformer(cfg, use_kernels=True).float()
    on.load_state_dict(off.state_dict())
    return off, on


def _steps(m: Transformer, ids: list[int]) -> torch.Tensor:
    # two sequences' prefill chunks, then one resuming mid-block beside the other's decode step
    h = Harness(m)
    a = h.step([(0, ids[:9]), (1, ids[::-1][:5])])
    b = h.step([(0, ids[9:14]), (1, [5])])
    return torch.cat([a, b])


# window, HCA and CSA layers, small enough for the interpreter: 14 tokens give CSA 3 entries
# (more than the indexer's top-2), HCA 1; 4 Sinkhorn rounds (each is a loop in the mHC kernel)
SMALL = ModelConfig.load("test").replace(n_layers=3, compress_ratios=(0, 8, 4), layer_kinds=(), n_hash_layers=1,
                                         index_topk=2, hc_sinkhorn_iters=4)


def _count(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counted(*args, **kw):
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_kernels_on_equal_kernels_off(monkeypatch):
    off, on = _twins(SMALL, 1)
    stats = _count(monkeypatch, compressor_kernels, "block_stats_triton")
    ids = _ids(14, 8)
    want = _steps(off, ids)
    assert stats[0] == 0
    got = _steps(on, ids)
    assert stats[0] > 0   # the compressor's accumulators came from the kernel
    assert (want - got).abs().max() < 2e-3, (want - got).abs().max()


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A checkpoint with FP8 linears (o_lora_rank 128, so wo_a's groups are whole scale blocks)."""
    cfg = SMALL.replace(o_lora_rank=128)
    path = tmp_path_factory.mktemp("fp8")
    save_official_checkpoint(Transformer(cfg).init_random(2, std=0.1), cfg, str(path), fp8=True)
    return cfg, str(path)


def _resident_fp8(cfg: ModelConfig, path: str, use_kernels: bool) -> Transformer:
    with torch.device("meta"):
        m = Transformer(cfg, use_kernels=use_kernels)
    load_checkpoint(m, path, dtype=torch.float32, keep_quantized=True,
                    device=torch.get_default_device())
    assert m.layers["2"].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    return m


def test_resident_fp8_linears_run_the_fp8_gemm(fp8_checkpoint, monkeypatch):
    """With kernels on, an FP8 linear is act_quant + fp8_gemm (the kernel, equal to its torch
    reference `fp8_linear_ref`); with them off it is the dequantized weight. The two differ by the
    activation's e4m3 rounding, within the bound fp8_gemm's own tests allow."""
    cfg, path = fp8_checkpoint
    m = _resident_fp8(cfg, path, use_kernels=True)
    gemm = _count(monkeypatch, fp8_gemm, "fp8_gemm_triton")
    lin: Linear = m.layers["2"].attn.wq_b
    x = torch.randn(5, lin.in_features)
    y = lin(x)
    assert gemm[0] == 1
    ref = fp8_gemm.fp8_linear_ref(x, lin.weight, lin.scale)
    # equal up to the fp32 sum order (and the FP8 tensor cores' narrower accumulator on a GPU)
    assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()
    dense = x @ quant.dequant_fp8_block(lin.weight, lin.scale).T
    assert (y - dense).abs().max() < 0.15 * dense.abs().max()
    wo_a: Linear = m.layers["2"].attn.wo_a          # grouped: one GEMM per group of 128 rows
    o = torch.randn(3, cfg.o_groups, wo_a.in_features)
    grouped = wo_a.forward_grouped(o, cfg.o_groups)
    assert gemm[0] == 1 + cfg.o_groups
    wa = quant.dequant_fp8_block(wo_a.weight, wo_a.scale).view(cfg.o_groups, cfg.o_lora_rank, -1)
    exact = torch.einsum("tgi,gri->tgr", o, wa).reshape(3, -1)
    assert (grouped - exact).abs().max() < 0.15 * exact.abs().max()


def _fp8_oracle(monkeypatch) -> None:
    """Kernel-off FP8 linears computed by the FP8 kernel's own torch reference (activation
    quantized, then the block-scaled GEMM) instead of the dequantized weight."""
    plain, grouped = Linear.forward, Linear.forward_grouped

    def forward(self, x):
        if self.use_kernels or self.weight.dtype != torch.float8_e4m3fn:
            return plain(self, x)
        return fp8_gemm.fp8_linear_ref(x.reshape(-1, self.in_features), self.weight, self.scale).view(
            *x.shape[:-1], self.out_features)

    def forward_grouped(self, x, groups):
        if self.use_kernels or self.weight.dtype != torch.float8_e4m3fn:
            return grouped(self, x, groups)
        rows, b = self.out_features // groups, self.out_features // groups // 128
        return torch.cat([fp8_gemm.fp8_linear_ref(x[:, g].contiguous(), self.weight[g * rows:(g + 1) * rows],
                                                  self.scale[g * b:(g + 1) * b]) for g in range(groups)], dim=-1)

    monkeypatch.setattr(Linear, "forward", forward)
    monkeypatch.setattr(Linear, "forward_grouped", forward_grouped)


def test_resident_fp8_model_kernels_on_vs_off(fp8_checkpoint, monkeypatch):
    """The whole model with resident FP8 linears (the reference forward: every linear, and no
    other kernel, so the interpreter stays quick): kernels on equal the FP8 kernel's torch
    reference in every linear, and stay near the dequantized path."""
    cfg, path = fp8_checkpoint
    off, on = _resident_fp8(cfg, path, False), _resident_fp8(cfg, path, True)
    gemm = _count(monkeypatch, fp8_gemm, "fp8_gemm_triton")
    ids = torch.tensor(_ids(14, 9))
    dequant = off.forward_reference(ids)
    assert gemm[0] == 0
    got = on.forward_reference(ids)
    assert gemm[0] > 0
    _fp8_oracle(monkeypatch)
    oracle = off.forward_reference(ids)
    assert (got - oracle).abs().max() < 1e-3 * oracle.abs().max(), (got - oracle).abs().max()
    # only the kernel path rounds each linear's input to e4m3 (as the official inference code
    # does): a few percent of the logits, compounded over the layers
    assert (got - dequant).norm() < 0.15 * dequant.norm(), ((got - dequant).norm() / dequant.norm())
