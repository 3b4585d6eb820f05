"""The figures behind the HTML reports, as plain data (no matplotlib, no torch).

Owns: the streaming prompt-token histogram (`TokenHistogram`, fixed power-of-two bins, so a
million-row estimate keeps a few dozen counters, not its rows), the week calendar of a job's price
by start hour (`week_calendar`), the cost of a quote split by token class (`quote_split`), the
schedule of a job with a known throughput (`schedule`), and what a run's output folder says over
time (`throughput_from`, `run_timeline`, `error_reasons`). Does not own: prices and windows
(`batchv4.accounting`), drawing (`charts`) or the page (`page`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from batchv4.errors import UserError

UTC = timezone.utc
BINS = 32  # bin k holds lengths in [2**(k-1), 2**k); bin 0 the empty prompts


@dataclass
class TokenHistogram:
    """Rows, prompt tokens and predicted/measured cache-hit tokens per power-of-two length bin."""

    rows: list[int] = field(default_factory=lambda: [0] * BINS)
    tokens: list[int] = field(default_factory=lambda: [0] * BINS)
    hits: list[int] = field(default_factory=lambda: [0] * BINS)
    max_tokens: int = 0

    def add(self, length: int, hit: int = 0, count: int = 1) -> None:
        k = min(int(length).bit_length(), BINS - 1)
        self.rows[k] += count
        self.tokens[k] += length * count
        self.hits[k] += hit
        if length > self.max_tokens:
            self.max_tokens = length

    def add_many(self, lengths: Iterable[int], hits: Iterable[int]) -> None:
        for n, h in zip(lengths, hits):
            self.add(int(n), int(h or 0))

    def to_dict(self) -> dict[str, Any]:
        used = [k for k in range(BINS) if self.rows[k]]
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        return {"bins": "power of two: bin [lo, hi) of prompt tokens per row",
                "lo": [0 if k == 0 else 2 ** (k - 1) for k in range(lo, hi)],
                "hi": [1 if k == 0 else 2 ** k for k in range(lo, hi)],
                "rows": self.rows[lo:hi], "prompt_tokens": self.tokens[lo:hi],
                "cache_hit_tokens": self.hits[lo:hi], "max_prompt_tokens": self.max_tokens}


def quote_split(totals, card, at: datetime) -> dict[str, float] | None:
    """The totals' price on `card` at `at`, split into cache-miss input, cache-hit input, output
    and anything else (as `price_totals`: rows copies of the mean request)."""
    from batchv4.accounting.pricing import cost_at

    if not card.has_token_prices:
        return None
    k = totals.rows
    if k == 0:
        return {"miss_usd": 0.0, "hit_usd": 0.0, "output_usd": 0.0, "other_usd": 0.0}
    c = cost_at(card, totals.prompt_tokens / k, totals.prompt_cache_hit_tokens / k, totals.completion_tokens / k, at)
    return {"miss_usd": c.miss_usd * k, "hit_usd": c.hit_usd * k, "output_usd": c.output_usd * k,
            "other_usd": c.other_usd * k}


def week_calendar(totals, card, start: datetime, hours: int = 168) -> dict[str, Any]:
    """The job's price if started in each of the `hours` UTC hours from the one holding `start`
    (the first priced at `start` itself), and the cheapest window of that week with its saving
    against starting at `start`."""
    from batchv4.accounting.summary import cheapest_window, price_totals

    start = start.astimezone(UTC)
    first = start.replace(minute=0, second=0, microsecond=0)
    costs = [price_totals(totals, card, max(first + timedelta(hours=h), start)) for h in range(hours)]
    best = cheapest_window(totals, card, start)
    now_cost = price_totals(totals, card, start)
    return {"card": card.name, "label": card.display, "first_hour": first.isoformat(), "cost_usd": costs,
            "cost_now_usd": now_cost,
            "cheapest": {"start": best.start.isoformat(), "end": best.end.isoformat(), "cost_usd": best.cost_usd,
                         "saving_usd": now_cost - best.cost_usd,
                         "saving_share": (now_cost - best.cost_usd) / now_cost if now_cost else 0.0}}


def schedule(totals, card, start: datetime, job_tokens: int, tokens_per_second: float | None,
             source: str | None) -> dict[str, Any]:
    """When a job of `job_tokens` computed tokens started at `start` ends at `tokens_per_second`,
    and whether it ends inside the constant-price window it starts in."""
    from batchv4.accounting.pricing import is_peak, next_off_peak
    from batchv4.accounting.summary import price_windows

    out: dict[str, Any] = {"start": start.isoformat(), "tokens_per_second": tokens_per_second,
                           "throughput_from": source, "job_tokens": job_tokens}
    window = None
    if card.has_token_prices:
        w = price_windows(totals, card, start)[0]
        window = {"start": w.start.isoformat(), "end": w.end.isoformat(), "peak": is_peak(card, start)}
        if window["peak"]:
            window["next_off_peak"] = next_off_peak(card, start).isoformat()
    out["window"] = window
    if not tokens_per_second:
        out.update(duration_seconds=None, ends_at=None, ends_inside_window=None)
        return out
    seconds = job_tokens / tokens_per_second
    ends = start + timedelta(seconds=seconds)
    out.update(duration_seconds=seconds, ends_at=ends.isoformat(),
               ends_inside_window=None if window is None else ends <= datetime.fromisoformat(window["end"]))
    return out


# -- a run's output folder ----------------------------------------------------------------------
def throughput_from(out_url: str) -> tuple[float, str]:
    """Tokens per second measured by an earlier run in `out_url`: summary.json's
    this_run.tokens_per_second, else computed tokens (cache-miss prompt + completion) over the
    span of the rows' `finished_at` (a remote run)."""
    from batchv4.io.urls import get_fs, join
    from batchv4.io.writers import read_manifest

    fs, path = get_fs(out_url)
    name = join(fs, path, "summary.json")
    if fs.exists(name):
        with fs.open(name, "rb") as f:
            try:
                tps = json.loads(f.read()).get("this_run", {}).get("tokens_per_second")
            except ValueError as e:
                raise UserError(f"{out_url}/summary.json is not valid JSON: {e}") from e
        if isinstance(tps, (int, float)) and tps > 0:
            return float(tps), f"{out_url}/summary.json this_run.tokens_per_second"
    if read_manifest(out_url) is None:
        raise UserError(f"--throughput-from {out_url}: no batchv4 run there (no summary.json or manifest.json)")
    tl = run_timeline(out_url, bins=1)
    if tl["span_seconds"] <= 0:
        raise UserError(f"--throughput-from {out_url}: its rows do not span any time; give --throughput")
    return tl["computed_tokens"] / tl["span_seconds"], f"{out_url} rows' finished_at"


