import math

import pytest
import torch

from batchv4.model import quant

E8M0 = torch.float8_e8m0fnu


def e8m0(*bytes_):
    return torch.tensor(bytes_, dtype=torch.uint8)


def test_e8m0_to_float_bytes_and_dtype():
    got = quant.e8m0_to_float(e8m0(0, 126, 127, 128, 140, 254))
    assert got.dtype == torch.float32
    assert got.tolist() == [2.0 ** -127, 0.5, 1.0, 2.0, 2.0 ** 13, 2.0 ** 127]
    assert quant.e8m0_to_float(e8m0(129).view(E8M0)).tolist() == [4.0]
    assert math.isnan(quant.e8m0_to_float(e8m0(255)).item())


def test_dequant_fp8_block_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).to(torch.float8_e4m3fn)
    assert quant.dequant_fp8_block(w, e8m0(128).view(1, 1).view(E8M0)).tolist() == [[2, 4], [6, -8]]
    # 130 rows x 3 cols: rows 0..127 use scale row 0, rows 128..129 scale row 1
    w = torch.ones(130, 3).to(torch.float8_e4m3fn)
    out = quant.dequant_fp8_block(w, torch.tensor([[1.0], [0.25]]))
    assert out[:128].eq(1).all() and out[128:].eq(0.25).all()
    # batched [E, O, I]
    wb = torch.ones(2, 4, 4).to(torch.float8_e4m3fn)
    out = quant.dequant_fp8_block(wb, torch.tensor([[[2.0]], [[8.0]]]))
    assert out[0].eq(2).all() and out[1].eq(8).all()
    with pytest.raises(ValueError, match="block scales"):
        quant.dequant_fp8_block(w, torch.ones(1, 1))


@pytest.mark.parametrize("fmt", ["e8m0", "f32"])
def test_quant_fp8_block_scales(fmt):
    w = torch.zeros(256, 128)
    w[0, 0] = 448.0 * 8      # block (0, 0): amax 448 * 2^3
    w[200, 5] = -448.0 / 4   # block (1, 0): amax 448 * 2^-2
    w[1, 1] = 17.0 * 8       # 17 lies halfway between e4m3 16 and 18: ties to even -> 16
    w8, s = quant.quant_fp8_block(w, scale_format=fmt)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (2, 1)
    if fmt == "e8m0":
        assert s.dtype == E8M0 and s.view(torch.uint8).flatten().tolist() == [130, 125]
    assert quant.scale_to_float(s).flatten().tolist() == [8.0, 0.25]
    d = quant.dequant_fp8_block(w8, s)
    assert d[0, 0] == 448 * 8 and d[200, 5] == -112 and d[1, 1] == 16 * 8


def test_quant_zero_blocks():
    w8, s = quant.quant_fp8_block(torch.zeros(130, 64))
    assert quant.dequant_fp8_block(w8, s).eq(0).all() and s.view(torch.uint8).flatten().tolist() == [0, 0]
    packed, s4 = quant.quant_fp4(torch.zeros(2, 32))
    assert packed.eq(0).all() and quant.dequant_fp4(packed, s4).eq(0).all()


def test_unpack_fp4_nibble_order_and_table():
    assert quant.unpack_fp4(torch.tensor([0x21], dtype=torch.uint8)).tolist() == [0.5, 1.0]
    assert quant.unpack_fp4(torch.tensor([0x21], dtype=torch.int8)).tolist() == [0.5, 1.0]
    # 0xF8: low nibble 8 = -0.0, high nibble 15 = -6
    lo, hi = quant.unpack_fp4(torch.tensor([-8], dtype=torch.int8)).tolist()
    assert (lo, hi) == (0.0, -6.0) and math.copysign(1, lo) == -1
    codes = torch.arange(16, dtype=torch.uint8)
    assert quant.unpack_fp4(codes)[0::2].tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]


def test_dequant_fp4_scales_per_32():
    packed = torch.full((2, 32), 0x22, dtype=torch.uint8)            # 64 values, all 1.0
    scale = e8m0(128, 126, 127, 130).view(2, 2).view(E8M0)          # 2, 0.5 / 1, 8
    out = quant.dequant_fp4(packed, scale)
    assert out.shape == (2, 64)
    assert out[0, :32].eq(2).all() and out[0, 32:].eq(0.5).all()
    assert out[1, :32].eq(1).all() and out[1, 32:].eq(8).all()


def test_quant_fp4_hand_packed_bytes():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([0.5, 1.0, 6.0])   # amax 6 -> scale 1
    packed, scale = quant.quant_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16)
    assert packed.view(torch.uint8)[0, :2].tolist() == [0x21, 0x07]
    assert scale.view(torch.uint8).tolist() == [[127]]
    w2 = w * 2.0 ** -5
    packed2, scale2 = quant.quant_fp4(w2)
    assert torch.equal(packed2, packed) and scale2.view(torch.uint8).tolist() == [[122]]
    assert torch.equal(quant.dequant_fp4(packed2, scale2), w2)


