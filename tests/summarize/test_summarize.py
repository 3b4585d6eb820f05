"""`batchv4 summarize` on real text that ships with Python (standard-library docstrings), with a
context small enough to force three levels: offsets, the tree, token and cost sums, the shared
instruction prefix as a cache hit, `--estimate`, and kill -9 during level 2 then a rerun.

The engine is the real `test` preset behind `FoldedLLM` (tests/cli/cli_engines.py): V4-tokenized
prompts folded into its 512-token vocabulary, so token accounting is exact.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli"))
from cli_engines import CLI_WITH_TEST_ENGINE, folded_llm  # noqa: E402


def _doc(*modules: str) -> str:
    return "\n\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in modules)


DOCS = {"long": _doc("re"),             # 1,385 tokens: three levels
        "medium": _doc("argparse"),     # 561 tokens: two levels
        "short": _doc("pickle")}        # 89 tokens: one pass
OPTS = ["--model", "test", "--device", "cpu", "--max-model-len", "300", "--max-summary-tokens", "32",
        "--part-rows", "1", "--corpus-summary", "--quiet"]


def _corpus(folder) -> str:
    path = os.path.join(str(folder), "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for k, v in DOCS.items():
            f.write(json.dumps({"id": k, "text": v}) + "\n")
    return path


def _config(corpus: str, out: str):
    from batchv4.pipelines.run_config import RunConfig
    from batchv4.pipelines.summarize import SummarizeConfig

    return SummarizeConfig(RunConfig(input=corpus, output=out, model="test", device="cpu", max_model_len=300,
                                     part_rows=1, quiet=True),
                           max_summary_tokens=32, corpus_summary=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One uninterrupted job in this process (the reference of the kill test too)."""
    import torch

    import batchv4.pipelines.run as run_mod
    from batchv4.pipelines.summarize import summarize

    tmp = tmp_path_factory.mktemp("summarize")
    corpus, out = _corpus(tmp), str(tmp / "out")
    old, threads = run_mod._default_llm, torch.get_num_threads()
    run_mod._default_llm, _ = folded_llm, torch.set_num_threads(1)
    try:
        summary = summarize(_config(corpus, out))
    finally:
        run_mod._default_llm = old
        torch.set_num_threads(threads)
    chunks = pq.read_table(os.path.join(out, "chunks.parquet")).to_pylist()
    docs = pq.read_table(os.path.join(out, "documents.parquet")).to_pylist()
    return {"corpus": corpus, "out": out, "summary": summary, "chunks": chunks, "docs": docs, "tmp": tmp}


def test_offsets_cover_each_document_and_the_tree_is_whole(job):
    chunks, docs = job["chunks"], {d["id"]: d for d in job["docs"]}
    ids = {c["chunk_id"] for c in chunks}
    assert len(ids) == len(chunks) and "id" not in chunks[0]
    assert {d: docs[d]["levels"] for d in DOCS} == {"long": 3, "medium": 2, "short": 1}
    for did, text in DOCS.items():
        mine = [c for c in chunks if c["document_id"] == did]
        first = sorted((c for c in mine if c["level"] == 1), key=lambda c: c["char_start"])
        assert first[0]["char_start"] == 0 and first[-1]["char_end"] == len(text)
        assert all(a["char_end"] == b["char_start"] and a["token_end"] == b["token_start"] for a, b in zip(first, first[1:]))
        assert "".join(text[c["char_start"]:c["char_end"]] for c in first) == text
        tops = [c for c in mine if c["parent_id"] is None]
        assert len(tops) == 1 and (tops[0]["char_start"], tops[0]["char_end"]) == (0, len(text))
        assert tops[0]["summary"] == docs[did]["summary"] and docs[did]["error"] is None
        for c in mine:
            if c["parent_id"] is not None:
                parent = next(p for p in mine if p["chunk_id"] == c["parent_id"])
                assert parent["level"] > c["level"]
                assert parent["char_start"] <= c["char_start"] and c["char_end"] <= parent["char_end"]
    assert docs["short"]["chunks"] == 1 and docs["short"]["merges"] == 0
    # a level-1 chunk prefers to end at a paragraph or line break
    breaks = sum(DOCS[c["document_id"]][:c["char_end"]].endswith("\n") for c in chunks
                 if c["level"] == 1 and c["char_end"] < len(DOCS[c["document_id"]]))
    assert breaks >= 0.8 * sum(1 for c in chunks if c["level"] == 1 and c["char_end"] < len(DOCS[c["document_id"]]))


