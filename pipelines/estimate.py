"""The `estimate` pipeline: what a job will cost before it runs, with no model loaded.

It reads rows through the same row front-end as `run` (same files, ids, duplicates, per-row `n`
and `max_tokens` of OpenAI bodies, context pre-check, the `--model`'s tokenizer), so it counts
exactly the rows `run` would run. Exact prompt tokens, predicted cache hits from the same packing
the run uses (for this engine, which resumes at exact branch points, and for the API, which caches
whole prefix units, counted as `run` counts `api_cache_hit_tokens`), output tokens as a
low/expected/high range, the price on the chosen card and the alternatives at peak and off-peak
(each split by token class), the cheapest window to run it, the week calendar of its price by
start hour, the prompt-token histogram (fixed bins, gathered while streaming), and with a
throughput how long it takes and whether it ends inside the window it starts in. `start` prices a
job that starts later.

Owns: the estimate's figures. Does not own: rows (`pipelines.frontend`), planning (`packing`) or
prices (`accounting`). Never imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from batchv4.pipelines.frontend import RowOptions


@dataclass(frozen=True)
class EstimateConfig(RowOptions):
    output_tokens: tuple[int, int, int] | None = None     # low, expected, high per row
    price: str = "deepseek-v4-flash"
    prices_file: str | None = None
    # small batches: the first is built, and the last planned, while the tokenizer waits
    read_batch_rows: int = 1024
    start: datetime | None = None          # when the job starts (default: now)
    throughput: float | None = None        # computed tokens per second, given ...
    throughput_from: str | None = None     # ... or measured by an earlier run's output folder


def estimate(cfg: EstimateConfig, now: datetime | None = None) -> dict:
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.accounting.summary import Totals, cheapest_window, compare_cards, price_totals
    from batchv4.packing import PackConfig, PackInput, PlanStats, plan_counts
    from batchv4.pipelines.frontend import Frontend, options_of
    from batchv4.pipelines.run_state import RunState
    from batchv4.report.figures import TokenHistogram, quote_split, schedule, throughput_from, week_calendar

    now = cfg.start or now or datetime.now(timezone.utc)
    t0 = time.perf_counter()
    private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
    card = get_card(cfg.price, private)
    fe = Frontend(options_of(cfg))
    counts = {"input_rows": 0, "error_rows": 0, "out_of_shard": 0, "planned_rows": 0}
    timings: dict[str, float] = {}

    def on_error(err) -> None:
        counts["error_rows"] += 1

    unit = PackConfig().api_unit
    stats = PlanStats()
    # sums over rows (x n samples): prompt, engine hits, API hits, output tokens low/expected/high
    prompt = engine_hit = api_hit = samples = 0
    out = [0, 0, 0]
    hist = TokenHistogram()
    ranges: dict[int, tuple[int, int, int]] = {}      # per max_tokens: rows share a few
    with RunState() as state:
        keys: dict[tuple[int, int], tuple[int, int]] = {}

        def items():
            for batch in fe.batches(state.seen, on_error, counts, timings, seen_many=state.seen_many):
                for r in batch:
                    key = (r.sampling.n, r.sampling.max_tokens)
                    # one key object per (n, max_tokens), and the rows freed before the next batch
                    # is built: fewer live objects make the cyclic GC's passes fewer and shorter
                    yield PackInput(keys.setdefault(key, key), r.token_ids)
                del batch

        # plan_counts: the run's plan, without the requests the estimate does not need
        for (n, max_tokens), length, resume_pos, api_hit_tokens in plan_counts(items(), stats=stats,
                                                                              spill_dir=state.dir):
            samples += n
            prompt += length * n
            hist.add(length, api_hit_tokens)
            # later samples of a prompt: the engine serves all of it from its cache, an API its whole units
            engine_hit += resume_pos + (n - 1) * length
            api_hit += api_hit_tokens + (n - 1) * (length - length % unit)
            low_exp_high = ranges.get(max_tokens)
            if low_exp_high is None:
                low_exp_high = ranges[max_tokens] = _output_range(cfg.output_tokens, max_tokens)
            out[0] += low_exp_high[0] * n
            out[1] += low_exp_high[1] * n
            out[2] += low_exp_high[2] * n

    def totals(completion: int) -> Totals:
        return Totals(rows=samples, prompt_tokens=prompt, prompt_cache_hit_tokens=api_hit,
                      prompt_cache_miss_tokens=prompt - api_hit, api_cache_hit_tokens=api_hit,
                      completion_tokens=completion)

    api = {name: totals(v) for name, v in zip(("low", "expected", "high"), out)}
    price = {name: price_totals(t, card, now) for name, t in api.items()}
    best = cheapest_window(api["expected"], card, now) if card.has_token_prices else None
    per_row = {name: (v / samples if samples else 0.0) for name, v in zip(("low", "expected", "high"), out)}
    quotes = compare_cards(api["expected"], now, private=private)
    tps, tps_source = cfg.throughput, ("--throughput" if cfg.throughput else None)
    if tps is None and cfg.throughput_from:
        tps, tps_source = throughput_from(cfg.throughput_from)
    calendar = week_calendar(api["expected"], card, now) if card.has_token_prices else None
    return {
        "rows": counts["planned_rows"],
        "error_rows": counts["error_rows"],
        "input_rows": counts["input_rows"],
        "output_rows": samples,
        "out_of_shard_rows": counts["out_of_shard"],
        "tokens": {
            "prompt_tokens": prompt,
            "tree_tokens": stats.tree_tokens,
            "engine_prefill_tokens": prompt - engine_hit,
            "engine_cache_hit_tokens": engine_hit,
            "api_cache_hit_tokens": api_hit,
            "predicted_reuse": stats.reuse_ratio,
            "output_tokens_per_row": per_row,
        },
        "plan": {"groups": stats.groups, "snapshots": stats.snapshots, "max_live_snapshots": stats.max_live_snapshots},
        "card": card.name,
        "cost_usd": price,
        "cheapest_window": None if best is None else {
            "start": best.start.isoformat(), "end": best.end.isoformat(), "cost_usd": best.cost_usd,
            "saving_usd": price["expected"] - best.cost_usd},
        "compare": [{"card": q.card, "label": q.label, "window": q.window, "at": q.at.isoformat(),
                     "cost_usd": q.cost_usd, "approximate": q.approximate,
                     "split": quote_split(api["expected"], get_card(q.card, private), q.at)}
                    for q in quotes],
        "start": now.isoformat(),
        # the card's peak state at the start and when its next off-peak time begins (the remote
        # backend's --when off-peak waits for that instant)
        "off_peak": _off_peak(card, now),
        "calendar": calendar,
        "prompt_tokens_histogram": hist.to_dict(),
        # computed tokens: what the engine prefills (after its cache hits) and generates
        "schedule": schedule(api["expected"], card, now, prompt - engine_hit + out[1], tps, tps_source),
        "billing_calendar": BILLING_NOTE,
        # read_build and tokenize: this thread's seconds in each; tokenize_stage: the tokenizer
        # worker's, which overlap reading and planning (see Frontend.batches)
        "seconds": {"total": time.perf_counter() - t0, "tokenize": timings.get("tokenize", 0.0),
                    "read_build": timings.get("read_build", 0.0), "tokenize_stage": fe.tokenize_busy},
        "notes": f"API hits assume whole cache units of {unit} tokens; other providers' cards are approximate "
                 "(their tokenizers differ from V4's).",
    }


BILLING_NOTE = ("DeepSeek cards: peak hours on working days only; weekends and China's public holidays "
                "(the holidays package's calendar) are off-peak, as DeepSeek's pricing page states "
                "(https://api-docs.deepseek.com/zh-cn/quick_start/pricing). Weekend make-up working days "
                "(调休) are priced as working days, an upper bound: the page does not name them.")


def _output_range(given: tuple[int, int, int] | None, max_tokens: int) -> tuple[int, int, int]:
    """A row's output tokens (low, expected, high): `--output-tokens` capped by the row's own
    max_tokens, else 1, max_tokens / 2, max_tokens."""
    if given is None:
        return 1, max_tokens // 2 or 1, max_tokens
    return tuple(min(v, max_tokens) for v in given)  # type: ignore[return-value]


def _off_peak(card, now) -> dict | None:
    from batchv4.accounting.pricing import is_peak, next_off_peak, time_of_day_windows

    if card.model_ref is None or not time_of_day_windows(card):
        return None
    peak = is_peak(card, now)
    return {"peak_now": peak, "next_off_peak_start": next_off_peak(card, now).isoformat() if peak else now.isoformat()}
