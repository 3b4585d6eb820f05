"""Per-row prices: usage in DeepSeek's names, priced at the row's own finish time.

Owns: `RowUsage` (with the rule prompt = cache hit + cache miss, and reasoning counted inside
completion, never charged twice), pricing under a card (genai-prices `calc_price` for public
models, plain arithmetic for private cards), the one correction of genai-prices' DeepSeek table
(`billing_instant`: weekends and China's public holidays), and self-hosted cost. Does not own:
card names and files (`cards`), amortization (`amortize`), totals and comparisons (`summary`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from numbers import Integral
from typing import Any

from batchv4.accounting.cards import DeepSeekPeakRule, PriceCard
from batchv4.errors import UserError

UTC = timezone.utc
BEIJING = timezone(timedelta(hours=8))  # DeepSeek defines its peak hours and weekends in Beijing time
_USAGE_KEYS = ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens", "reasoning_tokens")


@dataclass(frozen=True)
class RowUsage:
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    completion_tokens: int  # includes reasoning_tokens
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for key in _USAGE_KEYS:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 0:
                raise UserError(f"{key} must be a non-negative integer, got {v!r}")
        if self.reasoning_tokens > self.completion_tokens:
            raise UserError(
                f"reasoning_tokens ({self.reasoning_tokens}) exceed completion_tokens ({self.completion_tokens}); "
                "reasoning is part of completion"
            )

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_cache_hit_tokens + self.prompt_cache_miss_tokens

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> RowUsage:
        """From a row dict; a `prompt_tokens` given must equal hit + miss (ValueError otherwise)."""
        missing = [k for k in _USAGE_KEYS[:3] if m.get(k) is None]
        if missing:
            raise UserError(f"usage is missing {missing[0]}")
        u = cls(*(m[k] for k in _USAGE_KEYS[:3]), reasoning_tokens=m.get("reasoning_tokens") or 0)
        prompt = m.get("prompt_tokens")
        if prompt is not None and prompt != u.prompt_tokens:
            raise UserError(
                f"prompt_tokens ({prompt}) != prompt_cache_hit_tokens ({u.prompt_cache_hit_tokens}) "
                f"+ prompt_cache_miss_tokens ({u.prompt_cache_miss_tokens})"
            )
        return u


def as_usage(usage: RowUsage | Mapping[str, Any]) -> RowUsage:
    return usage if isinstance(usage, RowUsage) else RowUsage.from_mapping(usage)


@dataclass(frozen=True)
class RowCost:
    """USD, split by token class (needed to amortize shared prefixes)."""

    miss_usd: float
    hit_usd: float
    output_usd: float
    other_usd: float = 0.0  # anything else the table prices (normally 0)

    @property
    def input_usd(self) -> float:
        return self.miss_usd + self.hit_usd

    @property
    def total_usd(self) -> float:
        return self.miss_usd + self.hit_usd + self.output_usd + self.other_usd


def check_aware(when: datetime, what: str = "finished_at") -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise UserError(f"{what} must be a timezone-aware datetime, got {when!r}")
    return when


# -- genai-prices access ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _model(model_ref: str, provider_id: str | None):
    from genai_prices import data_snapshot

    try:
        return data_snapshot.get_snapshot().find_provider_model(model_ref, None, provider_id, None)[1]
    except LookupError as e:
        raise UserError(f"genai-prices has no model {model_ref!r} for provider {provider_id!r}") from e


@functools.lru_cache(maxsize=None)
def time_of_day_windows(card: PriceCard) -> tuple[Any, ...]:
    """The card's genai-prices time-of-day price windows (`TimeOfDateConstraint`s), if any."""
    from genai_prices.types import TimeOfDateConstraint

    if card.model_ref is None:
        return ()
    model = _model(card.model_ref, card.provider_id)
    constraints = [c.constraint for c in model.prices] if isinstance(model.prices, list) else []
    constraints += [v.constraint for v in model.price_variants or ()]
    return tuple(c for c in constraints if isinstance(c, TimeOfDateConstraint))


def _off_peak_same_day(when: datetime, windows: tuple[Any, ...]) -> datetime:
    day = when.astimezone(UTC).date()
    candidates = sorted({w.end_time for w in windows} | {w.start_time for w in windows} | {time(0)}, key=_utc_seconds)
    for t in candidates:
        instant = datetime.combine(day, t.replace(tzinfo=None), tzinfo=t.tzinfo or UTC).astimezone(UTC)
        if instant.date() == day and not any(w.active(instant) for w in windows):
            return instant
    raise UserError(f"no off-peak time on {day} in the price windows")


