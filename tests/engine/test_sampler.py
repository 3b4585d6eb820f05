import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchv4 import SamplingParams
from batchv4.engine.sampler import RowState, Sampler, apply_penalties, filter_logits, inverse_cdf, sampling_uniform

NEG_INF = float("-inf")


def row(params=None, request_id="r", sample_index=0, step=0, prompt=(), output=()):
    return RowState(params or SamplingParams(), request_id, sample_index, step, list(prompt), list(output))


def log_probs(*ps):
    return torch.tensor([[math.log(p) for p in ps]], dtype=torch.float32)


def kept(logits, **kw):
    out = filter_logits(logits, [SamplingParams(**kw)])
    return [i for i, v in enumerate(out[0].tolist()) if v != NEG_INF]


PROBS = (0.5, 0.2, 0.15, 0.1, 0.05)


def test_temperature_divides_logits():
    out = filter_logits(torch.tensor([[1.0, 2.0, -3.0]]), [SamplingParams(temperature=0.5)])
    assert out.tolist() == [[2.0, 4.0, -6.0]]


def test_top_k_keeps_k_best_and_ties_at_the_boundary():
    assert kept(log_probs(*PROBS), top_k=2) == [0, 1]
    assert kept(torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]]), top_k=2) == [1, 2, 3]
    assert kept(log_probs(*PROBS), top_k=50) == [0, 1, 2, 3, 4]


def test_top_p_keeps_smallest_prefix_reaching_p():
    # Mass before each token, best first: 0, .5, .7, .85, .95.
    assert kept(log_probs(*PROBS), top_p=0.8) == [0, 1, 2]
    assert kept(log_probs(*PROBS), top_p=0.5) == [0]
    assert kept(log_probs(*PROBS), top_p=0.51) == [0, 1]
    # Ties: the lower id counts first.
    assert kept(log_probs(0.3, 0.3, 0.4), top_p=0.6) == [0, 2]


def test_top_p_applies_after_top_k():
    # After top-k=2 the distribution is (.714, .286): top_p .65 keeps only token 0. On the full
    # distribution it would keep tokens 0 and 1.
    assert kept(log_probs(*PROBS), top_k=2, top_p=0.65) == [0]
    assert kept(log_probs(*PROBS), top_p=0.65) == [0, 1]


def test_min_p_keeps_tokens_above_fraction_of_max():
    assert kept(log_probs(*PROBS), min_p=0.35) == [0, 1]  # floor .175
    assert kept(log_probs(*PROBS), min_p=0.25) == [0, 1, 2]  # floor .125
    # min-p after top-p: top_p .9 keeps 0..3, then min_p .25 (relative, unchanged) drops token 3.
    assert kept(log_probs(*PROBS), top_p=0.9, min_p=0.25) == [0, 1, 2]


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.1)
    out = apply_penalties(logits, [row(p, prompt=[0], output=[1, 1, 2])])
    # rep: 2/2, -1*2, .5/2 (prompt+output tokens); then freq*count + presence on output tokens.
    assert torch.allclose(out, torch.tensor([[1.0, -2.0 - 1.0 - 0.1, 0.25 - 0.5 - 0.1, 1.0, 3.0]]))
    assert logits[0, 0] == 2.0  # the caller's tensor is not modified
    assert apply_penalties(logits, [row()]) is logits


def test_penalties_reject_out_of_range_ids():
    with pytest.raises(ValueError, match="request r: token ids must be in"):
        apply_penalties(torch.zeros(1, 4), [row(SamplingParams(presence_penalty=1.0), output=[4])])


def test_greedy_argmax_ties_to_lower_id_and_sees_penalties():
    sampler = Sampler(0)
    g = SamplingParams(temperature=0)
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [1.0, 3.0, 2.9, 0.0]])
    rows = [row(g), row(g), row(g.replace(presence_penalty=0.5), output=[1])]
    assert [r.token_id for r in sampler.sample(logits, rows)] == [1, 0, 2]


def test_inverse_cdf_in_token_order():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25]] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.75, 1.0 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 4, 4]
    # u * total rounding up to total must still pick a token with probability.
    one = torch.tensor([1.0], dtype=torch.float64)
    assert inverse_cdf(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), one).tolist() == [1]


def test_sample_uses_documented_uniform():
    logits = log_probs(0.1, 0.2, 0.3, 0.4)
    params = SamplingParams(seed=123)
    for step in range(20):
        u = sampling_uniform(123, "req-7", 2, step)
        expected = next(i for i, c in enumerate([0.1, 0.3, 0.6, 1.0]) if c > u)
        got = Sampler(default_seed=999).sample(logits, [row(params, "req-7", 2, step)])[0].token_id
        assert got == expected


def _random_rows():
    return [
        row(SamplingParams(), "a", 0, 5),
        row(SamplingParams(temperature=0.7, top_p=0.9, seed=3), "b", 1, 0),
        row(SamplingParams(top_k=50, min_p=0.01), "c", 0, 2, prompt=[1, 2], output=[3]),
        row(SamplingParams(temperature=0), "d", 0, 1),
        row(SamplingParams(temperature=1.3, repetition_penalty=1.2, frequency_penalty=0.3), "e", 3, 7,
            prompt=[5, 6, 7], output=[7, 7, 9]),
    ]


