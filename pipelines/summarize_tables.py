"""The tables `summarize` writes at its end: `documents.parquet`, `chunks.parquet`, `corpus.json`
and `summary.json`, each written atomically.

A document's token counts and `cost_usd` are the sums over its chunks and merges; the summary's
totals are the sums over every chunk, merge and corpus merge (`batchv4.accounting.summary`), so
they add up from chunks to documents to the whole by construction.

Owns: the tables' columns and the summary's layout. Does not own: the tree (`pipelines.summarize`)
or prices (each row's `cost_usd` is the one its round's `run` priced).
"""

from __future__ import annotations

import os

from batchv4.io.writers import write_table
from batchv4.pipelines.run_output import write_json

USAGE = ("prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "api_cache_hit_tokens",
         "completion_tokens", "reasoning_tokens")
CHUNK_COLUMNS = ("document_id", "chunk_id", "level", "round", "parent_id", "char_start", "char_end", "token_start",
                 "token_end", "summary", *USAGE, "cost_usd", "finish_reason", "error")


def _cost(rows) -> float | None:
    total = None
    for r in rows:
        if r.get("cost_usd") is not None:
            total = (total or 0.0) + r["cost_usd"]
    return total


def documents(docs, bad, frontier, failed, nodes: dict, layout) -> list[dict]:
    by_doc: dict[str, list[dict]] = {}
    for n in nodes.values():
        by_doc.setdefault(n["document_id"], []).append(n)
    rows = []
    for did, text in docs:
        mine = by_doc.get(did, [])
        top = frontier[did][0] if len(frontier[did]) == 1 else None
        err = next((n["error"] for n in mine if n.get("error")), None) if did in failed else None
        rows.append({"id": did, "summary": None if err or top is None else top["summary"],
                     "levels": len({n["round"] for n in mine}),
                     "chunks": sum(n["level"] == 1 for n in mine), "merges": sum(n["level"] > 1 for n in mine),
                     "characters": len(text), "document_tokens": len(layout.tok.encode(text)),
                     **{k: sum(n[k] for n in mine) for k in USAGE}, "cost_usd": _cost(mine), "error": err})
    for b in bad:
        rows.append({"id": b["id"], "summary": None, "levels": 0, "chunks": 0, "merges": 0, "characters": None,
                     "document_tokens": None, **{k: 0 for k in USAGE}, "cost_usd": None, "error": b["error"]})
    return rows


def write_all(out: str, cfg, doc_rows: list[dict], nodes: list[dict], corpus: dict | None, rounds: list[dict],
              layout) -> dict:
    import pyarrow as pa

    from batchv4.accounting.summary import summarize as totals_of

    chunk_rows = [{k: n.get(k) for k in CHUNK_COLUMNS} for n in nodes]
    doc_schema = pa.schema([("id", pa.string()), ("summary", pa.string()), ("levels", pa.int64()),
                            ("chunks", pa.int64()), ("merges", pa.int64()), ("characters", pa.int64()),
                            ("document_tokens", pa.int64()), *[(k, pa.int64()) for k in USAGE],
                            ("cost_usd", pa.float64()), ("error", pa.string())])
    chunk_schema = pa.schema([("document_id", pa.string()), ("chunk_id", pa.string()), ("level", pa.int64()),
                              ("round", pa.string()), ("parent_id", pa.string()), ("char_start", pa.int64()),
                              ("char_end", pa.int64()), ("token_start", pa.int64()), ("token_end", pa.int64()),
                              ("summary", pa.string()), *[(k, pa.int64()) for k in USAGE],
                              ("cost_usd", pa.float64()), ("finish_reason", pa.string()), ("error", pa.string())])
    write_table(os.path.join(out, "documents.parquet"), pa.Table.from_pylist(doc_rows, schema=doc_schema))
    write_table(os.path.join(out, "chunks.parquet"), pa.Table.from_pylist(chunk_rows, schema=chunk_schema))
    corpus_nodes = []
    if corpus is not None:
        corpus_nodes = [{k: n.get(k) for k in CHUNK_COLUMNS if not k.startswith(("char_", "token_"))}
                        | {"children": n["children"]} for n in corpus["nodes"]]
        write_json(out, "corpus.json", {**corpus, "nodes": corpus_nodes,
                                                 **{k: sum(n[k] for n in corpus["nodes"]) for k in USAGE},
                                                 "cost_usd": _cost(corpus["nodes"])})
    every = chunk_rows + corpus_nodes
    totals = totals_of(every).to_dict()
    first = [r for r in chunk_rows if r["round"] == "level-1"]
    prefix = _instruction_prefix(layout)
    run = cfg.run
    summary = {
        "config": {"corpus": run.input, "output": run.output, "model": run.model, "backend": run.backend,
                   "max_model_len": layout.max_model_len, "max_summary_tokens": cfg.max_summary_tokens,
                   "chunk_tokens": cfg.chunk_tokens, "strategy": cfg.strategy, "corpus_summary": cfg.corpus_summary,
                   "instructions": cfg.instructions, "price": run.price},
        "price_card": run.price,
        "counts": {"documents": len(doc_rows), "error_documents": sum(r["error"] is not None for r in doc_rows),
                   "one_pass_documents": sum(r["chunks"] == 1 and r["merges"] == 0 for r in doc_rows
                                             if r["error"] is None),
                   "chunks": sum(r["level"] == 1 for r in chunk_rows), "merges": sum(r["level"] > 1 for r in chunk_rows),
                   "corpus_merges": len(corpus_nodes), "rounds": len(rounds),
                   "max_levels": max((r["levels"] for r in doc_rows), default=0)},
        "totals": totals,
        "first_level": totals_of(first).to_dict(),
        "cache": {"instruction_prefix_tokens": prefix,
                  "note": "every prompt starts with BOS, the instructions and the user marker "
                          f"({prefix} tokens): computed once, then a cache hit (prompt_cache_hit_tokens for "
                          "batchv4's engine, api_cache_hit_tokens as an API would bill them)"},
        "rounds": rounds,
        "this_run": {k: sum(r[k] for r in rounds) for k in ("prefill_tokens_computed", "cached_prompt_tokens",
                                                             "decode_tokens", "new_output_rows", "wall_seconds")},
    }
    write_json(out, "summary.json", summary)
    return summary


def _instruction_prefix(layout) -> int:
    """Tokens every prompt shares: BOS, the instructions, the user marker."""
    a, b = layout.tok.chat_token_ids([[{"role": "system", "content": layout.instructions},
                                       {"role": "user", "content": u}] for u in ("x", "y")], False)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n