def test_round_e2m1_ties_to_even():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    table = torch.tensor(quant.E2M1_VALUES)
    assert table[quant.round_e2m1(mids).long()].tolist() == want
    assert table[quant.round_e2m1(-mids).long()].tolist() == [-v for v in want]
    off = torch.tensor([0.26, 0.74, 1.26, 1.74, 2.6, 3.4, 5.1])
    assert table[quant.round_e2m1(off).long()].tolist() == [0.5, 0.5, 1.5, 1.5, 3.0, 3.0, 6.0]


def test_fp4_qdq_by_hand():
    x = torch.zeros(2, 32)
    x[0, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x[1, :8] = x[0, :8] * 2.0 ** -3    # amax 0.75 -> s = 2^ceil(log2(0.125)) = 2^-3
    out = quant.fp4_qdq(x)
    assert out[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert torch.equal(out[1], out[0] * 2.0 ** -3)
    assert quant.fp4_qdq(torch.zeros(32)).eq(0).all()
    xb = x.to(torch.bfloat16)
    assert quant.fp4_qdq(xb).dtype == torch.bfloat16


def test_fp8_qdq_by_hand():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 448.0 * 4, 17.0 * 4      # block 0: s = 4; 17 ties to 16
    x[0, 64], x[0, 65] = 449.0, 3.0              # block 1: s = 2^ceil(log2(449/448)) = 2
    out = quant.fp8_qdq(x, block=64)
    assert out[0, :2].tolist() == [448.0 * 4, 64.0]
    assert out[0, 64:66].tolist() == [448.0, 3.0]    # 449/2 = 224.5 -> 224 (e4m3 step 16 there)
    assert quant.fp8_qdq(torch.zeros(3, 64)).eq(0).all()


def test_act_quant_fp8_rows_matches_qdq():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)) * 10
    q, s = quant.act_quant_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 256) and s.shape == (3, 2)
    deq = (q.float().view(3, 2, 128) * s[..., None]).view(3, 256)
    assert torch.equal(deq, quant.fp8_qdq(x, block=128))
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two


def test_hadamard():
    n = 8
    e = torch.eye(n)
    h = quant.hadamard(e)
    assert torch.allclose(h[0], torch.full((n,), n ** -0.5))
    assert torch.allclose(h[1], torch.tensor([1., -1, 1, -1, 1, -1, 1, -1]) * n ** -0.5)
    assert torch.allclose(quant.hadamard(h), e, atol=1e-6)   # normalized WHT is its own inverse
    assert torch.allclose(h @ h.T, e, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard(torch.ones(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kv_entries_hold_the_simulated_values_exactly(dtype):
    """A packed entry unpacks to fp8_qdq of its non-RoPE dims and its RoPE dims unchanged, over
    scales from 1e-6 to 1e3 (the 1e-4 amax floor included); packing simulated values again changes
    nothing. 584 bytes per entry at V4's dims in bf16, as model-info counts."""
    from batchv4.config import ModelConfig
    from batchv4.model.info import indexer_key_bytes, kv_entry_bytes

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 3, 512, generator=g) * torch.logspace(-6, 3, 6)[:, None, None]).to(dtype)
    b = quant.pack_kv_entries(x, 64)
    assert b.dtype == torch.uint8 and b.shape[-1] == quant.kv_entry_nbytes(512, 64, dtype)
    want = torch.cat([quant.fp8_qdq(x[..., :448].float()).to(dtype), x[..., 448:]], dim=-1)
    assert torch.equal(quant.unpack_kv_entries(b, 512, 64, dtype), want)
    assert torch.equal(quant.unpack_kv_entries(quant.pack_kv_entries(want, 64), 512, 64, dtype), want)
    flash = ModelConfig.load("deepseek-v4-flash")
    assert quant.kv_entry_nbytes(flash.head_dim, flash.rope_head_dim, torch.bfloat16) == kv_entry_bytes(flash) == 584
    assert quant.fp4_row_nbytes(flash.index_head_dim) == indexer_key_bytes(flash) == 68


def test_packed_fp4_rows_hold_the_simulated_values_exactly():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(7, 128, generator=g) * torch.logspace(-30, 2, 7)[:, None]
    b = quant.pack_fp4_rows(k)
    assert b.dtype == torch.uint8 and b.shape == (7, 68)
    assert torch.equal(quant.unpack_fp4_rows(b, 128), quant.fp4_qdq(k))
    assert torch.equal(quant.unpack_fp4_rows(quant.pack_fp4_rows(quant.fp4_qdq(k)), 128), quant.fp4_qdq(k))


def test_fp8_layout_pages_hold_the_production_bytes_per_token():
    """The packed layout's paged bytes per token at V4-Flash and V4-Pro geometry equal the
    production figure model-info reports (entries + indexer keys, per token)."""
    from batchv4.config import ModelConfig
    from batchv4.model.forward_batch import CacheLayout
    from batchv4.model.info import kv_sizes

    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        cfg = ModelConfig.load(name)
        packed = CacheLayout(cfg, torch.bfloat16, 8, kv_format="fp8")
        assert packed.bytes_per_token() == pytest.approx(kv_sizes(cfg, 1 << 20).bytes_per_token)
        assert packed.bytes_per_token() < 0.6 * CacheLayout(cfg, torch.bfloat16, 8).bytes_per_token()
