from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchv4.accounting.amortize import PricedRow, amortized_costs
from batchv4.accounting.cards import get_card
from batchv4.accounting.pricing import BEIJING, RowUsage, price_row, price_row_detail
from batchv4.accounting.summary import Totals, cheapest_window, compare_cards, price_totals, price_windows, summarize

UTC = timezone.utc
T = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # Tuesday, off-peak
FLASH = get_card("deepseek-v4-flash")


def priced(hit, miss, completion, card=FLASH):
    u = RowUsage(hit, miss, completion)
    return PricedRow(u, price_row_detail(u, card, T))


def test_amortization_spreads_the_shared_prefix():
    # a 1000-token document asked 3 questions: the first row paid misses for it, the others hit
    rows = [priced(0, 1010, 50), priced(1000, 12, 60), priced(1000, 8, 40)]
    out = amortized_costs(rows, ["doc", "doc", "doc"])
    costs = [r.cost.total_usd for r in rows]
    assert sum(out) == pytest.approx(sum(costs), rel=1e-12)
    assert out[0] < costs[0] and out[1] > costs[1] and out[2] > costs[2]
    # each row now carries the same prefix cost: differences come only from own tokens
    own = [r.cost.total_usd - a for r, a in zip(rows, out)]
    assert own[1] == pytest.approx(own[2])


def test_amortization_leaves_ungrouped_and_single_rows_alone():
    rows = [priced(0, 100, 10), priced(0, 200, 10), priced(50, 50, 5)]
    assert amortized_costs(rows, [None, "a", "b"]) == [r.cost.total_usd for r in rows]
    with pytest.raises(ValueError, match="differ in length"):
        amortized_costs(rows, [None])


def test_amortization_without_token_prices():
    u = RowUsage(0, 10, 1)
    assert amortized_costs([PricedRow(u, None), PricedRow(u, None)], ["g", "g"]) == [None, None]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 800), st.sampled_from(["flash", "gpt"])),
        min_size=1,
        max_size=12,
    )
)
def test_amortization_invariant(specs):
    cards = {"flash": FLASH, "gpt": get_card("gpt-5.4")}
    rows, groups = [], []
    for group, hit, miss, completion, card in specs:
        rows.append(priced(hit, miss, completion, cards[card]))
        groups.append(None if group == 0 else group)
    out = amortized_costs(rows, groups)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        assert sum(out[i] for i in idx) == pytest.approx(sum(rows[i].cost.total_usd for i in idx), rel=1e-9, abs=1e-15)
    assert all(x >= -1e-15 for x in out)


def row(hit, miss, completion, reasoning=0, cost=None, **extra):
    return {
        "id": "x",
        "prompt_tokens": hit + miss,
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": miss,
        "completion_tokens": completion,
        "reasoning_tokens": reasoning,
        "cost_usd": cost,
        **extra,
    }


def test_summarize():
    t = summarize([row(30, 70, 10, 4, 0.5, engine_seconds=2.0), row(0, 50, 5, 0, 0.25), row(20, 0, 1, 1, None)])
    assert (t.rows, t.prompt_tokens, t.prompt_cache_hit_tokens, t.prompt_cache_miss_tokens) == (3, 170, 50, 120)
    assert (t.completion_tokens, t.reasoning_tokens) == (16, 5)
    assert t.cost_usd == pytest.approx(0.75) and t.engine_seconds == 2.0 and t.cost_usd_self_hosted is None
    assert t.cache_hit_rate == pytest.approx(50 / 170)
    assert t.to_dict()["cache_hit_rate"] == pytest.approx(50 / 170)
    assert summarize([]) == Totals()
    bad = row(1, 1, 1)
    bad["prompt_tokens"] = 5
    with pytest.raises(ValueError, match="row 0"):
        summarize([bad])


def test_price_totals_is_sum_of_identical_rows():
    t = summarize([row(300, 700, 100)] * 4)
    one = price_row(RowUsage(300, 700, 100), FLASH, T)
    assert price_totals(t, FLASH, T) == pytest.approx(4 * one)
    assert price_totals(Totals(), FLASH, T) == 0.0


def test_long_context_tier_applies_per_request_not_per_total():
    gpt = get_card("gpt-5.4")
    t = summarize([row(0, 10_000, 10)] * 100)  # 1M prompt tokens in total, 10K per request
    assert price_totals(t, gpt, T) == pytest.approx(100 * price_row(RowUsage(0, 10_000, 10), gpt, T))


def test_compare_cards_peak_and_off_peak():
    t = summarize([row(500, 500, 200)] * 10)
    quotes = compare_cards(t, T, cards=["deepseek-v4-flash", "deepseek-v4-pro", "gpt-5.4", "gemini-3.1-pro", "claude-sonnet-4.6"])
    kinds = [(q.card, q.window) for q in quotes]
    assert kinds == [
        ("deepseek-v4-flash", "peak"),
        ("deepseek-v4-flash", "off-peak"),
        ("deepseek-v4-pro", "peak"),
        ("deepseek-v4-pro", "off-peak"),
        ("gpt-5.4", None),
        ("gemini-3.1-pro", None),
        ("claude-sonnet-4.6", None),
    ]
    flash_peak, flash_off = quotes[0], quotes[1]
    assert flash_peak.cost_usd == pytest.approx(2 * flash_off.cost_usd)
    assert flash_peak.at.astimezone(BEIJING).weekday() < 5  # a real weekday peak
    assert not flash_peak.approximate and quotes[4].approximate
    assert quotes[4].cost_usd == pytest.approx(price_totals(t, get_card("gpt-5.4"), T))


def test_cheapest_window():
    t = summarize([row(0, 1000, 100)])
    fri_peak = datetime(2026, 11, 27, 2, 30, tzinfo=UTC)  # Friday 10:30 Beijing
    w = cheapest_window(t, FLASH, fri_peak)
    assert w.start == datetime(2026, 11, 27, 4, 0, tzinfo=UTC) and w.end == datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
    assert w.cost_usd == pytest.approx(price_totals(t, FLASH, fri_peak) / 2)
    # already off-peak on a Saturday: the window runs to Monday 09:00 Beijing
    sat = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    w = cheapest_window(t, FLASH, sat)
    assert w.start == sat and w.end == datetime(2026, 11, 30, 1, 0, tzinfo=UTC)
    flat = cheapest_window(t, get_card("gpt-5.4"), sat)
    assert (flat.start, flat.end) == (sat, sat + timedelta(days=7))


def test_price_windows_cover_the_range_without_gaps():
    t = summarize([row(10, 90, 10)])
    ws = price_windows(t, get_card("deepseek-v4-pro"), T, days=3)
    assert ws[0].start == T and ws[-1].end == T + timedelta(days=3)
    assert all(a.end == b.start for a, b in zip(ws, ws[1:]))
    assert all(a.cost_usd != b.cost_usd for a, b in zip(ws, ws[1:]))
    with pytest.raises(ValueError, match="timezone-aware"):
        price_windows(t, FLASH, datetime(2026, 11, 24))