def _utc_seconds(t: time) -> float:
    offset = t.utcoffset() or timedelta(0)
    return (t.hour * 3600 + t.minute * 60 + t.second - offset.total_seconds()) % 86400


# DeepSeek's pricing page, https://api-docs.deepseek.com/zh-cn/quick_start/pricing (note 2, as
# stored in October 2026): "北京时间周一至周五（不含中国法定节假日）9:00 - 12:00、14:00 - 18:00 为高峰
# 时段；其余时段，包括周末及中国法定节假日全天均为空闲时段。" Peak hours are Monday to Friday, Beijing
# time, except China's public holidays; weekends and public holidays are off-peak all day. The
# page says nothing of make-up working days (调休, a Saturday or Sunday worked in exchange for a
# holiday): `DeepSeekPeakRule.makeup_days_peak` bills them as working days, the upper bound.
HOLIDAY_SOURCE = "https://api-docs.deepseek.com/zh-cn/quick_start/pricing"


@functools.lru_cache(maxsize=None)
def _china_year(year: int) -> tuple[frozenset[date], frozenset[date]]:
    """China's holidays and weekend make-up working days of `year`, from the `holidays` package.

    Where the installed calendar has no State Council schedule for the year (it then only knows
    the statutory dates and guesses their "observed" days), the guessed days are left out: they
    stay working days, the upper bound."""
    import holidays
    from holidays.countries.china import ChinaStaticHolidays

    cal = holidays.China(years=year, language="en_US")
    published = year in getattr(ChinaStaticHolidays, "special_public_holidays", {})
    days = frozenset(d for d, name in cal.items() if published or "observed" not in name.lower())
    makeup = frozenset(d for d in getattr(cal, "weekend_workdays", ()) if d.year == year)
    return days, makeup


def beijing_day_kind(rule: DeepSeekPeakRule, day: date) -> str:
    """How DeepSeek bills the Beijing date `day`: "holiday" or "weekend" (off-peak all day),
    "makeup" (a weekend make-up working day, billed as a working day when
    `rule.makeup_days_peak`), or "working" (peak hours at peak price)."""
    holidays_, makeup = _china_year(day.year)
    if day in holidays_ and day >= rule.holiday_off_peak_since:
        return "holiday"
    if day.weekday() >= 5 and day >= rule.weekend_off_peak_since:
        return "makeup" if day in makeup and rule.makeup_days_peak else "weekend"
    return "working"


def billing_instant(card: PriceCard, when: datetime) -> datetime:
    """The instant at which to ask genai-prices for what the provider bills at `when`.

    The one place that corrects the table: genai-prices prices DeepSeek's peak windows every day
    and on every date, but DeepSeek bills Saturdays, Sundays and China's public holidays (Beijing
    time) off-peak (see `HOLIDAY_SOURCE`), and V4 had no peak price before peak billing began.
    For such a peak-window instant this returns an off-peak instant of the same UTC date, so the
    same dated price period (the table's `StartDateConstraint`s are UTC dates) applies at its
    off-peak rate. Otherwise `when` itself: genai-prices' own answer, unchanged.
    """
    check_aware(when, "time")
    rule = card.deepseek_rule
    if rule is None or card.model_ref is None:
        return when
    windows = time_of_day_windows(card)
    if not any(w.active(when) for w in windows):
        return when
    off_day = beijing_day_kind(rule, when.astimezone(BEIJING).date()) in ("holiday", "weekend")
    before_peak_billing = when.astimezone(UTC).date() < rule.peak_since
    if not (off_day or before_peak_billing):
        return when
    return _off_peak_same_day(when, windows)


def is_peak(card: PriceCard, when: datetime) -> bool:
    """Whether the provider bills `when` at a peak rate (one of the card's time-of-day windows is
    active at its billing instant). Cards without time-of-day prices are never peak."""
    windows = time_of_day_windows(card)
    return bool(windows) and any(w.active(billing_instant(card, when)) for w in windows)


