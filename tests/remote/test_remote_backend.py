"""`run --backend openai` against real HTTP servers on loopback: a stub API with DeepSeek's cache
semantics, and a fault-injecting proxy in front of it (tests/remote/fakes.py). No model runs here;
the same job against `batchv4 serve` is in test_remote_serve.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakes import FaultProxy, StubAPI, prompt_key  # noqa: E402

from batchv4.errors import UserError  # noqa: E402
from batchv4.pipelines.run import RunConfig, run  # noqa: E402

DOC = "The quick brown fox jumps over the lazy dog. " * 8      # 360 characters: 5 cache units


def write_rows(path, n_docs=3, per_doc=5, extra=None):
    rows = []
    for d in range(n_docs):
        doc = f"Document {d}. " + DOC
        for q in range(per_doc):
            r = {"id": f"d{d}q{q}", "messages": [{"role": "system", "content": doc},
                                                  {"role": "user", "content": f"question {q} about {d}"}]}
            rows.append(r | (extra or {}))
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def cfg(tmp_path, urls, **kw):
    kw.setdefault("quiet", True)
    kw.setdefault("output", str(tmp_path / "out"))
    return RunConfig(input=str(tmp_path / "in.jsonl"), backend="openai", base_urls=tuple(urls),
                     model="deepseek-v4-flash", **kw)


def outputs(tmp_path, name="out"):
    import glob

    parts = sorted(glob.glob(str(tmp_path / name / "part-*.parquet")))
    return pl.concat([pl.read_parquet(p) for p in parts]) if parts else pl.DataFrame()


def errors(tmp_path, name="out"):
    import glob

    parts = sorted(glob.glob(str(tmp_path / name / "errors-*.parquet")))
    return pl.concat([pl.read_parquet(p) for p in parts]) if parts else pl.DataFrame()


def test_plan_order_leader_first_and_usage(tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", extra={"user": "someone"})
    with StubAPI(delay=0.02) as api:
        s = run(cfg(tmp_path, [api.url], concurrency=8))
    out = outputs(tmp_path)
    assert sorted(out["id"]) == sorted(r["id"] for r in rows)
    assert set(out["output"]) == {f"echo: question {q} about {d}" for d in range(3) for q in range(5)}
    # within a document, one request went first and the others only after it had been answered
    by_doc: dict[str, list] = {}
    for e in api.log:
        by_doc.setdefault(e["body"]["messages"][0]["content"], []).append(e)
    for entries in by_doc.values():
        first, rest = entries[0], entries[1:]
        assert first["hit"] == 0
        assert all(e["t"] >= first["t_done"] for e in rest)
        assert all(e["hit"] > 0 for e in rest)
    # usage is the provider's: hits for the 12 followers, priced with them
    hits = dict(zip(out["id"], out["prompt_cache_hit_tokens"]))
    assert sum(1 for v in hits.values() if v > 0) == 12
    assert (out["api_cache_hit_tokens"] == out["prompt_cache_hit_tokens"]).all()
    assert (out["prompt_cache_hit_tokens"] + out["prompt_cache_miss_tokens"] == out["prompt_tokens"]).all()
    assert out["provider_request_id"].null_count() == 0 and out["provider_request_id"].n_unique() == 15
    assert not out["usage_counted_locally"].any()
    assert s["this_run"]["backend"] == "openai" and s["this_run"]["remote"]["requests"] == 15
    # never a `user` (it partitions the provider's cache), no key without --api-key-env
    for e in api.log:
        assert "user" not in e["body"] and "user_id" not in e["body"]
        assert "authorization" not in {k.lower() for k in e["headers"]}
        assert e["body"]["model"] == "deepseek-v4-flash"


def test_remote_run_does_not_import_torch(tmp_path):
    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=2)
    with StubAPI() as api:
        code = ("import sys, batchv4.cli; sys.argv=['batchv4','run',%r,'-o',%r,'--backend','openai','--base-url',%r,"
                "'--model','m','--quiet'];\ntry:\n    batchv4.cli.main()\nexcept SystemExit:\n    pass\n"
                "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
                % (str(tmp_path / "in.jsonl"), str(tmp_path / "out"), api.url))
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "NO TORCH", p.stderr[-2000:]
    assert len(outputs(tmp_path)) == 2


def test_thinking_mapped_per_provider(tmp_path):
    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=2)
    with StubAPI() as api:
        run(cfg(tmp_path, [api.url], thinking=True, provider="deepseek"))
        run(cfg(tmp_path, [api.url], thinking=True, provider="vllm", output=str(tmp_path / "out2")))
    ds = [e["body"] for e in api.log[:2]]
    vl = [e["body"] for e in api.log[2:]]
    assert all(b["thinking"] == {"type": "enabled"} and "chat_template_kwargs" not in b for b in ds)
    assert all(b["chat_template_kwargs"]["thinking"] is True and "thinking" not in b for b in vl)
    for name in ("out", "out2"):
        out = outputs(tmp_path, name)
        assert set(out["reasoning"]) == {"thinking about it"}
        assert (out["reasoning_tokens"] == len("thinking about it")).all()


def test_api_key_from_env_only_and_never_written(tmp_path, monkeypatch, caplog):
    secret = "sk-test-5ecret-value-123"
    monkeypatch.setenv("BV4_TEST_KEY", secret)
    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=3)
    with StubAPI() as api:
        run(cfg(tmp_path, [api.url], api_key_env="BV4_TEST_KEY"))
    assert all(e["headers"].get("Authorization") == f"Bearer {secret}" for e in api.log)
    # a provider that echoes the refused key: the error rows carry the message without it
    with caplog.at_level(logging.DEBUG), StubAPI(fail_status=401) as bad:
        run(cfg(tmp_path, [bad.url], api_key_env="BV4_TEST_KEY", output=str(tmp_path / "bad")))
    err = errors(tmp_path, "bad")
    assert len(err) == 3 and all("HTTP 401" in e and "***" in e for e in err["error"])
    assert len(bad.log) == 3                        # 401 is not retried
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert secret.encode() not in fh.read(), f
    assert secret not in caplog.text
    monkeypatch.delenv("BV4_TEST_KEY")
    with pytest.raises(UserError, match="BV4_TEST_KEY"):
        run(cfg(tmp_path, [api.url], api_key_env="BV4_TEST_KEY", output=str(tmp_path / "x")))


def test_several_endpoints_keep_groups_whole(tmp_path):
    write_rows(tmp_path / "in.jsonl", n_docs=4, per_doc=4)
    with StubAPI() as a, StubAPI() as b:
        s = run(cfg(tmp_path, [a.url, b.url]))
    docs_a = {e["body"]["messages"][0]["content"] for e in a.log}
    docs_b = {e["body"]["messages"][0]["content"] for e in b.log}
    assert docs_a and docs_b and not docs_a & docs_b
    assert len(a.log) + len(b.log) == 16 and len(outputs(tmp_path)) == 16
    assert sorted(s["this_run"]["remote"]["requests_by_endpoint"].values()) == [8, 8]


def test_faults_exactly_once_and_bounded_retries(tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", n_docs=4, per_doc=6)
    with StubAPI() as api, FaultProxy(api.url, rate=0.5, seed=3, slow=0.2) as proxy:
        s = run(cfg(tmp_path, [proxy.url], max_retries=3, concurrency=6, request_timeout=5.0))
    out, err = outputs(tmp_path), errors(tmp_path)
    ids = list(out["id"]) + list(err["id"])
    assert sorted(ids) == sorted(r["id"] for r in rows)                  # every row once
    assert set(proxy.injected) == {"429", "500", "503", "slow", "drop"}
    assert max(proxy.attempts.values()) <= 4                              # 1 + max_retries
    # the rows that failed are exactly those whose four attempts all got faults
    failed = {prompt_key({"messages": r["messages"]}) for r in rows if r["id"] in set(err["id"])}
    always = {k for k in proxy.attempts if all(proxy.fault(k, a) not in (None, "slow") for a in range(4))}
    assert failed == always
    assert all("gave up after 4 attempts" in e for e in err["error"])
    assert s["this_run"]["remote"]["retries"] > 0 and s["this_run"]["remote"]["throttled"] > 0


def test_client_error_is_an_error_row_at_once(tmp_path):
    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=2)
    with StubAPI(fail_status=400) as api:
        s = run(cfg(tmp_path, [api.url]))
    assert len(api.log) == 2 and len(errors(tmp_path)) == 2
    assert s["counts"]["error_rows"] == 2


def test_response_without_usage_is_counted_and_flagged(tmp_path):
    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=2)
    with StubAPI(usage=False) as api:
        run(cfg(tmp_path, [api.url]))
    out = outputs(tmp_path)
    assert out["usage_counted_locally"].all()
    from batchv4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for text, n in zip(out["output"], out["completion_tokens"]):
        assert n == len(tok.encode(text))
    assert (out["prompt_cache_hit_tokens"] == 0).all() and (out["prompt_tokens"] > 0).all()


def test_spend_cap_stops_and_a_rerun_finishes(tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", n_docs=3, per_doc=4)
    with StubAPI() as api:
        c = cfg(tmp_path, [api.url], concurrency=1, max_cost_usd=0.0002)
        s = run(c)
        assert s["this_run"]["stopped_by_spend_cap"]
        first = len(outputs(tmp_path))
        assert 0 < first < 12 and s["counts"]["not_sent_rows"] == 12 - first
        s2 = run(cfg(tmp_path, [api.url], concurrency=1))
    assert not s2["this_run"]["stopped_by_spend_cap"]
    out = outputs(tmp_path)
    assert sorted(out["id"]) == sorted(r["id"] for r in rows)
    assert len(api.log) == 12                       # nothing sent twice


def test_off_peak_gate_with_an_injected_clock(tmp_path):
    """Starts at a weekday peak hour; the clock moves with every sleep and 20 minutes per request.
    No request is sent at a peak instant: the first waits for 12:00, sends stop before 14:00 and
    wait for 18:00."""
    from batchv4.accounting.cards import get_card
    from batchv4.accounting.pricing import is_peak
    from batchv4.remote.client import OpenAIBackend

    write_rows(tmp_path / "in.jsonl", n_docs=3, per_doc=3)
    card = get_card("deepseek-v4-flash")
    # 2026-12-02 (Wednesday) 11:50 Beijing: peak until 12:00, off-peak 12:00-14:00
    now = [datetime(2026, 12, 2, 3, 50, tzinfo=timezone.utc)]
    sent_at = []

    def clock():
        return now[0]

    async def sleep(secs):
        now[0] += timedelta(seconds=secs)

    class Backend(OpenAIBackend):
        pass

    with StubAPI() as api:
        b = Backend([api.url], "deepseek-v4-flash", card=card, when="off-peak", clock=clock, sleep=sleep,
                    concurrency=2)
        orig = b.headers

        def headers():
            sent_at.append(now[0])
            now[0] += timedelta(minutes=20)           # each request "takes" 20 minutes of the clock
            return orig()

        b.headers = headers
        s = run(cfg(tmp_path, [api.url], when="off-peak"), llm_factory=lambda c: b)
    assert len(sent_at) == 9 and not any(is_peak(card, t) for t in sent_at)
    assert s["this_run"]["remote"]["off_peak_waits"] >= 2       # before 12:00 and at 14:00
    out = outputs(tmp_path)          # priced when they came back (a request may end after peak began)
    noon = datetime(2026, 12, 2, 4, 0, tzinfo=timezone.utc)
    assert len(out) == 9 and min(out["finished_at"].to_list()) > noon


def test_minute_window_and_adaptive_limit():
    from batchv4.remote.limits import AdaptiveLimit, MinuteWindow, retry_after

    t = [0.0]
    w = MinuteWindow(rpm=2, tpm=100, now=lambda: t[0])
    assert w.delay(10) == 0
    w.take(10)
    w.take(10)
    assert w.delay(10) > 59                          # a third request waits for the window
    t[0] = 61.0
    assert w.delay(90) == 0
    w.take(90)
    assert w.delay(20) > 0                           # 110 tokens would exceed 100
    lim = AdaptiveLimit(16)
    lim.throttled()
    lim.throttled()
    assert lim.current == 4
    for _ in range(200):
        lim.succeeded()
    assert lim.current == 16
    assert retry_after("2") == 2.0 and retry_after(None) is None and retry_after("soon") is None
    asyncio.run(asyncio.sleep(0))


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    rows = write_rows(tmp_path / "in.jsonl", n_docs=4, per_doc=5)
    args = ["--backend", "openai", "--model", "deepseek-v4-flash", "--concurrency", "2", "--part-rows", "2",
            "--quiet"]

    def cmd(url, out):
        return [sys.executable, "-m", "batchv4", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / out),
                "--base-url", url, *args]

    with StubAPI(delay=0.15) as api, StubAPI() as ref_api:
        p = subprocess.Popen(cmd(api.url, "out"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while len(api.log) < 8 and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.kill()
        p.wait()
        assert len(api.log) >= 8
        r = subprocess.run(cmd(api.url, "out"), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        full = subprocess.run(cmd(ref_api.url, "ref"), capture_output=True, text=True, timeout=120)
        assert full.returncode == 0, full.stderr[-2000:]
    got = outputs(tmp_path).sort("id")
    ref = outputs(tmp_path, "ref").sort("id")
    assert got["id"].to_list() == ref["id"].to_list() == sorted(r["id"] for r in rows)
    assert got["output"].to_list() == ref["output"].to_list()
    assert len(errors(tmp_path)) == 0
    with open(tmp_path / "out" / "summary.json") as f:
        s = json.load(f)
    # every request beyond one per row was sent by the killed run and again by the resume; the
    # summary counts them (a request sent in the instant before the kill may miss the journal)
    twice = len(api.log) - len(rows)
    assert twice > 0 and twice - 2 <= s["counts"]["resent_requests"] <= twice
    assert not os.path.exists(tmp_path / "out" / "_batchv4_sent.txt")


def test_structured_outputs_in_request_bodies():
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.engine.scheduler import EngineRequest
    from batchv4.remote.client import _Fatal, request_body
    from batchv4.structured import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    msgs = [{"role": "user", "content": "x"}]

    def body(so, provider):
        req = EngineRequest("r", [1], SamplingParams(max_tokens=4, structured_outputs=so), messages=msgs)
        return request_body(req, 0, "m", provider)

    assert body(StructuredOutputsParams(json=schema), "vllm")["structured_outputs"] == {"json": schema}
    assert body(StructuredOutputsParams(json=schema), "openai")["response_format"]["json_schema"]["schema"] == schema
    assert body(StructuredOutputsParams(json=schema), "deepseek")["response_format"] == {"type": "json_object"}
    assert body(StructuredOutputsParams(regex="a+"), "vllm")["structured_outputs"] == {"regex": "a+"}
    with pytest.raises(_Fatal, match="regex constraints are not supported by the deepseek API"):
        body(StructuredOutputsParams(regex="a+"), "deepseek")


def test_estimate_says_when_the_next_off_peak_window_opens(tmp_path):
    from batchv4.pipelines.estimate import EstimateConfig, estimate

    write_rows(tmp_path / "in.jsonl", n_docs=1, per_doc=2)
    # Wednesday 10:30 Beijing (peak): off-peak from 12:00 Beijing = 04:00 UTC; Saturday: off-peak now
    peak = datetime(2026, 12, 2, 2, 30, tzinfo=timezone.utc)
    res = estimate(EstimateConfig(input=str(tmp_path / "in.jsonl"), start=peak))
    assert res["off_peak"] == {"peak_now": True, "next_off_peak_start": "2026-12-02T04:00:00+00:00"}
    sat = datetime(2026, 12, 5, 2, 30, tzinfo=timezone.utc)
    assert estimate(EstimateConfig(input=str(tmp_path / "in.jsonl"), start=sat))["off_peak"]["peak_now"] is False
