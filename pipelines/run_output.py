"""What a `run` writes per finished request and at its end: output rows with usage and cost, the
amortized cost of shared prefixes, and `summary.json`.

Owns: turning one engine `RequestOutput` into output rows (one per sample) by the accounting rules
(hit + miss = prompt; reasoning inside completion; each row priced at its own finish time), the
per-part amortization, and the summary's layout. Does not own: prices (`batchv4.accounting`), the
job's flow and resume (`pipelines.run`), or file layouts (`batchv4.io`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

NO_STATS = {"forward_seconds": 0.0, "prefill_tokens": 0, "decode_tokens": 0, "cached_prompt_tokens": 0,
            "preemptions": 0, "snapshot_evictions": 0, "peak_snapshots": 0}


def api_hits(plan_hit: int, n_prompt: int, sample_index: int, api_unit: int) -> int:
    """Prompt tokens an API would bill as cache hits for one sample: the plan's prediction for the
    first (whole cache units shared with earlier requests), and for later samples of the same
    prompt (n > 1 means n requests to an API) every whole unit of the prompt, which the first
    request put in the cache. `estimate` counts the same way."""
    return plan_hit if sample_index == 0 else n_prompt - n_prompt % api_unit


def output_rows(req, group: int | None, out, card, llm, now: datetime, progress: dict[str, int],
                plan_api_hit: int = 0, api_unit: int = 64, private=None) -> list[dict]:
    """The output rows of one finished request (`req` is its `RowRequest`), finished at `now`.
    `prompt_cache_hit_tokens` are the engine's own hits; `api_cache_hit_tokens` what an API
    would bill as hits (`api_hits`), which `cost_usd` is priced with, exactly as `estimate`
    prices the job. Rows carry `_cost` and `_group` for `amortize`, which removes them. A sample
    with its own `usage` (a remote API) is billed as the provider counted it (`_remote_row`)."""
    from batchv4.accounting.pricing import price_row_detail, self_hosted_cost

    recs = []
    n_prompt = len(out.prompt_token_ids)
    stats = None
    for c in out.outputs:
        if c.usage is not None:
            recs.append(_remote_row(req, group, c, card, private, progress))
            continue
        # the n samples share one prompt: its hits are counted on sample 0 only; later samples
        # read the whole prompt from the cache
        hit = out.num_cached_tokens if c.index == 0 else n_prompt
        usage = {"prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": n_prompt - hit,
                 "completion_tokens": len(c.token_ids), "reasoning_tokens": c.num_reasoning_tokens}
        api_hit = api_hits(plan_api_hit, n_prompt, c.index, api_unit)
        api_usage = {**usage, "prompt_cache_hit_tokens": api_hit, "prompt_cache_miss_tokens": n_prompt - api_hit}
        detail = price_row_detail(api_usage, card, now)
        by_sample = out.metrics.get("engine_seconds_by_sample")
        if by_sample is not None and c.index < len(by_sample):
            secs = by_sample[c.index]       # the steps this sample took part in
        else:                               # a backend without per-request times: a share of the total
            stats = stats or {**NO_STATS, **llm.stats()}
            secs = _engine_seconds(stats, n_prompt - hit + len(c.token_ids))
        recs.append({"id": req.id, "sample_index": c.index, "output": c.text, "reasoning": c.reasoning_text,
                     "finish_reason": c.finish_reason, "prompt_tokens": n_prompt, **usage,
                     "api_cache_hit_tokens": api_hit,
                     "cost_usd": None if detail is None else detail.total_usd,
                     "cost_usd_self_hosted": self_hosted_cost(secs, card), "engine_seconds": secs,
                     "_cost": detail, "_group": group,
                     "finished_at": now, "content_hash": req.content_hash, **req.keep})
        progress["rows"] += 1
        progress["prompt_tokens"] += n_prompt
        progress["prompt_cache_hit_tokens"] += hit
        progress["completion_tokens"] += len(c.token_ids)
    return recs


def card_for(model: str | None, default, private=None):
    """The price card of the model that answered when batchv4 has one by that name, else `default`."""
    from batchv4.accounting.cards import get_card
    from batchv4.errors import UserError

    if model and model != default.name:
        try:
            return get_card(model, private)
        except UserError:
            pass
    return default


def _remote_row(req, group, c, card, private, progress: dict[str, int]) -> dict:
    """An output row from a provider's usage: its prompt, hit, completion and reasoning counts are
    the bill (so `prompt_cache_hit_tokens` and `api_cache_hit_tokens` are both the provider's hits),
    priced at the response's time on the card of the model that answered."""
    from batchv4.accounting.pricing import price_row_detail

    u = c.usage
    n_prompt, hit = u["prompt_tokens"], u["prompt_cache_hit_tokens"]
    usage = {"prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": n_prompt - hit,
             "completion_tokens": u["completion_tokens"], "reasoning_tokens": u["reasoning_tokens"]}
    when = u["finished_at"]
    detail = price_row_detail(usage, card_for(u.get("model"), card, private), when)
    progress["rows"] += 1
    progress["prompt_tokens"] += n_prompt
    progress["prompt_cache_hit_tokens"] += hit
    progress["completion_tokens"] += u["completion_tokens"]
    return {"id": req.id, "sample_index": c.index, "output": c.text, "reasoning": c.reasoning_text,
            "finish_reason": c.finish_reason, "prompt_tokens": n_prompt, **usage, "api_cache_hit_tokens": hit,
            "cost_usd": None if detail is None else detail.total_usd, "cost_usd_self_hosted": None,
            "engine_seconds": u.get("seconds"), "provider_request_id": u.get("provider_request_id"),
            "usage_counted_locally": bool(u.get("counted_locally")),
            "_cost": detail, "_group": group, "finished_at": when, "content_hash": req.content_hash, **req.keep}


def _engine_seconds(st: dict, tokens: int) -> float:
    """Engine forward time attributed to a row (from the engine's stats): its computed tokens'
    share of all computed so far."""
    computed = st["prefill_tokens"] + st["decode_tokens"]
    return st["forward_seconds"] * tokens / computed if computed else 0.0


def amortize(buf: list[dict]) -> list[dict]:
    """cost_usd_amortized: the shared prefix's input cost spread evenly over the rows of the same
    plan group within this part (the sum over the group's rows is unchanged)."""
    from batchv4.accounting.amortize import PricedRow, amortized_costs
    from batchv4.accounting.pricing import RowUsage

    priced = []
    for r in buf:
        # priced as cost_usd is: with the API's hits
        hit = r["api_cache_hit_tokens"]
        u = RowUsage(hit, r["prompt_tokens"] - hit, r["completion_tokens"], r["reasoning_tokens"])
        priced.append(PricedRow(u, r.pop("_cost")))
    for r, a in zip(buf, amortized_costs(priced, [r.pop("_group") for r in buf])):
        r["cost_usd_amortized"] = a
    return buf


def summary(cfg, fp: str, writer, counts: dict, timings: dict, wall: float, llm, card, private,
            now: datetime) -> dict[str, Any]:
    """Figures from the rows actually in the output (so a resumed run reports the whole job), plus
    what this invocation did (`this_run`)."""
    from batchv4.accounting.summary import compare_cards, summarize
    from batchv4.io.writers import iter_output_rows

    cols = ["prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "api_cache_hit_tokens",
            "completion_tokens", "reasoning_tokens", "cost_usd", "cost_usd_self_hosted", "engine_seconds"]
    totals = summarize(iter_output_rows(cfg.output, cols, cfg.storage_options or None))
    from dataclasses import replace

    # other cards are API prices: the same tokens with the API's cache semantics
    api_totals = replace(totals, prompt_cache_hit_tokens=totals.api_cache_hit_tokens,
                         prompt_cache_miss_tokens=totals.prompt_tokens - totals.api_cache_hit_tokens)
    st = {**NO_STATS, **llm.stats()} if llm is not None else NO_STATS
    computed = st["prefill_tokens"] + st["decode_tokens"]
    return {
        "fingerprint": fp,
        "config": cfg.public(),
        "price_card": card.name,
        "counts": {**counts, "output_rows": writer.rows_written, "error_rows": writer.error_rows_written},
        "cache": {"prompt_cache_hit_tokens": "served from batchv4's own prefix cache in this run",
                  "api_cache_hit_tokens": "what an API with DeepSeek's cache semantics (whole 64-token units of "
                                          "prefixes sent before) would bill as hits; cost_usd is priced with these, "
                                          "as estimate is"},
        "totals": totals.to_dict(),
        "this_run": {
            "wall_seconds": wall,
            "engine_forward_seconds": st["forward_seconds"],
            "prefill_tokens_computed": st["prefill_tokens"],
            "decode_tokens": st["decode_tokens"],
            "cached_prompt_tokens": st["cached_prompt_tokens"],
            # tokens the engine computed (prefill + decode) per second; cached prompt tokens apart
            "tokens_per_second": computed / wall if wall > 0 else 0.0,
            "cached_prompt_tokens_per_second": st["cached_prompt_tokens"] / wall if wall > 0 else 0.0,
            "generated_tokens_per_second": st["decode_tokens"] / wall if wall > 0 else 0.0,
            "preemptions": st["preemptions"],
            "snapshot_evictions": st["snapshot_evictions"],
            "peak_snapshots": st["peak_snapshots"],
            "seconds_by_stage": timings,
            **_backend_figures(cfg, llm),
        },
        "compare": [
            {"card": q.card, "label": q.label, "window": q.window, "at": q.at.isoformat(),
             "cost_usd": q.cost_usd, "approximate": q.approximate}
            for q in compare_cards(api_totals, now, private=private)
        ],
        "notes": "Other providers' cards are approximate: their tokenizers differ from V4's.",
    }


def _backend_figures(cfg, llm) -> dict[str, Any]:
    if cfg.backend == "local" or llm is None:
        return {"backend": cfg.backend}
    st = llm.stats()
    return {"backend": cfg.backend, "stopped_by_spend_cap": bool(st.get("stopped_by_spend_cap")), "remote": st}


def write_json(out_url: str, name: str, obj: dict, so=None) -> None:
    from batchv4.io.urls import get_fs, join, write_atomic

    fs, path = get_fs(out_url, so)
    write_atomic(fs, join(fs, path, name), json.dumps(obj, indent=2, default=str).encode())
