"""Fused MoE (kernels/moe.py) and the weight formats it reads (kernels/quant.py)."""

import pytest
import torch
import torch.nn.functional as F

from batchv4.kernels.moe import fused_moe, fused_moe_ref, moe_align
from batchv4.kernels.quant import dequant_fp4, dequant_weight, quantize_fp4, quantize_fp8_block

T, D, I, E, K = 9, 64, 32, 4, 2


def _routing(num_tokens, num_experts, topk, empty=(), masked=()):
    ids = torch.stack([torch.randperm(num_experts)[:topk] for _ in range(num_tokens)]).int()
    for e in empty:  # reroute so expert e gets no tokens (duplicates within a row are allowed)
        ids = torch.where(ids == e, (e + 1) % num_experts, ids)
    for t, j in masked:
        ids[t, j] = -1
    return ids, torch.rand(num_tokens, topk)


def _weights(fmt, num_experts=E, dim=D, inter=I):
    w1, w3 = torch.randn(num_experts, inter, dim) / 8, torch.randn(num_experts, inter, dim) / 8
    w2 = torch.randn(num_experts, dim, inter) / 8
    if fmt == "bf16":
        return dict(w1=w1.bfloat16(), w3=w3.bfloat16(), w2=w2.bfloat16())
    quant = quantize_fp8_block if fmt == "fp8" else quantize_fp4
    out = {}
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        out[name], out[name + "_scale"] = quant(w)
    return out


def _naive(x, ids, route_w, ws, limit):
    """Token by token, slot by slot: the definition in the issue, independent of fused_moe_ref."""
    w1 = dequant_weight(ws["w1"], ws.get("w1_scale"))
    w3 = dequant_weight(ws["w3"], ws.get("w3_scale"))
    w2 = dequant_weight(ws["w2"], ws.get("w2_scale"))
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w1.shape[0]:
                continue
            g, u = w1[e] @ x[t].float(), w3[e] @ x[t].float()
            if limit is not None:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            h = (F.silu(g) * u * route_w[t, j]).to(x.dtype).float()
            y[t] += w2[e] @ h
    return y.to(x.dtype)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp4"])
def test_fused_moe_matches_reference_ragged_empty_masked(fmt, bf16_close):
    x = torch.randn(T, D).bfloat16()
    ids, route_w = _routing(T, E, K, empty=(3,), masked=((0, 0), (5, 1)))
    ws = _weights(fmt)
    ref = fused_moe_ref(x, ids, route_w, swiglu_limit=1.0, **ws)
    out = fused_moe(x, ids, route_w, swiglu_limit=1.0, use_triton=True, **ws)
    assert out.dtype == torch.bfloat16 and out.shape == (T, D)
    # h is rounded to bf16 before w2 (as in V4); a 1-ulp flip of h from a different fp32 sum order
    # moves y by ~|w2| * ulp(h), so compare at the output's scale rather than per element.
    bf16_close(out, ref, of_max=True)
    bf16_close(ref, _naive(x, ids, route_w, ws, 1.0), of_max=True)


def test_fused_moe_single_token_int64_ids(bf16_close):
    x = torch.randn(1, D).bfloat16()
    ids, route_w = _routing(1, E, 3)
    ws = _weights("bf16")
    out = fused_moe(x, ids.long(), route_w, swiglu_limit=0.5, use_triton=True, **ws)
    bf16_close(out, fused_moe_ref(x, ids.long(), route_w, swiglu_limit=0.5, **ws), of_max=True)


def test_fused_moe_fp32_unclamped_odd_sizes():
    # D, I not multiples of the tiles; fp32 activations keep the whole path in fp32.
    x = torch.randn(5, 40)
    ids, route_w = _routing(5, 3, 2)
    ws = dict(w1=torch.randn(3, 24, 40), w3=torch.randn(3, 24, 40), w2=torch.randn(3, 40, 24))
    out = fused_moe(x, ids, route_w, swiglu_limit=None, use_triton=True, **ws)
    torch.testing.assert_close(out, fused_moe_ref(x, ids, route_w, **ws), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, _naive(x, ids, route_w, ws, None), rtol=1e-5, atol=1e-4)


def test_fused_moe_all_slots_masked_gives_zeros():
    x = torch.randn(3, D).bfloat16()
    ids = torch.full((3, 2), -1, dtype=torch.int32)
    out = fused_moe(x, ids, torch.rand(3, 2), use_triton=True, **_weights("bf16"))
    assert torch.equal(out, torch.zeros_like(out))


def test_dispatch_on_cpu_uses_reference(monkeypatch):
    import batchv4.kernels.moe as moe

    monkeypatch.setattr(moe, "fused_moe_triton", lambda *a: pytest.fail("triton path taken on CPU"))
    x = torch.randn(2, D).bfloat16()
    ids, route_w = _routing(2, E, K)
    out = moe.fused_moe(x, ids, route_w, **_weights("bf16"))  # use_triton=None
    assert out.shape == (2, D)


def test_moe_align_blocks_are_single_expert_and_cover_every_slot():
    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [2, 5]], dtype=torch.int32)  # 5 is out of range
    sorted_slots, block_expert = moe_align(ids, num_experts=4, block_m=2)
    num_slots = ids.numel()
    blocks = sorted_slots.view(-1, 2)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        slots = [s for s in blocks[b].tolist() if s < num_slots]
        if e < 0:
            assert not slots
            continue
        assert slots and all(int(ids.view(-1)[s]) == e for s in slots)
        seen += slots
    assert sorted(seen) == [0, 1, 2, 4, 5, 6]  # every routed slot exactly once, -1 and 5 dropped
    assert block_expert.tolist()[:3] == [0, 2, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(T, D, dtype=torch.float64)), "x must have dtype"),
        (dict(topk_weights=torch.rand(T, K + 1)), "topk_weights must have shape"),
        (dict(w2=torch.randn(E, D, I + 1).bfloat16()), "w2 must have shape"),
        (dict(w1_scale=torch.ones(E, 1, 1)), "scales were given"),
    ],
)
def test_fused_moe_rejects_bad_layouts(change, message):
    args = dict(x=torch.randn(T, D).bfloat16(), topk_ids=torch.zeros(T, K, dtype=torch.int32),
                topk_weights=torch.rand(T, K), **_weights("bf16"))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        fused_moe(**args, use_triton=True)


def test_quantized_weights_need_their_scales():
    ws = _weights("fp4")
    ws.pop("w2_scale")
    with pytest.raises(ValueError, match="w2_scale is required"):
        fused_moe(torch.randn(2, D).bfloat16(), torch.zeros(2, K, dtype=torch.int32), torch.rand(2, K), **ws)


def test_fp4_low_nibble_is_the_even_index():
    packed = torch.tensor([[0x21, 0xF9]], dtype=torch.uint8)  # codes 1,2 then 9 (-0.5), 15 (-6)
    scale = torch.tensor([[2.0]])
    got = dequant_fp4(torch.cat([packed] * 8, 1), scale)  # K = 32, one scale group
    assert got[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0]


def test_fp4_and_fp8_quantizers_round_trip_representable_values():
    codes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]).repeat(2, 8) * torch.tensor([[1.0], [-0.25]])
    packed, scale = quantize_fp4(codes)
    assert torch.equal(dequant_fp4(packed, scale), codes)
    w = torch.randn(130, 200).to(torch.float8_e4m3fn).float()  # exactly representable, ragged blocks
    q, s = quantize_fp8_block(w)
    assert s.shape == (2, 2) and torch.equal(dequant_weight(q, s), w)
