import json
from datetime import datetime, timedelta, timezone

import pytest
from genai_prices import Usage, calc_price

from batchv4.accounting.cards import BUILTIN_CARDS, DEFAULT_CARD, get_card, load_price_file
from batchv4.accounting.pricing import (
    BEIJING,
    RowUsage,
    billing_instant,
    price_row,
    price_row_detail,
    self_hosted_cost,
)

UTC = timezone.utc
MON_PEAK = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # Monday 10:00 Beijing
MON_OFF = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # Monday 20:00 Beijing
SAT_PEAK = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)  # Saturday 15:00 Beijing, inside 06:00-10:00 UTC
USAGE = RowUsage(prompt_cache_hit_tokens=300_000, prompt_cache_miss_tokens=700_000, completion_tokens=50_000, reasoning_tokens=20_000)


def reference(card, usage, when):
    u = Usage(input_tokens=usage.prompt_tokens, cache_read_tokens=usage.prompt_cache_hit_tokens, output_tokens=usage.completion_tokens)
    return float(calc_price(u, card.model_ref, provider_id=card.provider_id, genai_request_timestamp=when, price_context=dict(card.price_context) or None).total_price)


def test_default_card_and_all_builtin_cards_resolve_in_genai_prices():
    assert DEFAULT_CARD == "deepseek-v4-flash"
    for name, card in BUILTIN_CARDS.items():
        assert card.source == "genai-prices"
        assert price_row(USAGE, card, MON_OFF) > 0, name


@pytest.mark.parametrize("name", sorted(BUILTIN_CARDS))
@pytest.mark.parametrize("when", [MON_OFF, datetime(2026, 3, 2, 12, tzinfo=UTC), datetime(2026, 9, 1, 20, tzinfo=UTC)])
def test_matches_calc_price_off_peak_weekdays(name, when):
    card = get_card(name)
    assert price_row(USAGE, card, when) == pytest.approx(reference(card, USAGE, when), rel=1e-12)


def test_weekday_off_peak_row_matches_calc_price_exactly():
    card = get_card("deepseek-v4-flash")
    assert billing_instant(card, MON_OFF) == MON_OFF
    assert price_row(USAGE, card, MON_OFF) == reference(card, USAGE, MON_OFF)


def test_weekday_peak_row_costs_peak_price():
    card = get_card("deepseek-v4-flash")
    peak = price_row(USAGE, card, MON_PEAK)
    assert peak == pytest.approx(reference(card, USAGE, MON_PEAK))
    assert peak == pytest.approx(2 * price_row(USAGE, card, MON_OFF))  # DeepSeek: off-peak is half of peak


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro", "deepseek-v4.1-flash"])
def test_saturday_peak_hour_costs_off_peak_price(name):
    card = get_card(name)
    assert SAT_PEAK.astimezone(BEIJING).weekday() == 5
    naive_table = reference(card, USAGE, SAT_PEAK)  # genai-prices charges peak here
    fixed = price_row(USAGE, card, SAT_PEAK)
    same_day_off_peak = reference(card, USAGE, SAT_PEAK.replace(hour=12))
    assert fixed == pytest.approx(same_day_off_peak, rel=1e-12)
    assert fixed == pytest.approx(naive_table / 2)


def test_weekend_is_beijing_time():
    card = get_card("deepseek-v4-flash")
    # Sunday 23:30 UTC is Monday 07:30 in Beijing (off-peak anyway); Monday 01:30 UTC is a Beijing weekday peak
    assert billing_instant(card, datetime(2026, 11, 23, 1, 30, tzinfo=UTC)) == datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
    # Friday 09:00 UTC = Friday 17:00 Beijing: a weekday, still peak
    fri = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    assert billing_instant(card, fri) == fri
    # the same instant given in another timezone is the same row
    local = SAT_PEAK.astimezone(timezone(timedelta(hours=-5)))
    assert price_row(USAGE, card, local) == price_row(USAGE, card, SAT_PEAK)


def test_before_peak_billing_began_v4_was_flat():
    card = get_card("deepseek-v4-flash")
    early_peak = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)  # a Monday, inside a window the table applies on every date
    assert price_row(USAGE, card, early_peak) == pytest.approx(reference(card, USAGE, datetime(2026, 6, 1, 12, tzinfo=UTC)))


def test_other_cards_are_not_corrected():
    card = get_card("gpt-5.4")
    assert billing_instant(card, SAT_PEAK) == SAT_PEAK
    assert price_row(USAGE, card, SAT_PEAK) == pytest.approx(reference(card, USAGE, SAT_PEAK))


def test_reasoning_is_not_charged_twice():
    card = get_card("deepseek-v4-pro")
    with_reasoning = RowUsage(100, 900, 500, reasoning_tokens=400)
    without = RowUsage(100, 900, 500, reasoning_tokens=0)
    assert price_row(with_reasoning, card, MON_OFF) == price_row(without, card, MON_OFF)
    detail = price_row_detail(with_reasoning, card, MON_OFF)
    out_rate = calc_price(Usage(output_tokens=1_000_000), card.model_ref, provider_id="deepseek", genai_request_timestamp=MON_OFF).total_price
    assert detail.output_usd == pytest.approx(500 * float(out_rate) / 1e6)
    with pytest.raises(ValueError, match="reasoning is part of completion"):
        RowUsage(0, 10, 5, reasoning_tokens=6)


