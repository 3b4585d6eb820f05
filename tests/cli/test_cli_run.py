"""`batchv4 run` end to end through CliRunner: each input format and storage, the output columns,
summary sums against the rows, and cost_usd against genai-prices' own calculation."""

import json
import os
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_engines import (  # noqa: E402
    SATURDAY_PEAK,
    WEEKDAY_PEAK,
    fast_engine,  # noqa: F401  (fixture)
    fix_clock,
    read_error_rows,
    read_outputs,
    run_main,
    write_jsonl,
)
from s3_server import moto_endpoint, s3  # noqa: E402,F401  (fixtures)

from batchv4.cli import cli  # noqa: E402

REQUIRED = ["id", "output", "reasoning", "finish_reason", "prompt_tokens", "prompt_cache_hit_tokens",
            "prompt_cache_miss_tokens", "completion_tokens", "reasoning_tokens", "cost_usd"]
DOC = ("Document: The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of the border "
       "between Germany and France, and reaches the North Sea in the Netherlands. Its basin is home to about "
       "sixty million people, and it has carried barge traffic since Roman times.\n\nQuestion: ")
QUESTIONS = ["Where does it rise?", "Which lake?", "Where does it end?", "How many people?"]


def invoke(args):
    r = CliRunner().invoke(cli, ["run", *args, "--quiet"], catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r


def calc_price_usd(row, card_name="deepseek-v4-flash", when=None):
    """genai-prices' own price for a row's usage at `when` (default: the row's finished_at)."""
    from genai_prices import Usage, calc_price

    from batchv4.accounting.cards import get_card

    card = get_card(card_name)  # only for the model ref and provider
    # cost_usd is priced with the API's cache hits, not the engine's
    usage = Usage(input_tokens=row["prompt_tokens"], cache_read_tokens=row["api_cache_hit_tokens"],
                  output_tokens=row["completion_tokens"])
    return float(calc_price(usage, card.model_ref, provider_id=card.provider_id,
                            genai_request_timestamp=when or row["finished_at"]).total_price)


def check_summary(out, rows, errors, storage_options=None):
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    s = json.loads(fs.cat_file(path.rstrip("/") + "/summary.json"))
    t = s["totals"]
    for k in ("prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "api_cache_hit_tokens",
              "completion_tokens", "reasoning_tokens"):
        assert t[k] == sum(r[k] for r in rows), k
    assert t["rows"] == s["counts"]["output_rows"] == len(rows)
    assert s["counts"]["error_rows"] == len(errors)
    assert t["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows), rel=1e-12)
    assert t["prompt_tokens"] == t["prompt_cache_hit_tokens"] + t["prompt_cache_miss_tokens"]
    for r in rows:
        assert r["prompt_tokens"] == r["prompt_cache_hit_tokens"] + r["prompt_cache_miss_tokens"]
        assert 0 <= r["reasoning_tokens"] <= r["completion_tokens"]
    return s


def test_jsonl_on_the_tiny_model(tmp_path, monkeypatch):
    """The real default engine (`--model tiny`, real vocabulary), no stand-in."""
    fix_clock(monkeypatch, WEEKDAY_PEAK)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": DOC + q} for i, q in enumerate(QUESTIONS)]
                      + [{"id": "other", "prompt": "What is 2 + 2?"}])
    out = str(tmp_path / "out")
    invoke([src, "-o", out, "--max-tokens", "3"])
    rows = read_outputs(out)
    assert sorted(r["id"] for r in rows) == ["other", "q0", "q1", "q2", "q3"]
    table = pq.read_table(os.path.join(out, "part-00000.parquet"))
    assert set(REQUIRED) <= set(table.column_names)
    assert all(r["finish_reason"] in ("stop", "length") and r["reasoning"] is None for r in rows)
    assert all(1 <= r["completion_tokens"] <= 3 for r in rows)
    # the four questions share a 60-token document: the plan serves it from the cache
    assert sum(r["prompt_cache_hit_tokens"] for r in rows) > 0
    s = check_summary(out, rows, [])
    # amortizing the shared document moves cost between rows, never adds or removes any
    assert sum(r["cost_usd_amortized"] for r in rows) == pytest.approx(sum(r["cost_usd"] for r in rows), rel=1e-12)
    for r in rows:
        assert r["finished_at"] == WEEKDAY_PEAK
        assert r["cost_usd"] == pytest.approx(calc_price_usd(r), rel=1e-12)
    assert s["this_run"]["prefill_tokens_computed"] + s["this_run"]["cached_prompt_tokens"] == sum(
        r["prompt_tokens"] for r in rows)
    # tokens equal the tokenizer's on the chat-encoded prompt
    from batchv4.tokenizer import load_tokenizer

    ids = load_tokenizer().chat_token_ids([[{"role": "user", "content": "What is 2 + 2?"}]], False)[0]
    assert next(r for r in rows if r["id"] == "other")["prompt_tokens"] == len(ids)
    rep = CliRunner().invoke(cli, ["report", out, "--json"])
    assert rep.exit_code == 0 and json.loads(rep.output)["totals"] == s["totals"]


def test_weekend_is_billed_off_peak(tmp_path, monkeypatch, fast_engine):
    fix_clock(monkeypatch, SATURDAY_PEAK)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": DOC + q} for q in QUESTIONS[:2]])
    out = str(tmp_path / "out")
    invoke([src, "-o", out, "--max-tokens", "3"])
    rows = read_outputs(out)
    off_peak_same_day = SATURDAY_PEAK.replace(hour=5)  # 05:00 UTC is between the two peak windows
    for r in rows:
        assert r["finished_at"] == SATURDAY_PEAK
        assert r["cost_usd"] == pytest.approx(calc_price_usd(r, when=off_peak_same_day), rel=1e-12)
        # genai-prices' own table charges the peak rate on a Saturday: that is what we correct
        assert r["cost_usd"] < calc_price_usd(r) * 0.6


def test_parquet_folder_template_keep_columns(tmp_path, monkeypatch, fast_engine):
    fix_clock(monkeypatch, WEEKDAY_PEAK)
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"key": [10, 11], "question": QUESTIONS[:2], "score": [0.5, 1.5]}),
                   folder / "part-0.parquet")
    pq.write_table(pa.table({"key": [12], "question": [QUESTIONS[2]], "score": [2.5]}), folder / "part-1.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    out = str(tmp_path / "out")
    invoke([str(folder), "-o", out, "--template", DOC + "{question}", "--id-column", "key",
            "--keep-columns", "score,question", "--max-tokens", "2", "--price", "deepseek-v4-pro"])
    rows = sorted(read_outputs(out), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["10", "11", "12"]
    assert [r["score"] for r in rows] == [0.5, 1.5, 2.5] and [r["question"] for r in rows] == QUESTIONS[:3]
    table = pq.read_table(os.path.join(out, "part-00000.parquet"))
    assert table.schema.field("score").type == pa.float64()
    for r in rows:
        assert r["cost_usd"] == pytest.approx(calc_price_usd(r, "deepseek-v4-pro"), rel=1e-12)
    s = check_summary(out, rows, [])
    assert s["price_card"] == "deepseek-v4-pro" and s["config"]["id_column"] == "key"
    assert {q["card"] for q in s["compare"]} >= {"deepseek-v4-flash", "deepseek-v4-pro", "gpt-5.4",
                                                 "gemini-3.1-pro", "claude-sonnet-4.6"}


def test_openai_batch_in_and_out(tmp_path, monkeypatch, fast_engine):
    fix_clock(monkeypatch, WEEKDAY_PEAK)
    body = {"model": "deepseek-v4-flash"}
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": DOC + QUESTIONS[0]}], "max_tokens": 2}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                  "max_completion_tokens": 3, "n": 2, "temperature": 0.7, "seed": 4}},
        {"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {**body, "input": "x"}},
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "messages": [{"role": "user", "content": "Think."}], "max_tokens": 2,
                  "thinking": {"type": "enabled"}}},
        {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"}},
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"cards": {"mine": {"input_per_mtok": 1.0, "cached_input_per_mtok": 0.1,
                                                     "output_per_mtok": 2.0, "gpu_hour_usd": 3.6}}}))
    out = str(tmp_path / "out")
    invoke([src, "-o", out, "--max-tokens", "5", "--prices", str(prices), "--price", "mine"])
    rows = read_outputs(out)
    errors = read_error_rows(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == [("a", 0), ("b", 0), ("b", 1), ("d", 0)]
    assert {e["id"]: e["row_index"] for e in errors} == {"c": 2, "e": 4}
    by = {(r["id"], r["sample_index"]): r for r in rows}
    assert by["a", 0]["completion_tokens"] <= 2 and by["b", 0]["completion_tokens"] <= 3
    assert by["a", 0]["reasoning"] is None and by["d", 0]["reasoning"] is not None  # body's thinking wins
    for r in rows:   # a private card: plain arithmetic, and engine seconds x the GPU-hour price
        hit = r["api_cache_hit_tokens"]     # priced with the API's hits
        want = ((r["prompt_tokens"] - hit) * 1.0 + hit * 0.1 + r["completion_tokens"] * 2.0) / 1e6
        assert r["cost_usd"] == pytest.approx(want, rel=1e-12)
        assert r["engine_seconds"] > 0 and r["cost_usd_self_hosted"] == pytest.approx(r["engine_seconds"] / 1000)
    s = check_summary(out, rows, errors)
    assert s["totals"]["cost_usd_self_hosted"] == pytest.approx(sum(r["cost_usd_self_hosted"] for r in rows))
    with open(os.path.join(out, "output.jsonl")) as f:
        res = [json.loads(line) for line in f]
    assert sorted(x["custom_id"] for x in res) == ["a", "b", "c", "d", "e"]
    ok = {x["custom_id"]: x for x in res if x["error"] is None}
    assert set(ok) == {"a", "b", "d"}
    b = ok["b"]["response"]["body"]
    assert [c["index"] for c in b["choices"]] == [0, 1]
    assert b["usage"]["completion_tokens"] == by["b", 0]["completion_tokens"] + by["b", 1]["completion_tokens"]
    # usage once per request, as OpenAI's batch output has it: the prompt counts once for n samples
    assert b["usage"]["prompt_tokens"] == by["b", 0]["prompt_tokens"]
    assert len({x["id"] for x in res}) == len(res)
    assert ok["a"]["response"]["body"]["choices"][0]["message"]["content"] == by["a", 0]["output"]
    failed = {x["custom_id"]: x["error"]["message"] for x in res if x["error"] is not None}
    assert "/v1/embeddings" in failed["c"] and "reasoning_effort" in failed["e"]


def test_memory_fs_in_and_out(monkeypatch, fast_engine, capsys):
    """memory:// works through the library; the CLI refuses it as an output (it ends with the process)."""
    from batchv4.pipelines.run import RunConfig, run

    fix_clock(monkeypatch, WEEKDAY_PEAK)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/cli-test/in.jsonl", b"".join(json.dumps({"prompt": DOC + q}).encode() + b"\n"
                                                for q in QUESTIONS) + b'{"prompt": null}\n')
    try:
        code, _, err = run_main(["run", "memory://cli-test/in.jsonl", "-o", "memory://cli-test/out", "--quiet"], capsys)
        assert code == 1 and "memory:// storage ends with this process" in err and err.count("\n") == 1
        assert not fs.exists("/cli-test/out")
        run(RunConfig(input="memory://cli-test/in.jsonl", output="memory://cli-test/out", max_tokens=2, quiet=True))
        rows, errors = read_outputs("memory://cli-test/out"), read_error_rows("memory://cli-test/out")
        assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3"] and [e["row_index"] for e in errors] == [4]
        check_summary("memory://cli-test/out", rows, errors)
        assert all(r["cost_usd"] == pytest.approx(calc_price_usd(r), rel=1e-12) for r in rows)
    finally:
        fs.rm("/cli-test", recursive=True)