def test_token_is_independent_of_batch_composition_and_order():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=gen) * 2
    rows = _random_rows()
    batch = Sampler(42).sample(logits, rows)
    for i in range(5):
        alone = Sampler(42).sample(logits[i : i + 1], [rows[i]])[0]
        assert alone == batch[i]
    perm = [3, 0, 4, 2, 1]
    shuffled = Sampler(42, max_rows_per_chunk=2).sample(logits[perm], [rows[i] for i in perm])
    assert [r.token_id for r in shuffled] == [batch[i].token_id for i in perm]


def test_streams_differ_by_sample_index_and_seed():
    logits = torch.zeros(1, 1000)  # uniform: any two streams collide with probability 1/1000 per step

    def tokens(sampler, **kw):
        return [sampler.sample(logits, [row(step=s, **kw)])[0].token_id for s in range(8)]

    assert tokens(Sampler(1), sample_index=0) == tokens(Sampler(1), sample_index=0)
    assert tokens(Sampler(1), sample_index=0) != tokens(Sampler(1), sample_index=1)
    assert tokens(Sampler(1), sample_index=0) != tokens(Sampler(2), sample_index=0)
    assert tokens(Sampler(1), request_id="x") != tokens(Sampler(1), request_id="y")
    seeded = SamplingParams(seed=5)
    assert tokens(Sampler(1), params=seeded) == tokens(Sampler(2), params=seeded)


def test_logprobs_are_raw_log_softmax_with_top_k():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 1.0, 2.0]])
    params = SamplingParams(temperature=0.3, top_k=2, logprobs=3, repetition_penalty=1.5)
    res = Sampler(0).sample(logits, [row(params, prompt=[4])])[0]
    raw = torch.log_softmax(logits[0], -1)
    assert list(res.top_logprobs)[:3] == [1, 2, 5]  # ties -> lower id first
    for tok, lp in res.top_logprobs.items():
        assert lp == pytest.approx(raw[tok].item(), abs=1e-6)
    assert res.logprob == pytest.approx(raw[res.token_id].item(), abs=1e-6)
    assert res.token_id in (1, 2, 5)  # top_k=2 keeps every token tied with the 2nd best
    assert Sampler(0).sample(logits, [row(SamplingParams(logprobs=None))])[0].top_logprobs is None


def test_logprobs_zero_and_sampled_token_outside_top():
    logits = torch.tensor([[2.5, 0.0, 1.0]])
    res = Sampler(0).sample(logits, [row(SamplingParams(logprobs=0, top_k=1))])[0]
    assert res.top_logprobs == {0: pytest.approx(res.logprob)}
    pen = SamplingParams(temperature=0, logprobs=1, presence_penalty=2.0)
    res = Sampler(0).sample(logits, [row(pen, output=[0, 0])])[0]
    assert res.token_id == 2 and list(res.top_logprobs) == [0, 2]


def test_bad_logits_are_rejected():
    sampler = Sampler(0)
    with pytest.raises(ValueError, match="2 rows but 1 row states"):
        sampler.sample(torch.zeros(2, 3), [row()])
    with pytest.raises(ValueError, match="requests bad"):
        sampler.sample(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), [row(), row(request_id="bad")])
    with pytest.raises(ValueError, match="requests r"):
        sampler.sample(torch.full((1, 3), NEG_INF), [row()])
    with pytest.raises(ValueError, match="default_seed must be an integer"):
        Sampler("0")


def _reference_kept(logits, p):
    """Slow float64 reference of the filters, with a small tolerance at every threshold."""
    x = [v / p.temperature for v in logits]
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    keep = set(range(len(x)))
    if 0 < p.top_k < len(x):
        kth = x[order[p.top_k - 1]]
        keep = {i for i in keep if x[i] >= kth - 1e-9}
    if p.top_p < 1:
        z = sum(math.exp(x[i] - x[order[0]]) for i in keep)
        mass, top = 0.0, set()
        for i in order:
            if i in keep:
                if mass >= p.top_p + 1e-6:
                    break
                top.add(i)
                mass += math.exp(x[i] - x[order[0]]) / z
        keep = top
    if p.min_p > 0:
        keep = {i for i in keep if math.exp(x[i] - x[order[0]]) >= p.min_p * (1 - 1e-6)}
    return keep


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    logits=st.lists(st.integers(-20, 20).map(lambda v: v / 4), min_size=2, max_size=12),
    temperature=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
    top_k=st.integers(0, 12),
    top_p=st.sampled_from([0.05, 0.3, 0.77, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.02, 0.3, 0.9]),
    step=st.integers(0, 10_000),
    request_id=st.text(max_size=8),
)
def test_sampled_token_survives_filtering(logits, temperature, top_k, top_p, min_p, step, request_id):
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, logprobs=2)
    t = torch.tensor([logits])
    r = row(p, request_id, 0, step)
    res = Sampler(7).sample(t, [r])[0]
    probs = torch.softmax(Sampler(7).processed_logits(t, [r]).double(), -1)[0]
    assert probs[res.token_id] > 0
    assert res.token_id in _reference_kept(logits, p)
    assert res.token_id in res.top_logprobs and len(res.top_logprobs) <= 3