def run_timeline(out_url: str, bins: int = 48) -> dict[str, Any]:
    """Computed tokens per second and the cache-hit rate in `bins` equal slices of the run's time
    (from the first to the last `finished_at`), with the prompt-token histogram; the rows are
    streamed twice, one part at a time."""
    from batchv4.io.writers import iter_output_rows

    t_min = t_max = None
    for r in iter_output_rows(out_url, ["finished_at"]):
        at = r["finished_at"]
        t_min = at if t_min is None or at < t_min else t_min
        t_max = at if t_max is None or at > t_max else t_max
    hist = TokenHistogram()
    computed, prompt, hit, rows = [0] * bins, [0] * bins, [0] * bins, [0] * bins
    span = (t_max - t_min).total_seconds() if t_min is not None else 0.0
    cols = ["prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens", "finished_at"]
    for r in iter_output_rows(out_url, cols):
        p, h = r["prompt_tokens"], r["prompt_cache_hit_tokens"]
        hist.add(p, h)
        k = min(int((r["finished_at"] - t_min).total_seconds() / span * bins), bins - 1) if span > 0 else 0
        computed[k] += r["prompt_cache_miss_tokens"] + r["completion_tokens"]
        prompt[k] += p
        hit[k] += h
        rows[k] += 1
    width = span / bins if span > 0 else 0.0
    return {"start": None if t_min is None else t_min.isoformat(), "end": None if t_max is None else t_max.isoformat(),
            "span_seconds": span, "computed_tokens": sum(computed), "rows": rows,
            "slice_start_seconds": [i * width for i in range(bins)],
            "tokens_per_second": [c / width if width else None for c in computed],
            "cache_hit_rate": [h / p if p else None for h, p in zip(hit, prompt)],
            "histogram": hist.to_dict()}


def _reason(text: str | None) -> str:
    text = (text or "unknown").strip().splitlines()[0] if (text or "").strip() else "unknown"
    for sep in (": ", " ("):
        if sep in text[8:]:
            text = text[: 8 + text[8:].index(sep)]
            break
    return text[:80]


def error_reasons(out_url: str, top: int = 12) -> list[dict[str, Any]]:
    """Error rows (input rows that became error rows, and output rows finished with "error") by
    reason (the message's first clause), most frequent first."""
    from batchv4.io.writers import iter_error_rows, iter_output_rows

    counts: Counter[str] = Counter(_reason(r["error"]) for r in iter_error_rows(out_url, ["error"]))
    counts.update(_reason(r["error"]) for r in iter_output_rows(out_url, ["finish_reason", "error"])
                  if r["finish_reason"] == "error")
    items = counts.most_common()
    if len(items) > top:
        items = items[: top - 1] + [("(other reasons)", sum(n for _, n in items[top - 1:]))]
    return [{"reason": r, "rows": n} for r, n in items]


def compare_predicted(estimate: Mapping[str, Any], totals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An estimate's expected figures against a run's measured totals."""
    t = estimate.get("tokens", {})
    per_row = t.get("output_tokens_per_row", {}).get("expected", 0.0)
    pairs = [
        ("prompt tokens", t.get("prompt_tokens"), totals.get("prompt_tokens")),
        ("API cache-hit tokens", t.get("api_cache_hit_tokens"), totals.get("api_cache_hit_tokens")),
        ("completion tokens", per_row * estimate.get("output_rows", 0), totals.get("completion_tokens")),
        ("cost (USD)", estimate.get("cost_usd", {}).get("expected"), totals.get("cost_usd")),
    ]
    return [{"figure": name, "predicted": p, "measured": m,
             "ratio": (m / p) if isinstance(p, (int, float)) and isinstance(m, (int, float)) and p else None}
            for name, p, m in pairs]
