"""DeepSeek's billing calendar: peak hours on working days only, weekends and China's public
holidays off-peak (DeepSeek's pricing page), make-up working days billed as working days (the
upper bound), and genai-prices' own answer wherever it is already right."""

from datetime import datetime, timedelta, timezone

import holidays
import pytest
from genai_prices import Usage, calc_price

from batchv4.accounting.cards import DeepSeekPeakRule, get_card
from batchv4.accounting.pricing import BEIJING, beijing_day_kind, billing_instant, cost_at, is_peak, next_off_peak

UTC = timezone.utc
FLASH = get_card("deepseek-v4-flash")
PEAK_HOURS = {9, 10, 11, 14, 15, 16, 17}  # Beijing


def beijing(y, m, d, h):
    return datetime(y, m, d, h, tzinfo=BEIJING)


def genai_usd(when):
    usage = Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=100)
    return float(calc_price(usage, FLASH.model_ref, provider_id=FLASH.provider_id,
                            genai_request_timestamp=when).total_price)


def ours(when):
    return cost_at(FLASH, 1000, 200, 100, when).total_usd


@pytest.mark.parametrize("when,peak", [
    (beijing(2026, 12, 2, 10), True),     # Wednesday, peak hour
    (beijing(2026, 12, 2, 13), False),    # Wednesday lunch
    (beijing(2026, 12, 5, 10), False),    # Saturday
    (beijing(2026, 12, 6, 15), False),    # Sunday
    (beijing(2026, 9, 25, 10), False),    # Friday, Mid-Autumn Festival
    (beijing(2026, 10, 1, 15), False),    # Thursday, National Day
    (beijing(2026, 10, 6, 10), False),    # Tuesday, a day off of the National Day break
    (beijing(2026, 10, 8, 10), True),     # Thursday after the break
    (beijing(2026, 9, 20, 10), True),     # Sunday, a make-up working day: priced as working (upper bound)
    (beijing(2026, 10, 10, 16), True),    # Saturday, a make-up working day
])
def test_billing_instants_2026(when, peak):
    assert is_peak(FLASH, when) is peak
    if peak or not any(w.active(when) for w in _windows()):
        # genai-prices' own result, unchanged
        assert billing_instant(FLASH, when) == when
        assert ours(when) == genai_usd(when)
    else:
        instant = billing_instant(FLASH, when)
        assert instant != when and instant.astimezone(UTC).date() == when.astimezone(UTC).date()
        assert ours(when) == pytest.approx(genai_usd(when) / 2, rel=1e-12)


def _windows():
    from batchv4.accounting.pricing import time_of_day_windows

    return time_of_day_windows(FLASH)


def test_every_hour_of_the_national_day_fortnight_matches_the_calendar():
    cn = holidays.China(years=2026)
    start = beijing(2026, 9, 19, 0)
    for h in range(24 * 24):
        when = start + timedelta(hours=h)
        day = when.date()
        working = (day.weekday() < 5 or day in cn.weekend_workdays) and day not in cn
        assert is_peak(FLASH, when) is (working and when.hour in PEAK_HOURS), when


def test_make_up_days_as_weekends_when_the_rule_says_so():
    from dataclasses import replace

    card = replace(FLASH, deepseek_rule=DeepSeekPeakRule(makeup_days_peak=False))
    assert not is_peak(card, beijing(2026, 9, 20, 10))
    assert beijing_day_kind(card.deepseek_rule, beijing(2026, 9, 20, 10).date()) == "weekend"
    assert beijing_day_kind(FLASH.deepseek_rule, beijing(2026, 9, 20, 10).date()) == "makeup"


def test_next_off_peak_skips_into_a_holiday():
    # Wednesday 2026-09-30 10:00 Beijing is peak; 12:00 the same day ends the window
    assert next_off_peak(FLASH, beijing(2026, 9, 30, 10)) == beijing(2026, 9, 30, 12)
    # Thursday 2026-10-01 is a holiday: already off-peak
    assert next_off_peak(FLASH, beijing(2026, 10, 1, 10)) == beijing(2026, 10, 1, 10)


def test_2027_where_the_installed_calendar_has_it():
    from holidays.countries.china import ChinaStaticHolidays

    cn = holidays.China(years=2027, language="en_US")
    if not cn:
        pytest.skip("the installed holidays package has no 2027 calendar for China")
    assert not is_peak(FLASH, beijing(2027, 10, 1, 10))       # National Day (a Friday)
    assert not is_peak(FLASH, beijing(2027, 2, 8, 10))        # Spring Festival (a Monday)
    assert is_peak(FLASH, beijing(2027, 3, 3, 10))            # an ordinary Wednesday
    published = 2027 in getattr(ChinaStaticHolidays, "special_public_holidays", {})
    guessed = [d for d, name in cn.items() if "observed" in name.lower() and d.weekday() < 5]
    for d in guessed:
        # without a published schedule a guessed "observed" day stays a working day (upper bound)
        assert is_peak(FLASH, beijing(d.year, d.month, d.day, 10)) is (not published), d


def test_other_cards_unchanged():
    gpt = get_card("gpt-5.4")
    when = beijing(2026, 10, 1, 10)
    assert billing_instant(gpt, when) == when