def next_off_peak(card: PriceCard, when: datetime, days: int = 8) -> datetime:
    """`when` itself if it is off-peak, else the start of the next off-peak time (the first window
    boundary, or Beijing midnight for DeepSeek's weekends, after which `is_peak` is false)."""
    check_aware(when, "time")
    if not is_peak(card, when):
        return when
    windows = time_of_day_windows(card)
    day = when.astimezone(UTC).date() - timedelta(days=1)
    points = set()
    for _ in range(days + 2):
        for w in windows:
            for t in (w.start_time, w.end_time):
                points.add(datetime.combine(day, t.replace(tzinfo=None), tzinfo=t.tzinfo or UTC).astimezone(UTC))
        points.add(datetime.combine(day, time(0), tzinfo=BEIJING).astimezone(UTC))
        day += timedelta(days=1)
    for p in sorted(x for x in points if x > when):
        if not is_peak(card, p):
            return p
    raise UserError(f"{card.name}: no off-peak time in the {days} days after {when.isoformat()}")


# -- pricing ------------------------------------------------------------------------------------
def _genai_cost(card: PriceCard, prompt: float, hit: float, completion: float, instant: datetime) -> RowCost:
    from genai_prices import Usage, calc_price
    from genai_prices.types import calc_unit_price
    from genai_prices.units import _get_registry

    try:
        calc = calc_price(
            Usage(input_tokens=prompt, cache_read_tokens=hit, output_tokens=completion),
            card.model_ref,
            provider_id=card.provider_id,
            genai_request_timestamp=instant,
            price_context=dict(card.price_context) or None,
        )
    except LookupError as e:
        raise UserError(f"price card {card.name!r}: genai-prices has no model {card.model_ref!r} ({e})") from e
    mp = calc.model_price
    registry = _get_registry()

    def part(key: str, price: Any, count: float) -> Decimal:
        # the tier is chosen by the request's whole prompt, as in calc_price itself
        return calc_unit_price(price, count, prompt, registry.unit_for_price_key(key).per)

    hit_price = mp.cache_read_mtok if mp.cache_read_mtok is not None else mp.input_mtok
    miss_usd = part("input_mtok", mp.input_mtok, prompt - hit)
    hit_usd = part("cache_read_mtok", hit_price, hit)
    output_usd = part("output_mtok", mp.output_mtok, completion)
    other = calc.total_price - miss_usd - hit_usd - output_usd
    return RowCost(float(miss_usd), float(hit_usd), float(output_usd), float(other))


def _private_cost(card: PriceCard, prompt: float, hit: float, completion: float) -> RowCost:
    cin = card.input_per_mtok or 0.0
    cached = card.cached_input_per_mtok if card.cached_input_per_mtok is not None else cin
    return RowCost((prompt - hit) * cin / 1e6, hit * cached / 1e6, completion * (card.output_per_mtok or 0.0) / 1e6)


def cost_at(card: PriceCard, prompt: float, hit: float, completion: float, when: datetime) -> RowCost | None:
    """The cost of one request's token counts (floats allowed: a mean row) at `when`; None when
    the card has no token prices."""
    if not card.has_token_prices:
        return None
    if card.model_ref is None:
        return _private_cost(card, prompt, hit, completion)
    return _genai_cost(card, prompt, hit, completion, billing_instant(card, when))


def price_row_detail(usage: RowUsage | Mapping[str, Any], card: PriceCard, finished_at: datetime) -> RowCost | None:
    u = as_usage(usage)
    check_aware(finished_at)
    # reasoning_tokens are inside completion_tokens: they are not passed on separately.
    return cost_at(card, u.prompt_tokens, u.prompt_cache_hit_tokens, u.completion_tokens, finished_at)


def price_row(usage: RowUsage | Mapping[str, Any], card: PriceCard, finished_at: datetime) -> float | None:
    """API-equivalent USD of one row under `card`, priced at its own finish time; None when the
    card has only a GPU-hour price."""
    cost = price_row_detail(usage, card, finished_at)
    return None if cost is None else cost.total_usd


def self_hosted_cost(engine_seconds: float, card: PriceCard) -> float | None:
    """Engine seconds attributed to a row x the card's GPU-hour price; None without one."""
    ok = isinstance(engine_seconds, (int, float)) and not isinstance(engine_seconds, bool)
    if not ok or not math.isfinite(engine_seconds) or engine_seconds < 0:
        raise UserError(f"engine_seconds must be a non-negative number, got {engine_seconds!r}")
    if card.gpu_hour_usd is None:
        return None
    return engine_seconds * card.gpu_hour_usd / 3600.0
