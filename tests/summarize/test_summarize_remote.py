"""`summarize` through the remote backend (a real OpenAI-compatible server on loopback) over
corpora on S3 (moto on loopback): JSONL rows with bad documents among them, and a folder of text
files. Every input document ends exactly once in documents.parquet, with its error when it has one;
token counts are the server's usage, summed from chunks to documents to the whole."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

import fsspec
import pyarrow.parquet as pq
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "remote"))
sys.path.insert(0, os.path.dirname(HERE))
from fakes import StubAPI, prompt_text  # noqa: E402
from s3_server import moto_endpoint, s3  # noqa: E402,F401  (fixtures)

from batchv4.pipelines.run_config import RunConfig  # noqa: E402
from batchv4.pipelines.summarize import SummarizeConfig, summarize  # noqa: E402
from batchv4.pipelines import summarize_chunks as sc  # noqa: E402
from batchv4.pipelines.summarize_chunks import DEFAULT_INSTRUCTIONS  # noqa: E402
from batchv4.pipelines.summarize_estimate import estimate_summarize  # noqa: E402


def _doc(*modules: str) -> str:
    return "\n\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in modules)


def _config(corpus: str, out: str, url: str, **kw) -> SummarizeConfig:
    run = RunConfig(input=corpus, output=out, backend="openai", base_urls=(url,), model="deepseek-v4-flash",
                    max_model_len=400, quiet=True)
    return SummarizeConfig(run, max_summary_tokens=32, **kw)


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)      # the endpoint reaches the readers through the environment
    return s3


def test_s3_jsonl_corpus_with_bad_documents_over_http(s3_env, tmp_path):
    s3 = s3_env
    rows = [{"id": "long", "text": _doc("re")}, {"id": "short", "text": _doc("pickle")},
            {"id": "none", "text": None}, {"id": "short", "text": "a second document with the same id"},
            {"id": "poison", "text": "POISON " + _doc("json")}, {"id": "blank", "text": "   "}]
    fs = fsspec.filesystem("s3", **s3.storage_options)
    with fs.open(s3.url("corpus/docs.jsonl"), "wb") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode() + b"{not json\n")
    out = str(tmp_path / "out")
    with StubAPI(fail_when=lambda text: "POISON" in text) as api:
        s = summarize(_config(s3.url("corpus/docs.jsonl"), out, api.url, corpus_summary=True))
    docs = pq.read_table(os.path.join(out, "documents.parquet")).to_pylist()
    chunks = pq.read_table(os.path.join(out, "chunks.parquet")).to_pylist()
    # every input row exactly once: five documents that failed or were summarized, plus the bad line
    assert sorted(d["id"] for d in docs) == sorted(["long", "short", "none", "short", "poison", "blank", "6"])
    errors = {d["id"]: d["error"] for d in docs if d["error"]}
    assert sorted(errors) == ["6", "blank", "none", "poison", "short"]
    assert "not a string" in errors["none"] and "empty" in errors["blank"] and "duplicate id" in errors["short"]
    assert "400" in errors["poison"] and "json" in errors["6"].lower()
    good = {d["id"]: d for d in docs if not d["error"]}
    assert set(good) == {"long", "short"} and good["long"]["levels"] >= 2 and good["short"]["levels"] == 1
    assert all(good[k]["summary"].startswith("echo: ") for k in good)
    assert s["counts"]["error_documents"] == 5 and s["counts"]["documents"] == 7
    # the prompts: the instructions first, as the system message, in every request
    assert api.log and all(e["body"]["messages"][0] == {"role": "system", "content": DEFAULT_INSTRUCTIONS}
                           for e in api.log)
    # usage is the server's (one token per character in this stub), summed chunk -> document -> total
    answered = [e for e in api.log if "POISON" not in prompt_text(e["body"])]
    with open(os.path.join(out, "corpus.json")) as f:
        corpus = json.load(f)
    assert corpus["documents"] == 2 and corpus["summary"].startswith("echo: ")
    assert s["totals"]["prompt_tokens"] == sum(len(prompt_text(e["body"])) for e in answered)
    assert s["totals"]["api_cache_hit_tokens"] == sum(e["hit"] for e in answered) > 0
    for d in good.values():
        mine = [c for c in chunks if c["document_id"] == d["id"]]
        assert d["prompt_tokens"] == sum(c["prompt_tokens"] for c in mine)
        assert d["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in mine), rel=1e-12) and d["cost_usd"] > 0
    assert s["totals"]["cost_usd"] == pytest.approx(sum(d["cost_usd"] or 0 for d in docs) + corpus["cost_usd"])


def test_s3_folder_of_text_files_incremental_with_a_running_corpus_summary(s3_env, tmp_path):
    s3 = s3_env
    fs = fsspec.filesystem("s3", **s3.storage_options)
    texts = {"a.txt": _doc("argparse"), "sub/b.md": _doc("difflib"), "c.txt": "A short note.",
             "d.rst": _doc("shlex"), "e.txt": _doc("pickle")}
    for name, text in texts.items():
        with fs.open(s3.url(f"notes/{name}"), "wb") as f:
            f.write(text.encode())
    out = str(tmp_path / "out")
    with StubAPI() as api:
        cfg = _config(s3.url("notes"), out, api.url, strategy="incremental", corpus_summary=True)
        s = summarize(cfg)
    docs = {d["id"]: d for d in pq.read_table(os.path.join(out, "documents.parquet")).to_pylist()}
    chunks = pq.read_table(os.path.join(out, "chunks.parquet")).to_pylist()
    assert set(docs) == set(texts) and not any(d["error"] for d in docs.values())
    for name, text in texts.items():
        steps = sorted((c for c in chunks if c["document_id"] == name), key=lambda c: c["char_start"])
        assert "".join(text[c["char_start"]:c["char_end"]] for c in steps) == text
    assert docs["a.txt"]["levels"] > 1 and docs["c.txt"]["levels"] == 1
    # the corpus: a chain of running summaries, each step reading the one before and the next documents
    with open(os.path.join(out, "corpus.json")) as f:
        corpus = json.load(f)
    steps = corpus["nodes"]
    assert corpus["levels"] == len(steps) >= 2 and corpus["summary"] == steps[-1]["summary"]
    assert [n["round"] for n in steps] == [f"corpus-{k}" for k in range(1, len(steps) + 1)]
    assert [n["parent_id"] for n in steps] == [n["chunk_id"] for n in steps[1:]] + [None]
    assert all(b["children"][0] == a["chunk_id"] for a, b in zip(steps, steps[1:]))
    tops = [c for n in steps for c in n["children"] if not c.startswith("corpus#")]
    assert sorted(tops) == sorted(c["chunk_id"] for c in chunks if c["parent_id"] is None)
    assert all(sc.CORPUS_RUNNING_HEADER in e["body"]["messages"][1]["content"] for e in api.log[-len(steps) + 1:])
    assert s["counts"]["documents"] == 5 and s["counts"]["corpus_merges"] == len(steps)
    assert len(api.log) == sum(d["levels"] for d in docs.values()) + len(steps)
    est = estimate_summarize(cfg)
    assert est["chunks"] == len(chunks) and est["corpus_merges_expected"] >= 1
