"""`OpenAIBackend`: engine requests sent to OpenAI-compatible chat-completions endpoints (DeepSeek's
API, vLLM, SGLang, `batchv4 serve`), behind the backend protocol of `batchv4.engine.backend`.

Order for the provider's cache: a provider caches a prefix only once a request with it has been
processed, so requests go out in the plan's order, and a request waits until the request that
shares its prefix before it has returned: the one saving its plan snapshot (`resume_key`), and
the first request of its prefix group. The other samples of an n > 1 row are separate requests,
sent once sample 0 has returned (n requests, as an API bills them). No `user` or `user_id` is
ever sent (it partitions the provider's cache). With several endpoints, each prefix group goes to
one endpoint (the one with the fewest prompt tokens assigned so far), so no shared prefix is split.

Pacing and faults: at most `concurrency` requests in flight, halved on every 429 and grown back
on success; optional requests- and tokens-per-minute windows; 429, 5xx, 408, timeouts, dropped
connections and unreadable bodies are retried with exponential backoff and full jitter (a
`Retry-After` header is honoured and pauses every send) up to `max_retries` times, after which the
row fails with the last error; any other 4xx fails the row at once. `max_cost_usd` stops sending
once the priced cost (this job's earlier rows plus what came back) reaches it; `when="off-peak"`
sends only while the price card is off-peak (`accounting.pricing.is_peak`), letting in-flight
requests finish when peak begins and waiting for the next off-peak start.

Usage comes from each response (DeepSeek's `prompt_cache_hit_tokens` or OpenAI's
`prompt_tokens_details.cached_tokens`, reasoning from `completion_tokens_details`); a response
without usage is counted with batchv4's tokenizer and flagged (`counted_locally`).

The API key is held only here, sent only as a bearer header, and scrubbed from every error text.

Threads: the HTTP work runs on an asyncio loop in a background thread; the consumer's thread
pulls requests from the caller's iterator (so the caller's state is touched by one thread only)
and receives outputs, status lines and send notices through one queue.

Owns: request bodies, dispatch order, pacing, retries, usage mapping. Does not own: prices (it
asks `accounting`), rows or files (`pipelines.run`). Never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from batchv4.engine.outputs import CompletionOutput, RequestOutput
from batchv4.errors import UserError
from batchv4.remote.limits import AdaptiveLimit, MinuteWindow, backoff, retry_after

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
PROVIDERS = ("auto", "deepseek", "vllm", "openai")
_DROP_KEYS = ("user", "user_id", "stream", "stream_options", "model", "messages", "n")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def provider_of(base_url: str, provider: str = "auto") -> str:
    """The request dialect: DeepSeek's for api.deepseek.com, vLLM's (which SGLang and `batchv4
    serve` also read) for anything else, unless told."""
    if provider not in PROVIDERS:
        raise UserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider != "auto":
        return provider
    host = (urlsplit(base_url).hostname or "").lower()
    return "deepseek" if host == "deepseek.com" or host.endswith(".deepseek.com") else "vllm"


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--base-url {url!r}: expected http(s)://host[:port]/v1")
    if parts.username or parts.password:
        raise UserError("--base-url must not carry credentials; use --api-key-env")
    return url.rstrip("/")


def request_body(req, sample_index: int, model: str, provider: str) -> dict[str, Any]:
    """The chat-completions body of one sample of an `EngineRequest`."""
    p = req.params
    body: dict[str, Any] = {}
    for k, v in (req.extra_body or {}).items():
        if k not in _DROP_KEYS:
            body[k] = v
    body.update(model=model, messages=req.messages, max_tokens=p.max_tokens, temperature=p.temperature)
    if p.top_p != 1.0:
        body["top_p"] = p.top_p
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed + sample_index
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.logprobs is not None:
        body["logprobs"], body["top_logprobs"] = True, p.logprobs
    if provider == "vllm":      # vLLM's extra sampling keys (SGLang and batchv4 serve read them too)
        for k, default in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0), ("ignore_eos", False)):
            if getattr(p, k) != default:
                body[k] = getattr(p, k)
        if p.stop_token_ids:
            body["stop_token_ids"] = list(p.stop_token_ids)
    so = p.structured_outputs
    if so is not None:
        from batchv4.structured.params import to_response_format

        rf = to_response_format(so)
        if provider == "vllm":      # vLLM's (and batchv4 serve's) structured_outputs take every kind
            body["structured_outputs"] = so.to_dict()
        elif rf is not None:
            # DeepSeek's API takes json_object only: the schema then goes by the prompt, and the
            # output is checked against it (valid)
            body["response_format"] = {"type": "json_object"} if provider == "deepseek" else rf
        else:
            raise _Fatal(f"{so.kind} constraints are not supported by the {provider} API (use --provider vllm)")
    if p.max_thinking_tokens is not None and provider == "vllm":
        body["thinking_token_budget"] = p.max_thinking_tokens
    if provider == "deepseek":
        body["thinking"] = {"type": "enabled" if req.thinking else "disabled"}
    elif provider == "vllm":
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs.update(thinking=bool(req.thinking), enable_thinking=bool(req.thinking))
        body["chat_template_kwargs"] = kwargs
    return body


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None, throttled: bool = False) -> None:
        super().__init__(message)
        self.wait, self.throttled = wait, throttled


class _Fatal(Exception):
    pass


@dataclass
class _Item:
    """One sample of one request, waiting to be sent."""

    req: Any
    sample: int
    tokens: int                 # prompt + max_tokens, for the tokens-per-minute window
    endpoint: int = -1


@dataclass
class _Pending:
    """A request whose samples are being sent."""

    req: Any
    outputs: dict[int, CompletionOutput] = field(default_factory=dict)
    error: str | None = None
    unsent: int = 0


_DONE = object()


class OpenAIBackend:
    """See the module docstring. `clock` (aware datetimes) and `sleep` (an async function) are
    for tests of the off-peak gate; `retry_base`/`retry_cap` are the backoff's seconds."""

    def __init__(self, base_urls: str | Sequence[str], model: str, *, api_key: str | None = None,
                 provider: str = "auto", concurrency: int = 16, max_retries: int = 8, timeout: float = 600.0,
                 rpm: int | None = None, tpm: int | None = None, max_cost_usd: float | None = None,
                 spent_usd: float = 0.0, card=None, when: str = "now", tokenizer=None,
                 clock: Callable[[], datetime] = _utcnow, sleep: Callable[[float], Any] | None = None,
                 retry_base: float = 0.5, retry_cap: float = 30.0, lookahead: int | None = None,
                 seed: int = 0) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise UserError("--base-url is required with --backend openai")
        self.urls = [check_base_url(u) for u in urls]
        self.model = model
        self.providers = [provider_of(u, provider) for u in self.urls]
        self._key = api_key or None
        if concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {max_retries}")
        if when not in ("now", "off-peak"):
            raise UserError(f"--when must be now or off-peak, got {when!r}")
        if when == "off-peak":
            from batchv4.accounting.pricing import time_of_day_windows

            if card is None or not time_of_day_windows(card):
                raise UserError(f"--when off-peak: price card {getattr(card, 'name', None)!r} has no off-peak hours")
        if max_cost_usd is not None and card is None:
            raise UserError("--max-cost-usd needs a price card")
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.rpm, self.tpm = rpm, tpm
        self.max_cost_usd, self.spent_usd, self.card, self.when = max_cost_usd, spent_usd, card, when
        self.tokenizer = tokenizer
        self.clock = clock
        self._sleep = sleep or asyncio.sleep
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.lookahead = lookahead or max(64, 8 * concurrency)
        self._rng = random.Random(seed)
        # set by the caller (run): told in the consumer's thread
        self.on_send: Callable[[str], None] | None = None
        self.on_status: Callable[[str], None] | None = None
        self._stats = {"requests": 0, "attempts": 0, "retries": 0, "throttled": 0, "failed_requests": 0,
                       "usage_counted_locally": 0, "off_peak_waits": 0, "off_peak_wait_seconds": 0.0,
                       "stopped_by_spend_cap": False, "spent_usd": 0.0,
                       "requests_by_endpoint": [0] * len(self.urls), "http_status": {}}

    # ---- the backend protocol -------------------------------------------------------------------
    def stats(self) -> dict:
        s = dict(self._stats)
        s["http_status"] = dict(s["http_status"])
        s["requests_by_endpoint"] = dict(zip(self._public_urls(), s["requests_by_endpoint"]))
        return s

    def _public_urls(self) -> list[str]:
        from batchv4.io.urls import redact_url

        return [redact_url(u) for u in self.urls]

    def generate_stream(self, requests: Iterable) -> Iterator[RequestOutput]:
        """EngineRequests (with `messages`) in plan order -> RequestOutputs as they return. Stopping
        early cancels every request in flight and closes the connections."""
        it = iter(requests)
        out: queue.Queue = queue.Queue()
        loop = asyncio.new_event_loop()
        run = _Run(self, loop, out)
        thread = threading.Thread(target=run.main, name="batchv4-remote", daemon=True)
        thread.start()
        exhausted = False
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                kind, value = item
                if kind == "more":
                    batch = []
                    if not exhausted:
                        for _ in range(value):
                            try:
                                batch.append(next(it))
                            except StopIteration:
                                exhausted = True
                                break
                    loop.call_soon_threadsafe(run.accept, batch, exhausted)
                elif kind == "output":
                    yield value
                elif kind == "sent":
                    if self.on_send is not None:
                        self.on_send(value)
                elif kind == "status":
                    if self.on_status is not None:
                        self.on_status(value)
                elif kind == "error":
                    raise value
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(run.cancel)
                thread.join(timeout=30)

    # ---- helpers used by _Run -------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """`text` without the API key (providers may echo a key they refuse)."""
        if self._key:
            text = text.replace(self._key, "***")
        return text

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h


