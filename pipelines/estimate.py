"""The `estimate` pipeline: what a job will cost before it runs, with no model loaded.

Exact prompt tokens through the V4 tokenizer and chat encoding, predicted cache hits from the same
packing the run uses (for this engine, which resumes at exact branch points, and for the API, which
caches whole prefix units), output tokens as a low/expected/high range, the price on the chosen
card and the alternatives at peak and off-peak, and the cheapest window to run it.

Owns: the estimate's figures. Does not own: reading rows (`batchv4.io`), planning (`packing`) or
prices (`accounting`). Never imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass
class EstimateConfig:
    input: str
    fmt: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system: str | None = None
    id_column: str | None = None
    thinking: bool = False
    max_tokens: int = 256
    output_tokens: tuple[int, int, int] | None = None     # low, expected, high per row
    n: int = 1
    price: str = "deepseek-v4-flash"
    prices_file: str | None = None
    limit: int | None = None
    shard: tuple[int, int] | None = None
    batch_rows: int = 4096
    storage_options: dict | None = None


def estimate(cfg: EstimateConfig, now: datetime | None = None) -> dict:
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.accounting.summary import Totals, cheapest_window, compare_cards, price_totals
    from batchv4.io.readers import open_input
    from batchv4.io.rows import RowError, RowSpec, build_request, check_columns
    from batchv4.packing import PackInput, PlanStats, plan, shard_of
    from batchv4.pipelines.run import chat_token_ids
    from batchv4.tokenizer import load_tokenizer

    now = now or datetime.now(timezone.utc)
    t0 = time.perf_counter()
    private = load_price_file(cfg.prices_file) if cfg.prices_file else {}
    card = get_card(cfg.price, private)
    src = open_input(cfg.input, cfg.fmt, storage_options=cfg.storage_options)
    spec = RowSpec(cfg.prompt_column, cfg.messages_column, cfg.template, cfg.system, cfg.id_column, (),
                   src.format == "openai")
    spec = check_columns(spec, src.columns(), src.format)
    tok = load_tokenizer()
    counts = {"input_rows": 0, "error_rows": 0, "rows": 0}
    tokenize_s = 0.0

    def items():
        nonlocal tokenize_s
        for batch in src.iter_rows(batch_size=cfg.batch_rows):
            reqs = []
            for raw in batch:
                if cfg.limit is not None and counts["input_rows"] >= cfg.limit:
                    break
                counts["input_rows"] += 1
                r = build_request(raw, spec)
                if isinstance(r, RowError):
                    if not cfg.shard or r.index % cfg.shard[1] == cfg.shard[0]:
                        counts["error_rows"] += 1
                    continue
                reqs.append(r)
            t = time.perf_counter()
            encoded = chat_token_ids(tok, reqs, cfg.thinking) if reqs else []
            tokenize_s += time.perf_counter() - t
            for r, (toks, _, err) in zip(reqs, encoded):
                if err is not None:
                    if not cfg.shard or r.index % cfg.shard[1] == cfg.shard[0]:
                        counts["error_rows"] += 1
                    continue
                if cfg.shard and shard_of(toks, cfg.shard[1]) != cfg.shard[0]:
                    continue
                counts["rows"] += 1
                yield PackInput(r.index, toks)
            if cfg.limit is not None and counts["input_rows"] >= cfg.limit:
                return

    stats = PlanStats()
    for _ in plan(items(), stats=stats):
        pass
    rows = counts["rows"] * cfg.n
    low, exp, high = cfg.output_tokens or (1, cfg.max_tokens // 2 or 1, cfg.max_tokens)
    # n samples share a prompt: the API sees n requests, all but the first hit the whole prompt
    extra_prompt = stats.prompt_tokens * (cfg.n - 1)

    def totals(out_per_row: int, hits: int) -> Totals:
        prompt = stats.prompt_tokens * cfg.n
        hit = hits + extra_prompt
        return Totals(rows=rows, prompt_tokens=prompt, prompt_cache_hit_tokens=hit,
                      prompt_cache_miss_tokens=prompt - hit, completion_tokens=out_per_row * rows)

    api = {name: totals(v, stats.api_hit_tokens) for name, v in (("low", low), ("expected", exp), ("high", high))}
    price = {name: price_totals(t, card, now) for name, t in api.items()}
    best = cheapest_window(api["expected"], card, now) if card.has_token_prices else None
    return {
        "input": counts,
        "tokens": {
            "prompt_tokens": stats.prompt_tokens * cfg.n,
            "tree_tokens": stats.tree_tokens,
            "engine_prefill_tokens": stats.planned_prefill_tokens,
            "engine_hit_tokens": stats.engine_hit_tokens + extra_prompt,
            "api_hit_tokens": stats.api_hit_tokens + extra_prompt,
            "predicted_reuse": stats.reuse_ratio,
            "output_tokens_per_row": {"low": low, "expected": exp, "high": high},
        },
        "plan": {"groups": stats.groups, "snapshots": stats.snapshots, "max_live_snapshots": stats.max_live_snapshots},
        "card": card.name,
        "cost_usd": price,
        "cheapest_window": None if best is None else {"start": best.start.isoformat(), "end": best.end.isoformat(),
                                                      "cost_usd": best.cost_usd},
        "compare": [{"card": q.card, "label": q.label, "window": q.window, "at": q.at.isoformat(),
                     "cost_usd": q.cost_usd, "approximate": q.approximate}
                    for q in compare_cards(api["expected"], now, private=private)],
        "seconds": {"total": time.perf_counter() - t0, "tokenize": tokenize_s},
        "notes": "API hits assume whole cache units of 64 tokens; other providers' cards are approximate "
                 "(their tokenizers differ from V4's).",
    }
