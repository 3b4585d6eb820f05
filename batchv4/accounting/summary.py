"""Run totals, the same tokens priced on other cards, and the cheapest time to run.

Owns: `summarize` (token and cost totals over output rows), `price_totals` (a total priced as its
mean request, so per-request long-context tiers still apply per request), `compare_cards` (peak
and off-peak for time-of-day cards), `price_windows` and `cheapest_window`. Does not own: pricing
rules (`pricing`) or presentation (the CLI renders these objects). Prices of other providers are
approximate: their tokenizers differ from V4's, so the same text has other token counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta
from typing import Any

from batchv4.accounting.cards import PriceCard, get_card
from batchv4.accounting.pricing import BEIJING, UTC, RowUsage, check_aware, cost_at, time_of_day_windows

COMPARE_CARDS = (
    "deepseek-v4-flash",
    "deepseek-v4-pro",
    "gpt-5.4",
    "gpt-5.4-batch",
    "gemini-3.1-pro",
    "gemini-3.1-pro-batch",
    "claude-sonnet-4.6",
    "claude-sonnet-5.5",
    "claude-sonnet-5.5-batch",
)


@dataclass(frozen=True)
class Totals:
    rows: int = 0
    prompt_tokens: int = 0
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    # what an API would bill as cache hits (rows without the column count their engine hits)
    api_cache_hit_tokens: int = 0
    cost_usd: float | None = None
    cost_usd_self_hosted: float | None = None
    engine_seconds: float | None = None

    @property
    def cache_hit_rate(self) -> float:
        return self.prompt_cache_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cache_hit_rate": self.cache_hit_rate}


def _sum_optional(total: float | None, value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return total
    return (total or 0.0) + float(value)


def summarize(rows: Iterable[Mapping[str, Any]]) -> Totals:
    """Totals over output rows (dicts with the output schema's usage and cost columns).
    Raises ValueError when a row's prompt_tokens != hit + miss."""
    n = prompt = hit = miss = completion = reasoning = api_hit = 0
    cost = hosted = seconds = None
    for i, r in enumerate(rows):
        try:
            u = RowUsage.from_mapping(r)
        except ValueError as e:
            raise ValueError(f"row {i} (id {r.get('id')!r}): {e}") from e
        n += 1
        prompt += u.prompt_tokens
        hit += u.prompt_cache_hit_tokens
        miss += u.prompt_cache_miss_tokens
        completion += u.completion_tokens
        reasoning += u.reasoning_tokens
        a = r.get("api_cache_hit_tokens")
        api_hit += u.prompt_cache_hit_tokens if a is None else int(a)
        cost = _sum_optional(cost, r.get("cost_usd"))
        hosted = _sum_optional(hosted, r.get("cost_usd_self_hosted"))
        seconds = _sum_optional(seconds, r.get("engine_seconds"))
    return Totals(n, prompt, hit, miss, completion, reasoning, api_hit, cost, hosted, seconds)


def price_totals(totals: Totals, card: PriceCard, when: datetime) -> float | None:
    """The totals' API price under `card` at `when`, priced as `rows` copies of the mean request."""
    check_aware(when, "when")
    if not card.has_token_prices:
        return None
    if totals.rows == 0:
        return 0.0
    k = totals.rows
    mean = cost_at(card, totals.prompt_tokens / k, totals.prompt_cache_hit_tokens / k, totals.completion_tokens / k, when)
    return mean.total_usd * k


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    cost_usd: float


@dataclass(frozen=True)
class Quote:
    card: str
    label: str
    window: str | None  # "peak" / "off-peak" for time-of-day cards, else None
    at: datetime
    cost_usd: float | None
    approximate: bool


def _boundaries(card: PriceCard, start: datetime, end: datetime) -> list[datetime]:
    points = {start, end}
    windows = time_of_day_windows(card)
    day = start.astimezone(UTC).date() - timedelta(days=1)
    while day <= end.astimezone(UTC).date():
        points.add(datetime.combine(day, time(0), tzinfo=UTC))  # dated prices change at UTC midnight
        for w in windows:
            for t in (w.start_time, w.end_time):
                points.add(datetime.combine(day, t.replace(tzinfo=None), tzinfo=t.tzinfo or UTC).astimezone(UTC))
        if card.deepseek_rule is not None:  # weekends begin and end at Beijing midnight
            points.add(datetime.combine(day, time(0), tzinfo=BEIJING).astimezone(UTC))
        day += timedelta(days=1)
    return sorted(p for p in points if start <= p <= end)


def price_windows(totals: Totals, card: PriceCard, start: datetime, days: int = 7) -> list[Window]:
    """Constant-price windows covering [start, start + days), each with the totals' price."""
    check_aware(start, "start")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if not card.has_token_prices:
        raise ValueError(f"price card {card.name!r} has no token prices")
    start = start.astimezone(UTC)
    points = _boundaries(card, start, start + timedelta(days=days))
    out: list[Window] = []
    for a, b in zip(points, points[1:]):
        cost = price_totals(totals, card, a)
        if out and math.isclose(out[-1].cost_usd, cost, rel_tol=1e-12, abs_tol=1e-15):
            out[-1] = Window(out[-1].start, b, out[-1].cost_usd)
        else:
            out.append(Window(a, b, cost))
    return out


def cheapest_window(totals: Totals, card: PriceCard, start: datetime, days: int = 7) -> Window:
    """The earliest cheapest window in the next `days` days (for DeepSeek: the next off-peak
    window, or the current one when `start` is already off-peak)."""
    windows = price_windows(totals, card, start, days)
    best = min(w.cost_usd for w in windows)
    return next(w for w in windows if math.isclose(w.cost_usd, best, rel_tol=1e-12, abs_tol=1e-15))


def compare_cards(
    totals: Totals,
    when: datetime,
    cards: Sequence[str] = COMPARE_CARDS,
    private: Mapping[str, PriceCard] | None = None,
) -> list[Quote]:
    """The same token totals priced on each card at `when`; cards with time-of-day prices get a
    peak and an off-peak quote (the dearest and cheapest windows of the following 7 days)."""
    check_aware(when, "when")
    quotes = []
    for name in cards:
        card = get_card(name, private)
        if not card.has_token_prices:
            continue
        if time_of_day_windows(card):
            windows = price_windows(totals, card, when)
            peak = max(windows, key=lambda w: w.cost_usd)
            off = min(windows, key=lambda w: w.cost_usd)
            if not math.isclose(peak.cost_usd, off.cost_usd, rel_tol=1e-12, abs_tol=1e-15):
                quotes.append(Quote(name, card.display, "peak", peak.start, peak.cost_usd, card.approximate))
                quotes.append(Quote(name, card.display, "off-peak", off.start, off.cost_usd, card.approximate))
                continue
        quotes.append(Quote(name, card.display, None, when, price_totals(totals, card, when), card.approximate))
    return quotes