def test_tokens_and_costs_add_up_and_the_instructions_are_a_cache_hit(job):
    chunks, docs, s = job["chunks"], job["docs"], job["summary"]
    with open(os.path.join(job["out"], "corpus.json")) as f:
        corpus = json.load(f)
    keys = ("prompt_tokens", "prompt_cache_hit_tokens", "api_cache_hit_tokens", "completion_tokens")
    for d in docs:
        mine = [c for c in chunks if c["document_id"] == d["id"]]
        for k in keys:
            assert d[k] == sum(c[k] for c in mine)
        assert d["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in mine), rel=1e-12)
    for k in keys:
        assert s["totals"][k] == sum(d[k] for d in docs) + corpus[k]
    assert s["totals"]["cost_usd"] == pytest.approx(sum(d["cost_usd"] for d in docs) + corpus["cost_usd"], rel=1e-9)
    assert corpus["summary"] and corpus["documents"] == 3 and corpus["nodes"]
    # the rows of each level run are the chunks of that round: the same tokens
    for r in s["rounds"]:
        rows = list(_run_rows(job["out"], r["round"]))
        assert len(rows) == r["rows"]
    prefix = s["cache"]["instruction_prefix_tokens"]
    first = [c for c in chunks if c["round"] == "level-1"]
    assert prefix > 64 and len(first) >= 10
    # every prompt after the first use of the instructions reads them from the cache
    assert sum(c["prompt_cache_hit_tokens"] >= prefix for c in first) == len(first) - 1
    assert sum(c["api_cache_hit_tokens"] >= prefix - prefix % 64 for c in first) == len(first) - 1


def _run_rows(out, rnd):
    from batchv4.io.writers import iter_output_rows

    return iter_output_rows(os.path.join(out, "_levels", rnd))


def test_estimate_predicts_first_level_tokens_and_chunks_exactly(job):
    from batchv4.pipelines.summarize_estimate import estimate_summarize

    est = estimate_summarize(_config(job["corpus"], ""))
    first = [c for c in job["chunks"] if c["round"] == "level-1"]
    assert est["tokens"]["first_level_prompt_tokens"] == sum(c["prompt_tokens"] for c in first)
    assert est["chunks"] == len(first) == sum(c["level"] == 1 for c in job["chunks"])
    assert est["levels"]["by_document"] == {"long": 3, "medium": 2, "short": 1}
    # merges are expected values (every summary taken as --max-summary-tokens long): an upper bound here
    assert est["merges_expected"] >= job["summary"]["counts"]["merges"] >= 2
    assert est["cost_usd"]["total_expected"] > 0


def _cli(corpus, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_TEST_ENGINE, "summarize", corpus, "-o", out, *OPTS,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _listed(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "manifest.json")) as f:
            return len(json.load(f)["parts"])
    except (OSError, ValueError):
        return 0


def test_kill_during_level_2_then_rerun_recomputes_nothing_done_and_equals_the_reference(job):
    out = str(job["tmp"] / "killed")
    p = _cli(job["corpus"], out)
    level2 = os.path.join(out, "_levels", "level-2")
    t0 = time.monotonic()
    while _listed(level2) < 1:
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() - t0 < 120, "timed out waiting for level 2"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = _listed(level2)
    want2 = next(r["rows"] for r in job["summary"]["rounds"] if r["round"] == "level-2")
    # level 2's rows can finish in one engine step, so the kill may land after all of them were
    # listed (before level 3 or the tables): the job is killed inside level 2 or right after it
    assert 1 <= done <= want2 and not os.path.exists(os.path.join(out, "documents.parquet"))
    p = _cli(job["corpus"], out)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err.decode()[-2000:]
    with open(os.path.join(out, "summary.json")) as f:
        rounds = {r["round"]: r for r in json.load(f)["rounds"]}
    # level 1 was not recomputed: the rerun's engine prefilled nothing for it
    assert rounds["level-1"]["prefill_tokens_computed"] == 0 and rounds["level-1"]["new_output_rows"] == 0
    assert rounds["level-1"]["skipped_done"] == rounds["level-1"]["rows"]
    with open(os.path.join(out, "_levels", "level-1", "summary.json")) as f:
        assert json.load(f)["this_run"]["prefill_tokens_computed"] == 0
    # level 2 resumed at the row where it stopped
    assert rounds["level-2"]["skipped_done"] >= done and rounds["level-2"]["new_output_rows"] == want2 - rounds["level-2"]["skipped_done"]
    # what the cache served depends on what this invocation computed: hits, misses and cost apart
    cached = ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "api_cache_hit_tokens", "cost_usd")
    same = lambda rows: sorted(tuple((k, v) for k, v in r.items() if k not in cached) for r in rows)  # noqa: E731
    assert same(pq.read_table(os.path.join(out, "chunks.parquet")).to_pylist()) == same(job["chunks"])
    assert same(pq.read_table(os.path.join(out, "documents.parquet")).to_pylist()) == same(job["docs"])


def test_a_context_too_small_for_two_summaries_is_one_line_error(job):
    p = subprocess.run([sys.executable, "-m", "batchv4", "summarize", job["corpus"], "-o", str(job["tmp"] / "x"),
                        "--model", "test", "--max-model-len", "150", "--max-summary-tokens", "32"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--max-model-len 150" in p.stderr and p.stderr.count("\n") == 1


def test_incremental_strategy_is_a_chain_of_level_1_steps(tmp_path, monkeypatch):
    import batchv4.pipelines.run as run_mod
    from batchv4.pipelines.summarize import summarize

    monkeypatch.setattr(run_mod, "_default_llm", folded_llm)
    corpus = _corpus(tmp_path)
    cfg = _config(corpus, str(tmp_path / "inc"))
    from dataclasses import replace

    s = summarize(replace(cfg, strategy="incremental", corpus_summary=False))
    chunks = pq.read_table(str(tmp_path / "inc" / "chunks.parquet")).to_pylist()
    docs = {d["id"]: d for d in pq.read_table(str(tmp_path / "inc" / "documents.parquet")).to_pylist()}
    assert all(c["level"] == 1 for c in chunks) and s["counts"]["merges"] == 0
    for did, text in DOCS.items():
        steps = sorted((c for c in chunks if c["document_id"] == did), key=lambda c: c["char_start"])
        assert "".join(text[c["char_start"]:c["char_end"]] for c in steps) == text
        assert [c["parent_id"] for c in steps] == [c["chunk_id"] for c in steps[1:]] + [None]
        assert docs[did]["summary"] == steps[-1]["summary"] and docs[did]["levels"] == len(steps)
    assert docs["long"]["levels"] > 3