def test_s3_in_and_out(s3, monkeypatch, fast_engine):
    fix_clock(monkeypatch, WEEKDAY_PEAK)
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)  # the endpoint reaches the CLI only through the environment
    fs = fsspec.filesystem("s3", **s3.storage_options)
    with fs.open(s3.url("in/data.parquet"), "wb") as f:
        pq.write_table(pa.table({"id": ["x", "y"], "messages": [[{"role": "user", "content": DOC + q}]
                                                                for q in QUESTIONS[:2]]}), f)
    out = s3.url("runs/one")
    invoke([s3.url("in/data.parquet"), "-o", out, "--max-tokens", "2"])
    opts = s3.storage_options
    rows = read_outputs(out, opts)
    assert sorted(r["id"] for r in rows) == ["x", "y"]
    s = check_summary(out, rows, [], opts)
    assert s["config"]["messages_column"] == "messages"
    assert all(r["cost_usd"] == pytest.approx(calc_price_usd(r), rel=1e-12) for r in rows)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out, refresh=True))
    assert names == ["_batchv4.json", "manifest.json", "part-00000.parquet", "summary.json"]
    rep = CliRunner().invoke(cli, ["report", out, "--json"])
    assert rep.exit_code == 0, rep.output
    assert json.loads(rep.output)["counts"]["output_rows"] == 2
