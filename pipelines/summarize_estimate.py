"""`summarize --estimate`: chunks, levels, tokens and cost of a summarize job before it runs.

The first level is exact: its input is built exactly as the job builds it (same cuts, same
prompts) and counted and priced by `pipelines.estimate` (the run's own row front-end, tokenizer
and packing, so its prompt tokens and predicted cache hits are the run's). The merges are expected
values: every summary is taken to be `--max-summary-tokens` long and grouped as the job groups
them (greedy, within the context), with the instructions' prefix a cache hit.

Owns: the merge simulation and the estimate's layout. Does not own: counting or pricing rows
(`pipelines.estimate`, `batchv4.accounting`) or cutting (`summarize_chunks`). Never imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone

from batchv4.pipelines import summarize_chunks as sc


def _groups(layout, lens: list[int], header: str) -> list[list[int]]:
    return sc.pack_by_length(lens, layout.budget(header))


def _tree(layout, n: int, s: int, header: str) -> tuple[int, int, list[int]]:
    """Expected (levels above the first, merges, merge prompt tokens each) of merging n summaries."""
    overhead = layout.prompt_len(header)
    cap = sc.item_cap(layout, header)
    frontier = [min(s, cap) + 2] * n
    levels = merges = 0
    prompts: list[int] = []
    while len(frontier) > 1:
        levels += 1
        nxt = []
        for g in _groups(layout, frontier, header):
            if len(g) == 1:
                nxt.append(frontier[g[0]])
                continue
            merges += 1
            prompts.append(overhead + sum(frontier[i] for i in g))
            nxt.append(min(s, cap) + 2)
        frontier = nxt
    return levels, merges, prompts


def _chain(layout, n: int, s: int) -> list[int]:
    """Expected prompt tokens of each step of a running corpus summary over n summaries: the first
    step packs what fits after the corpus header; each later one the summary so far (s tokens) and
    what fits beside it."""
    prompts: list[int] = []
    i = 0
    while n > 1 and i < n:
        header = sc.CORPUS_HEADER if not prompts else sc.corpus_running_header("")
        held = s + 2 if prompts else 0
        budget = layout.budget(header) - held
        item = min(s, max(1, budget // 2 - 2)) + 2
        g = max(1, min(n - i, budget // item))
        prompts.append(layout.prompt_len(header) + held + g * item)
        i += g
    return prompts


def estimate_summarize(cfg, now: datetime | None = None) -> dict:
    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.accounting.summary import Totals, price_totals
    from batchv4.packing import PackConfig
    from batchv4.pipelines.estimate import EstimateConfig, estimate
    from batchv4.pipelines.summarize import first_level, layout_of
    from batchv4.pipelines.summarize_tables import _instruction_prefix

    now = now or datetime.now(timezone.utc)
    run, s = cfg.run, cfg.max_summary_tokens
    layout = layout_of(cfg)
    docs, bad = sc.read_corpus(run, cfg.text_column, cfg.id_column)
    first, later = first_level(cfg, layout, docs)
    with tempfile.TemporaryDirectory(prefix="batchv4-summarize-estimate-") as tmp:
        path = os.path.join(tmp, "level-1.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for n in first:
                f.write(json.dumps({"id": n["chunk_id"], "messages": sc.messages(cfg.instructions, n["user"])},
                                   ensure_ascii=False) + "\n")
        est = estimate(EstimateConfig(input=path, fmt="jsonl", model=run.model, messages_column="messages",
                                      id_column="id", max_tokens=s, max_model_len=run.max_model_len,
                                      backend=run.backend, tokenizer=run.tokenizer, price=run.price,
                                      prices_file=run.prices_file, temperature=run.temperature), now=now)
    per_doc: dict[str, int] = {}
    for n in first:
        per_doc[n["document_id"]] = per_doc.get(n["document_id"], 0) + 1
    merge_prompts: list[int] = []
    levels: dict[str, int] = {}
    if cfg.strategy == "incremental":
        for did, rest in later.items():
            lens = layout.prompt_lens([sc.running_text("", text) for _, text in rest])
            merge_prompts += [n + s for n in lens]
        for did, k in per_doc.items():
            levels[did] = 1 + len(later.get(did, []))
    else:
        for did, k in per_doc.items():
            lv, m, prompts = _tree(layout, k, s, sc.MERGE_HEADER)
            levels[did] = 1 + lv
            merge_prompts += prompts
    corpus_merges = 0
    if cfg.corpus_summary and cfg.strategy == "incremental":
        prompts = _chain(layout, len(docs), s)
        corpus_merges = len(prompts)
        merge_prompts += prompts
    elif cfg.corpus_summary:
        _, corpus_merges, prompts = _tree(layout, len(docs), s, sc.CORPUS_HEADER)
        merge_prompts += prompts
    unit = PackConfig().api_unit
    prefix = _instruction_prefix(layout)
    hits = (prefix - prefix % unit) * len(merge_prompts)
    m = len(merge_prompts)
    t = Totals(rows=m, prompt_tokens=sum(merge_prompts), prompt_cache_hit_tokens=hits,
               prompt_cache_miss_tokens=sum(merge_prompts) - hits, api_cache_hit_tokens=hits,
               completion_tokens=m * s)
    private = load_price_file(run.prices_file) if run.prices_file else {}
    merge_cost = price_totals(t, get_card(run.price, private), now)
    first_cost = est["cost_usd"]["expected"]
    total = None if first_cost is None or merge_cost is None else first_cost + merge_cost
    return {
        "documents": len(docs), "error_documents": len(bad) + est["error_rows"],
        "one_pass_documents": sum(1 for d, k in per_doc.items() if k == 1 and not later.get(d)),
        "chunks": sum(per_doc.values()) + sum(len(r) for r in later.values()),
        "first_level_rows": est["rows"],
        "levels": {"max": max(levels.values(), default=0), "by_document": levels},
        "merges_expected": m - corpus_merges, "corpus_merges_expected": corpus_merges,
        "tokens": {"first_level_prompt_tokens": est["tokens"]["prompt_tokens"],
                   "first_level_api_cache_hit_tokens": est["tokens"]["api_cache_hit_tokens"],
                   "first_level_engine_cache_hit_tokens": est["tokens"]["engine_cache_hit_tokens"],
                   "merge_prompt_tokens_expected": t.prompt_tokens,
                   "completion_tokens_expected": est["output_rows"] * s + t.completion_tokens,
                   "instruction_prefix_tokens": prefix},
        "card": est["card"],
        "cost_usd": {"first_level": est["cost_usd"], "merges_expected": merge_cost, "total_expected": total},
        "notes": "first level exact (prompts as the job builds them; its output tokens as a range, see "
                 "cost_usd.first_level); merges and later incremental steps expected, taking every summary "
                 "to be --max-summary-tokens long. " + est["notes"],
    }