class _Run:
    """One `generate_stream`: the dispatcher and its tasks, on `loop` in the backend thread."""

    def __init__(self, b: OpenAIBackend, loop: asyncio.AbstractEventLoop, out: queue.Queue) -> None:
        self.b, self.loop, self.out = b, loop, out
        self.pending: deque[_Item] = deque()
        self.requests: dict[str, _Pending] = {}
        self.exhausted = False
        self.asked = False
        self.inflight = 0
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.limit = AdaptiveLimit(b.concurrency)
        self.window = MinuteWindow(b.rpm, b.tpm)
        self.pause_until = 0.0                          # monotonic; a Retry-After pauses every send
        self.saving: dict[object, int] = {}             # snapshot key -> requests saving it not yet back
        self.group_state: dict[object, str] = {}        # group -> "leading" (first sent) | "open"
        self.group_endpoint: dict[object, int] = {}
        self.endpoint_tokens = [0] * len(b.urls)
        self.sample0_back: set[str] = set()
        self.stopped = False
        self.main_task: asyncio.Task | None = None

    # ---- called from the consumer's thread through the loop -------------------------------------
    def accept(self, batch: list, exhausted: bool) -> None:
        self.asked = False
        self.exhausted = exhausted
        for req in batch:
            rid = req.request_id
            if req.messages is None:
                self._finish_error(req, "the remote backend needs the row's messages")
                continue
            n = req.params.n
            self.requests[rid] = _Pending(req, unsent=n)
            tokens = len(req.prompt_token_ids) + req.params.max_tokens
            for s in range(n):
                self.pending.append(_Item(req, s, tokens))
            for sp in req.saves:
                self.saving[sp.key] = self.saving.get(sp.key, 0) + 1
        self.wake.set()

    def cancel(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.main_task is not None:
            self.main_task.cancel()

    # ---- the thread ------------------------------------------------------------------------------
    def main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.main_task = self.loop.create_task(self._dispatch())
            self.loop.run_until_complete(self.main_task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:          # a bug: re-raised in the consumer's thread
            self.out.put(("error", e))
        finally:
            try:
                pending = [t for t in self.tasks if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self.loop.close()
                self.out.put(_DONE)

    def _ask(self) -> None:
        if not self.asked and not self.exhausted:
            self.asked = True
            self.out.put(("more", max(1, self.b.lookahead - len(self.pending))))

    async def _dispatch(self) -> None:
        import httpx

        b = self.b
        limits = httpx.Limits(max_connections=b.concurrency + 4, max_keepalive_connections=b.concurrency + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(b.timeout, connect=min(30.0, b.timeout)),
                                     limits=limits, follow_redirects=False) as client:
            self.client = client
            self._ask()
            while True:
                if len(self.pending) < b.lookahead // 2:
                    self._ask()
                if self.stopped or (self.exhausted and not self.pending):
                    if not self.inflight:
                        break
                    await self._wait()
                    continue
                if b.max_cost_usd is not None and b.spent_usd >= b.max_cost_usd:
                    self._stop_for_cap()
                    continue
                if b.when == "off-peak" and await self._gate_off_peak():
                    continue
                item = self._pick() if self.inflight < self.limit.current else None
                if item is None:
                    await self._wait()
                    continue
                wait = max(self.window.delay(item.tokens), self.pause_until - time.monotonic())
                if wait > 0:
                    await self._wait(wait)
                    continue
                self.window.take(item.tokens)
                self._send(item)
        if not self.stopped:
            # every accepted request ends in an output: one that never came back is an error row
            for rid, p in list(self.requests.items()):
                del self.requests[rid]
                self.out.put(("output", RequestOutput.error(rid, p.req.prompt_token_ids,
                                                            p.error or "the request was not answered", n=p.req.params.n)))

    async def _wait(self, timeout: float | None = None) -> None:
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _stop_for_cap(self) -> None:
        b = self.b
        self.stopped = True
        b._stats["stopped_by_spend_cap"] = True
        left = len({i.req.request_id for i in self.pending})
        self.out.put(("status", f"spend cap ${b.max_cost_usd:g} reached: {left:,}+ requests left for a later run"))
        log.warning("spend cap of $%g reached ($%.4f priced): no more requests are sent; run the same command "
                    "again (with a higher --max-cost-usd) to finish", b.max_cost_usd, b.spent_usd)

    async def _gate_off_peak(self) -> bool:
        """True when it waited (peak): nothing new is sent until the next off-peak start."""
        from batchv4.accounting.pricing import is_peak, next_off_peak

        b = self.b
        now = b.clock()
        if not is_peak(b.card, now):
            return False
        until = next_off_peak(b.card, now)
        if self.inflight:             # let them finish first; then wait
            await self._wait(1.0)
            return True
        secs = (until - now).total_seconds()
        msg = f"waiting for off-peak until {until.isoformat(timespec='minutes')}"
        self.out.put(("status", msg))
        log.info("%s (%.0f s)", msg, secs)
        b._stats["off_peak_waits"] += 1
        b._stats["off_peak_wait_seconds"] += secs
        # sleep in slices so a cancel (consumer stopped) is prompt with the real clock
        while secs > 0:
            step = min(secs, 60.0)
            await b._sleep(step)
            secs = (until - b.clock()).total_seconds()
        self.out.put(("status", "generate"))
        return True

    def _pick(self) -> _Item | None:
        """The first waiting sample that may go now (see the module docstring)."""
        for item in self.pending:
            req = item.req
            if item.sample > 0 and req.request_id not in self.sample0_back:
                continue
            key = req.resume_key
            if key is not None and self.saving.get(key, 0) > 0 and item.sample == 0:
                continue
            g = req.group
            if g is not None and item.sample == 0:
                st = self.group_state.get(g)
                if st == "leading":
                    continue
                if st is None:
                    self.group_state[g] = "leading"
            self.pending.remove(item)
            return item
        return None

    def _endpoint(self, item: _Item) -> int:
        g = item.req.group
        key = ("group", g) if g is not None else ("request", item.req.request_id)
        e = self.group_endpoint.get(key)
        if e is None:
            e = min(range(len(self.endpoint_tokens)), key=lambda i: self.endpoint_tokens[i])
            self.group_endpoint[key] = e
        self.endpoint_tokens[e] += item.tokens
        return e

    def _send(self, item: _Item) -> None:
        item.endpoint = self._endpoint(item)
        self.inflight += 1
        self.b._stats["requests"] += 1
        self.b._stats["requests_by_endpoint"][item.endpoint] += 1
        self.out.put(("sent", item.req.request_id))
        task = self.loop.create_task(self._attempts(item))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _attempts(self, item: _Item) -> None:
        b = self.b
        last = "no attempt"
        result: CompletionOutput | None = None
        try:
            for attempt in range(b.max_retries + 1):
                if attempt:
                    b._stats["retries"] += 1
                try:
                    result = await self._once(item)
                    self.limit.succeeded()
                    break
                except _Fatal as e:
                    last = str(e)
                    break
                except _Retryable as e:
                    last = str(e)
                    if e.throttled:
                        self.limit.throttled()
                        b._stats["throttled"] += 1
                    if attempt == b.max_retries:
                        last = f"{last} (gave up after {attempt + 1} attempts)"
                        break
                    delay = e.wait if e.wait is not None else backoff(attempt, b.retry_base, b.retry_cap, b._rng)
                    if e.wait is not None:
                        self.pause_until = max(self.pause_until, time.monotonic() + e.wait)
                    await asyncio.sleep(delay)
                except Exception as e:      # an unexpected reply or a bug: the row fails with it, never vanishes
                    last = f"unexpected error: {type(e).__name__}: {e}"
                    log.warning("request %s: %s", item.req.request_id, b.scrub(last))
                    break
        finally:
            self.inflight -= 1
            self.wake.set()
        self._settle(item, result, b.scrub(last))

    async def _once(self, item: _Item) -> CompletionOutput:
        import httpx

        b = self.b
        url = b.urls[item.endpoint] + "/chat/completions"
        body = request_body(item.req, item.sample, b.model, b.providers[item.endpoint])     # _Fatal if unsendable
        b._stats["attempts"] += 1
        t0 = time.perf_counter()
        try:
            resp = await self.client.post(url, content=json.dumps(body, ensure_ascii=False).encode(),
                                          headers=b.headers())
            raw = resp.content
        except httpx.TimeoutException as e:
            raise _Retryable(f"timed out ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:        # any other failure of the exchange (a body cut mid-stream, ...)
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        st = b._stats["http_status"]
        st[resp.status_code] = st.get(resp.status_code, 0) + 1
        if resp.status_code != 200:
            msg = f"HTTP {resp.status_code}: {_error_message(raw)}"
            if resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                wait = retry_after(resp.headers.get("retry-after"))
                raise _Retryable(msg, wait, throttled=resp.status_code == 429)
            raise _Fatal(msg)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable("unreadable response body") from None
        return self._completion(item, data, choice, message, time.perf_counter() - t0, resp.headers)

    def _completion(self, item: _Item, data: dict, choice: dict, message: dict, seconds: float,
                    headers) -> CompletionOutput:
        b = self.b
        text = message.get("content") or ""
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = message.get("reasoning")
        tool_calls = message.get("tool_calls")
        if tool_calls and not text:
            text = json.dumps(tool_calls, ensure_ascii=False)
        finish = choice.get("finish_reason") or "stop"
        if finish not in ("stop", "length", "tool_calls", "content_filter"):
            finish = "stop"
        usage = _usage(data.get("usage"))
        if usage is None:
            usage = self._count_locally(item, text, reasoning)
            b._stats["usage_counted_locally"] += 1
        usage.update(finished_at=b.clock(), model=data.get("model") or b.model,
                     provider_request_id=data.get("id") or headers.get("x-request-id"), seconds=seconds)
        if item.req.thinking and reasoning is None:
            reasoning = ""
        return CompletionOutput(index=item.sample, text=text, token_ids=[], finish_reason=finish,
                                reasoning_text=reasoning if item.req.thinking or reasoning else None,
                                num_reasoning_tokens=usage["reasoning_tokens"], usage=usage)

    def _count_locally(self, item: _Item, text: str, reasoning: str | None) -> dict:
        tok = self.b.tokenizer
        n_out = len(tok.encode(text)) if tok is not None else 0
        n_reason = len(tok.encode(reasoning)) if tok is not None and reasoning else 0
        return {"prompt_tokens": len(item.req.prompt_token_ids), "prompt_cache_hit_tokens": 0,
                "completion_tokens": n_out + n_reason, "reasoning_tokens": n_reason, "counted_locally": True}

    # ---- results ---------------------------------------------------------------------------------
    def _settle(self, item: _Item, result: CompletionOutput | None, error: str) -> None:
        req = item.req
        rid = req.request_id
        p = self.requests.get(rid)
        if item.sample == 0:
            self.sample0_back.add(rid)
            for sp in req.saves:
                self.saving[sp.key] = self.saving.get(sp.key, 1) - 1
            if req.group is not None:
                self.group_state[req.group] = "open"
        if p is None:
            return
        p.unsent -= 1
        if result is None:
            p.error = p.error or error
        else:
            p.outputs[item.sample] = result
            self._spend(result)
        if item.sample == 0 and p.error is not None:
            # the other samples are not sent: the row fails as a whole
            n_dropped = sum(1 for i in self.pending if i.req.request_id == rid)
            self.pending = deque(i for i in self.pending if i.req.request_id != rid)
            p.unsent -= n_dropped
        if p.unsent == 0:
            del self.requests[rid]
            self.sample0_back.discard(rid)
            if p.error is not None:
                self.b._stats["failed_requests"] += 1
                self.out.put(("output", RequestOutput.error(rid, req.prompt_token_ids, p.error, n=req.params.n)))
            else:
                outs = [p.outputs[i] for i in range(req.params.n)]
                first = outs[0].usage
                self.out.put(("output", RequestOutput(rid, list(req.prompt_token_ids),
                                                      first["prompt_cache_hit_tokens"], outs,
                                                      metrics={"remote": True})))
        self.wake.set()

    def _finish_error(self, req, message: str) -> None:
        self.out.put(("output", RequestOutput.error(req.request_id, req.prompt_token_ids, message, n=req.params.n)))

    def _spend(self, c: CompletionOutput) -> None:
        b = self.b
        if b.card is None:
            return
        from batchv4.accounting.pricing import price_row

        u = c.usage
        hit = u["prompt_cache_hit_tokens"]
        cost = price_row({"prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": u["prompt_tokens"] - hit,
                          "completion_tokens": u["completion_tokens"], "reasoning_tokens": u["reasoning_tokens"]},
                         b.card, u["finished_at"])
        if cost is not None:
            b.spent_usd += cost
            b._stats["spent_usd"] += cost


def _error_message(raw: bytes) -> str:
    """The provider's error message (OpenAI's `{"error": {"message": ...}}`), else the body's start."""
    try:
        data = json.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return " ".join(str(err["message"]).split())[:500]
        if isinstance(err, str):
            return " ".join(err.split())[:500]
        if isinstance(data, dict) and data.get("detail"):
            return " ".join(str(data["detail"]).split())[:500]
    except (ValueError, AttributeError):
        pass
    return " ".join(raw[:300].decode("utf-8", "replace").split()) or "(empty body)"


def _usage(u: Any) -> dict | None:
    """A response's usage in batchv4's names, or None when it has none usable."""
    if not isinstance(u, dict):
        return None
    try:
        prompt = int(u["prompt_tokens"])
        completion = int(u.get("completion_tokens") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    hit = u.get("prompt_cache_hit_tokens")
    if hit is None:
        hit = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    hit = max(0, min(int(hit), prompt))
    return {"prompt_tokens": prompt, "prompt_cache_hit_tokens": hit, "completion_tokens": completion,
            "reasoning_tokens": min(int(reasoning), completion), "counted_locally": False}
