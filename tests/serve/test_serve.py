"""`batchv4 serve` end to end: one real server process on loopback (the tiny preset) for the
module, driven with the official `openai` client and raw httpx: chat and completions, streamed and
not, usage, prefix-cache hits across requests, thinking mode, errors and their statuses, client
disconnects freeing the engine, and concurrent requests."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import start_server  # noqa: E402

from batchv4.tokenizer import load_tokenizer, split_reasoning  # noqa: E402

KEY = "test-key-" + uuid.uuid4().hex
MODEL = "tiny-served"
MAX_MODEL_LEN = 4096


def _build_local():
    import torch

    from batchv4 import LLM

    torch.set_num_threads(1)         # the server's process has the other core
    return LLM("tiny", seed=0)


@pytest.fixture(scope="module")
def _local_building():
    """The in-process engine, built while the server starts."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_build_local)


@pytest.fixture(scope="module")
def base_url(_local_building):
    with start_server("--served-model-name", MODEL, "--api-key-env", "BATCHV4_SERVE_TEST_KEY",
                      "--max-model-len", str(MAX_MODEL_LEN), env={"BATCHV4_SERVE_TEST_KEY": KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(_local_building):
    """The same engine in-process (same preset and seed): the server must answer as it does."""
    return _local_building.result()


def msgs(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 8, "temperature": 0, **kw})


def stream_chat(client, messages, **kw):
    """(content, reasoning, finish reasons by index, usage, chunks) of a streamed chat request."""
    content, reasoning, finish, usage, chunks = {}, {}, {}, None, []
    with chat(client, messages, stream=True, stream_options={"include_usage": True}, **kw) as s:
        for ch in s:
            chunks.append(ch)
            if ch.usage is not None:
                usage = ch.usage
            for c in ch.choices:
                content[c.index] = content.get(c.index, "") + (c.delta.content or "")
                reasoning[c.index] = reasoning.get(c.index, "") + (getattr(c.delta, "reasoning_content", None) or "")
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
    return content, reasoning, finish, usage, chunks


def check_usage(u):
    d = u.model_dump()
    assert d["prompt_cache_hit_tokens"] + d["prompt_cache_miss_tokens"] == d["prompt_tokens"]
    assert d["prompt_tokens_details"]["cached_tokens"] == d["prompt_cache_hit_tokens"]
    assert d["total_tokens"] == d["prompt_tokens"] + d["completion_tokens"]
    assert 0 <= d["completion_tokens_details"]["reasoning_tokens"] <= d["completion_tokens"]
    return d


def engine_idle(http, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        h = http.get("/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["seqs_held"] == 0 and h["seq_pages"] == 0 \
                and h["requests"] == 0:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {h}")
        time.sleep(0.05)


# ---- the happy paths ----------------------------------------------------------------------------
def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert http.get("/v1/stats").json()["steps"] >= 0


def test_chat_streamed_equals_not_streamed_and_ids(client, http):
    m = msgs(f"stream test {uuid.uuid4().hex}")
    full = chat(client, m)
    assert full.object == "chat.completion" and full.model == MODEL and full.id.startswith("chatcmpl-")
    assert full.choices[0].finish_reason == "length" and full.choices[0].message.role == "assistant"
    content, _, finish, usage, chunks = stream_chat(client, m)
    assert content[0] == full.choices[0].message.content and finish == {0: "length"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id != full.id
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens == 8
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": m, "max_tokens": 2})
    assert r.headers["x-request-id"] == r.json()["id"]
    # a stop string: what streaming sent never has to be taken back
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = chat(client, m, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    content, _, finish, _, _ = stream_chat(client, m, stop=[stop])
    assert content[0] == cut.choices[0].message.content and finish == {0: "stop"}


def test_completions_streamed_equals_not_streamed(client):
    p = f"Once upon a time {uuid.uuid4().hex}"
    full = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    text, finish = "", None
    for ch in client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True):
        text += ch.choices[0].text
        finish = ch.choices[0].finish_reason or finish
    assert text == full.choices[0].text and finish == full.choices[0].finish_reason == "length"
    # several prompts (strings, token ids): one choice per prompt, usage counts every prompt
    many = client.completions.create(model=MODEL, prompt=[p, "another one"], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert full.choices[0].text.startswith(many.choices[0].text)
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert check_usage(ids.usage)["prompt_tokens"] == 4
    tok = load_tokenizer()
    assert check_usage(many.usage)["prompt_tokens"] == len(tok.encode(p)) + len(tok.encode("another one"))


def test_usage_and_prefix_cache_hits_for_a_shared_system_prompt(client, local):
    system = " ".join(f"rule{i} {uuid.uuid4().hex[:6]}" for i in range(60))     # ~300 tokens: > 2 units
    first = chat(client, msgs("first question", system), max_tokens=2)
    second = chat(client, msgs("a second, different question", system), max_tokens=2)
    u1, u2 = check_usage(first.usage), check_usage(second.usage)
    assert u1["prompt_cache_hit_tokens"] == 0
    ids = local.tokenizer.chat_token_ids([msgs("a second, different question", system)], False)[0]
    assert u2["prompt_tokens"] == len(ids)
    # the hit is the snapshot at the end of the system prompt, just before the user turn
    assert u2["prompt_cache_hit_tokens"] == ids.index(local.tokenizer.user_id) > 128
    # the same request again: the snapshot at the prompt's end, with its logits
    again = chat(client, msgs("a second, different question", system), max_tokens=2)
    assert again.usage.prompt_cache_hit_tokens == len(ids)
    assert again.choices[0].message.content == second.choices[0].message.content


def test_greedy_output_equals_the_in_process_engine(client, local):
    from batchv4 import SamplingParams

    m = msgs("What is the capital of France?", "You are terse.")
    want = local.chat(m, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    got = chat(client, m)
    assert got.choices[0].message.content == want.text and got.usage.completion_tokens == len(want.token_ids)


def test_thinking_mode_returns_reasoning_content(client, local):
    from batchv4 import SamplingParams

    m = msgs("Think about 2 + 2.")
    want = local.chat(m, SamplingParams(temperature=0, max_tokens=10), thinking=True)[0].outputs[0]
    for switch in ({"thinking": {"type": "enabled"}}, {"chat_template_kwargs": {"thinking": True}},
                   {"chat_template_kwargs": {"enable_thinking": True}}):
        got = chat(client, m, max_tokens=10, extra_body=switch)
        msg = got.choices[0].message
        assert msg.reasoning_content == msg.reasoning == want.reasoning_text and msg.content == want.text
        u = check_usage(got.usage)
        assert u["completion_tokens_details"]["reasoning_tokens"] == want.num_reasoning_tokens
    content, reasoning, _, usage, _ = stream_chat(client, m, max_tokens=10, extra_body=switch)
    assert (reasoning[0], content[0]) == (msg.reasoning_content, msg.content)
    assert split_reasoning(reasoning[0] + ("</think>" + content[0] if content[0] else ""), True)[0] == reasoning[0]
    assert usage.completion_tokens_details.reasoning_tokens == want.num_reasoning_tokens
    # without a switch: no reasoning fields
    plain = chat(client, m, max_tokens=2)
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


def test_n_samples_and_logprobs(client):
    m = msgs(f"n test {uuid.uuid4().hex}")
    r = chat(client, m, n=2, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content
    single = chat(client, m, max_tokens=4)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens          # the prompt counted once
    assert r.usage.completion_tokens == 2 * single.usage.completion_tokens
    content, _, finish, usage, _ = stream_chat(client, m, n=2, max_tokens=4)
    assert content == {0: r.choices[0].message.content, 1: r.choices[1].message.content}
    assert finish == {0: "length", 1: "length"} and usage.completion_tokens == r.usage.completion_tokens
    lp = chat(client, m, max_tokens=3, logprobs=True, top_logprobs=2)
    toks = lp.choices[0].logprobs.content
    assert len(toks) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in toks)
    assert "".join(t.token for t in toks) == lp.choices[0].message.content


# ---- errors -------------------------------------------------------------------------------------
def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_validation_errors_are_400(client, http):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, msgs("x"), temperature=-1)
    assert "temperature" in str(ei.value)
    e = error_of(http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                           headers={"content-type": "application/json"}), 400)
    assert "JSON" in e["message"]
    e = error_of(http.post("/v1/chat/completions", json={"model": MODEL}), 400)     # not FastAPI's 422
    assert e["param"] == "messages"
    bad_role = [{"role": "bot", "content": "x"}]
    error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": bad_role}), 400)
    error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": []}), 400)
    assert "outside the vocabulary" in error_of(http.post("/v1/completions", json={"prompt": [2**40]}), 400)["message"]


def test_unknown_model_and_route_are_404(client, http):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-unknown", messages=msgs("x"), max_tokens=2)
    assert error_of(http.get("/v1/nothing-here"), 404)["code"] == "not_found"


def test_context_exceeded_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, msgs("hello"), max_tokens=MAX_MODEL_LEN)
    assert "maximum context length" in str(ei.value)


def test_tools_are_400(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, msgs("x"), tools=tools)
    assert "tools are not supported" in str(ei.value)


def test_structured_outputs(client):
    """OpenAI's response_format and vLLM's structured_outputs constrain the local engine's output."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = chat(client, msgs("a number"), max_tokens=20, temperature=0.9, seed=3,
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert 1 <= json.loads(r.choices[0].message.content)["n"] <= 9 and r.choices[0].finish_reason == "stop"
    r = chat(client, msgs("pick"), max_tokens=10, extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert r.choices[0].message.content in ("red", "blue")
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, msgs("x"), extra_body={"structured_outputs": {"regex": "(a|b"}})
    assert "regex" in str(ei.value)


def test_api_key_is_required(base_url, http):
    bad = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.models.list()
    assert KEY not in str(ei.value)
    error_of(httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs("x")}), 401)


def test_a_missing_api_key_variable_is_a_one_line_startup_error():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "BATCHV4_SERVE_UNSET_KEY"}
    r = subprocess.run([sys.executable, "-m", "batchv4", "serve", "--model", "tiny", "--port", "0",
                        "--api-key-env", "BATCHV4_SERVE_UNSET_KEY"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "Error: --api-key-env BATCHV4_SERVE_UNSET_KEY: the environment variable is not set or empty"]


def test_a_body_over_the_limit_is_413(http):
    error_of(http.post("/v1/completions", content=b" " * (33 * 2**20), headers={"content-type": "application/json"}),
             413)


# ---- the engine under clients -------------------------------------------------------------------
def test_a_client_that_goes_away_frees_its_request(client, http):
    engine_idle(http)
    with chat(client, msgs(f"a long one {uuid.uuid4().hex}"), max_tokens=2000, stream=True,
              extra_body={"ignore_eos": True}) as s:
        next(iter(s))
        next(iter(s))
    h = engine_idle(http)                  # its sequence, pages and slot are free; snapshots may stay
    assert h["slots_in_use"] == h["snapshots_held"]
    # not streamed: the client times out and closes the connection
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/chat/completions", timeout=1.0,
                  json={"model": MODEL, "messages": msgs(f"another {uuid.uuid4().hex}"), "max_tokens": 2000,
                        "ignore_eos": True})
    engine_idle(http)


def test_concurrent_requests_give_the_same_greedy_text_as_one_at_a_time(client):
    tag = uuid.uuid4().hex[:8]
    convs = [msgs(f"request {i} of {tag}: say something about the number {i}") for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda m: chat(client, m, max_tokens=3).choices[0].message.content, convs))
    alone = [chat(client, m, max_tokens=3).choices[0].message.content for m in convs]
    # (a 3-token greedy output of the random model can decode to "": incomplete UTF-8 is held back)
    assert together == alone and sum(map(bool, together)) >= len(together) // 2


def test_the_queue_limit():
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.serve.engine_loop import EngineLoop, Job, QueueFull

    loop = EngineLoop(build=None, max_queue=2)
    loop.ready.set()                       # no engine thread: submit only queues
    job = Job("a", [1, 2], SamplingParams(), False, None, False, lambda ev: None)
    loop.submit([job, job])
    with pytest.raises(QueueFull):
        loop.submit([job])
    assert loop.stats()["requests"] == 2


class StubEngine:
    """What `create_app` uses of an EngineLoop, with a chosen state and a full queue."""

    max_queue = 1
    error = None
    policy = None

    def __init__(self, state, llm=None):
        from batchv4.serve.prefix_cache import PrefixPolicy

        self.state, self.llm = state, llm
        if llm is not None:
            self.policy = PrefixPolicy.for_tokenizer(llm.tokenizer)

    def submit(self, jobs):
        from batchv4.serve.engine_loop import QueueFull

        raise QueueFull()

    def stats(self):
        return {}


def test_loading_is_503_and_a_full_queue_is_429(local):
    from starlette.testclient import TestClient

    from batchv4.serve.app import create_app

    body = {"model": MODEL, "messages": msgs("x"), "max_tokens": 2}
    with TestClient(create_app(StubEngine("loading"), MODEL)) as c:
        assert error_of(c.get("/health"), 503)["code"] == "engine_loading"
        error_of(c.post("/v1/chat/completions", json=body), 503)
    with TestClient(create_app(StubEngine("ready", local), MODEL)) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert error_of(r, 429)["code"] == "queue_full" and r.headers["x-request-id"].startswith("chatcmpl-")