def test_detail_parts_sum_to_total():
    for name in BUILTIN_CARDS:
        d = price_row_detail(USAGE, get_card(name), MON_OFF)
        assert d.other_usd == pytest.approx(0, abs=1e-12)
        assert d.total_usd == pytest.approx(d.miss_usd + d.hit_usd + d.output_usd)


def test_hit_plus_miss_must_equal_prompt():
    row = {"prompt_tokens": 100, "prompt_cache_hit_tokens": 30, "prompt_cache_miss_tokens": 60, "completion_tokens": 5}
    with pytest.raises(ValueError, match=r"prompt_tokens \(100\) != prompt_cache_hit_tokens \(30\) \+ prompt_cache_miss_tokens \(60\)"):
        price_row(row, get_card(DEFAULT_CARD), MON_OFF)
    row["prompt_cache_miss_tokens"] = 70
    assert price_row(row, get_card(DEFAULT_CARD), MON_OFF) > 0
    with pytest.raises(ValueError, match="non-negative integer"):
        RowUsage(-1, 0, 0)
    with pytest.raises(ValueError, match="missing completion_tokens"):
        RowUsage.from_mapping({"prompt_cache_hit_tokens": 1, "prompt_cache_miss_tokens": 1})


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        price_row(USAGE, get_card(DEFAULT_CARD), datetime(2026, 11, 23, 12))


def test_unknown_card_lists_known_ones():
    with pytest.raises(ValueError, match="unknown price card 'gpt-9'.*deepseek-v4-flash"):
        get_card("gpt-9")


def test_price_file_overrides(tmp_path):
    doc = {
        "cards": {
            "contract": {"input_per_mtok": 1.0, "cached_input_per_mtok": 0.1, "output_per_mtok": 2.0},
            "no-cache": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            "h200": {"gpu_hour_usd": 3.6},
            "flash-on-h200": {"base": "deepseek-v4-flash", "gpu_hour_usd": 7.2},
            "gpt55": {"model_ref": "gpt-5.5", "provider_id": "openai", "price_context": {"processing": "batch"}},
        }
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(doc))
    cards = load_price_file(path)
    u = RowUsage(1_000_000, 2_000_000, 1_000_000)
    assert price_row(u, cards["contract"], MON_OFF) == pytest.approx(0.1 + 2.0 + 2.0)
    assert price_row(u, cards["no-cache"], MON_OFF) == pytest.approx(1.0 + 2.0 + 2.0)
    assert price_row(u, cards["h200"], MON_OFF) is None
    assert self_hosted_cost(10.0, cards["h200"]) == pytest.approx(0.01)
    assert self_hosted_cost(10.0, get_card("deepseek-v4-flash")) is None
    flash = cards["flash-on-h200"]
    assert price_row(u, flash, SAT_PEAK) == price_row(u, get_card("deepseek-v4-flash"), SAT_PEAK)
    assert self_hosted_cost(3600, flash) == pytest.approx(7.2)
    assert price_row(u, cards["gpt55"], MON_OFF) == pytest.approx(reference(cards["gpt55"], u, MON_OFF))
    assert get_card("contract", cards) is cards["contract"]
    toml = tmp_path / "prices.toml"
    toml.write_text('[cards.t]\ninput_per_mtok = 0.5\noutput_per_mtok = 1.5\ngpu_hour_usd = 2\n')
    t = load_price_file(toml)["t"]
    assert (t.input_per_mtok, t.output_per_mtok, t.gpu_hour_usd, t.source) == (0.5, 1.5, 2.0, "private")


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"cards": {"x": {"input_per_mtok": -1, "output_per_mtok": 1}}}, "input_per_mtok must be a non-negative number"),
        ({"cards": {"x": {"input_per_mtok": 1}}}, "together"),
        ({"cards": {"x": {"price": 1}}}, "unknown field 'price'"),
        ({"cards": {"x": {"base": "nope"}}}, "unknown price card 'nope'"),
        ({"cards": {"x": {"provider_id": "openai"}}}, "provider_id needs model_ref"),
        ({"prices": {}}, "top-level 'cards'"),
    ],
)
def test_bad_price_files(tmp_path, doc, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        load_price_file(path)
    assert "\n" not in str(e.value)


def test_private_card_with_unknown_model(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"cards": {"typo": {"model_ref": "gpt-5.44", "provider_id": "openai"}}}))
    with pytest.raises(ValueError, match="price card 'typo': genai-prices has no model 'gpt-5.44'"):
        price_row(USAGE, load_price_file(path)["typo"], MON_OFF)


def test_unreadable_price_files(tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_price_file(tmp_path / "bad.json")
    with pytest.raises(OSError, match="cannot read price file"):
        load_price_file(tmp_path / "missing.json")
