"""The server's HTTP side: a FastAPI app (`create_app`) over one `EngineLoop`.

Owns: routes (/health, /v1/models, /v1/stats, /v1/chat/completions, /v1/completions), bearer-key
checks, the body size limit, OpenAI-style error responses for every failure (validation errors are
400, never FastAPI's 422), turning a request into engine jobs (tokenizing in a worker thread),
moving the engine thread's events onto per-request asyncio queues, server-sent events, and aborting
the jobs of a client that went away. Does not own: the OpenAI formats (`protocol`), the engine
thread (`engine_loop`), the snapshot policy (`prefix_cache`), the process or the port (`cmd`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchv4.errors import UserError
from batchv4.serve import protocol as P
from batchv4.serve.engine_loop import EngineLoop, Job, NotReady, QueueFull

MAX_BODY_BYTES = 32 * 2**20
COMPLETIONS_MAX_TOKENS = 16        # the legacy completions API's default (OpenAI's and vLLM's)


def _error(e: P.ApiError, request_id: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _json_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends (a client that went away
    before the first chunk included)."""

    def __init__(self, content, on_close, **kw) -> None:
        super().__init__(content, media_type="text/event-stream", **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def create_app(engine: EngineLoop, served_model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int = 4096) -> FastAPI:
    app = FastAPI(title="batchv4", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    key = api_key.encode() if api_key else None

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, e: P.ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(P.ApiError(400, f"{loc}: {first.get('msg', 'invalid request')}", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(P.ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        import logging

        logging.getLogger(__name__).exception("unexpected error serving %s", request.url.path)
        return _error(P.ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    def _auth(request: Request) -> None:
        if key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            msg = "Incorrect API key provided." if h else "Missing bearer token (Authorization header)."
            raise P.ApiError(401, msg, code="invalid_api_key")

    def _ready():
        if engine.state == "ready":
            return engine.llm
        if engine.state == "failed":
            raise P.ApiError(503, f"the engine failed to start: {engine.error}", type="server_error",
                             code="engine_failed")
        raise P.ApiError(503, "the engine is still loading; retry shortly", type="server_error",
                         code="engine_loading")

    async def _body(request: Request) -> dict:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > max_body_bytes:
            raise P.ApiError(413, f"request body of {n} bytes is over the limit of {max_body_bytes}",
                             code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise P.ApiError(413, f"request body is over the limit of {max_body_bytes} bytes",
                                 code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise P.ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != served_model_name:
            raise P.ApiError(404, f"The model `{m}` does not exist (this server serves `{served_model_name}`).",
                             param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if engine.state != "ready":
            _ready()
        return {"status": "ok", **engine.stats()}

    def _model_card() -> dict:
        card = {"id": served_model_name, "object": "model", "created": started, "owned_by": "batchv4"}
        if engine.state == "ready":
            card["max_model_len"] = engine.llm.max_model_len
        return card

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(request)
        _model({"model": model_id})
        return _model_card()

    @app.get("/v1/stats")
    async def stats(request: Request):
        _auth(request)
        _ready()
        return engine.engine_stats()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _auth(request)
        body = await _body(request)
        llm = _ready()
        _model(body)
        P.check_supported(body, chat=True)
        if "messages" not in body:
            raise P.ApiError(400, "messages: required", param="messages")
        thinking = P.thinking_enabled(body)
        effort = P.reasoning_effort(body) if thinking else None
        overrides = P.sampling_overrides(body)

        def encode():
            from batchv4.tokenizer import normalize_messages

            msgs = normalize_messages(body["messages"])
            ids = llm.tokenizer.chat_token_ids([msgs], thinking, effort, normalized=True)[0]
            return ids, engine.policy.candidates(ids, include_end=not thinking)

        try:
            ids, cands = await run_in_threadpool(encode)
        except UserError as e:
            raise P.bad_request(e, body) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        params = _params(llm, overrides, ids, "messages", default_max_tokens)
        return await _serve(request, body, rid, True, [(rid, ids, cands)], params, thinking)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _auth(request)
        body = await _body(request)
        llm = _ready()
        _model(body)
        P.check_supported(body, chat=False)
        prompts = P.prompts(body)
        overrides = P.sampling_overrides(body)

        encoded = await run_in_threadpool(lambda: [llm.tokenizer.encode(p) if isinstance(p, str) else p
                                                   for p in prompts])
        # one max_tokens for all prompts: the longest prompt decides a default cut to the context
        params = _params(llm, overrides, max(encoded, key=len), "prompt", COMPLETIONS_MAX_TOKENS)
        for ids in encoded:
            _params(llm, dict(overrides, max_tokens=params.max_tokens), ids, "prompt", COMPLETIONS_MAX_TOKENS)
        cands = await run_in_threadpool(lambda: [engine.policy.candidates(ids) for ids in encoded])
        rid = f"cmpl-{uuid.uuid4().hex}"
        items = [(rid if len(encoded) == 1 else f"{rid}-{i}", ids, c) for i, (ids, c) in enumerate(zip(encoded, cands))]
        return await _serve(request, body, rid, False, items, params, False)

    def _params(llm, overrides: dict, ids: list[int], what: str, default: int):
        from batchv4.engine.sampling_params import SamplingParams
        from batchv4.engine.scheduler import EngineRequest

        m = P.max_tokens_for(overrides, len(ids), llm.max_model_len, default, what)
        try:
            params = SamplingParams(**dict(overrides, max_tokens=m))
        except UserError as e:
            raise P.bad_request(e) from None
        err = llm.check_request(EngineRequest("", ids, params))
        if err:
            raise P.ApiError(400, f"{what}: {err}", param=what)
        if not llm.cache.fits_alone(len(ids) + m):
            raise P.ApiError(400, f"{len(ids)} tokens in the {what} plus max_tokens {m} do not fit in the "
                                  f"KV-cache memory of this server (--kv-cache-memory) even alone",
                             param=what, code="context_length_exceeded")
        return params

    async def _serve(request: Request, body: dict, rid: str, is_chat: bool, items: list, params, thinking: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = bool(body.get("stream"))

        def sink_for(i: int):
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        jobs = [Job(eid, ids, params, thinking, cands, stream, sink_for(i))
                for i, (eid, ids, cands) in enumerate(items)]
        try:
            engine.submit(jobs)
        except QueueFull:
            return _error(P.ApiError(429, f"the server has {engine.max_queue} requests in flight (--max-queue); "
                                          "retry later", type="rate_limit_error", code="queue_full"), rid)
        except NotReady:
            return _error(P.ApiError(503, "the engine is not ready", type="server_error", code="engine_loading"), rid)
        open_jobs = {j.request_id for j in jobs}

        def abort_open() -> None:
            for jid in list(open_jobs):
                engine.abort(jid)
            open_jobs.clear()

        k = params.logprobs
        created = int(time.time())
        n = params.n
        if stream:
            opts = body.get("stream_options") or {}
            fmt = P.StreamFormat(rid, created, served_model_name, is_chat, engine.llm.tokenizer, k,
                                 bool(isinstance(opts, dict) and opts.get("include_usage")))
            return _EventStream(_events(fmt, queue, jobs, open_jobs, n, thinking), abort_open,
                                headers={"x-request-id": rid, "cache-control": "no-cache"})
        try:
            outs = await _collect(request, queue, jobs, open_jobs)
        finally:
            abort_open()
        if isinstance(outs, P.ApiError):
            return _error(outs, rid)
        tok = engine.llm.tokenizer
        if is_chat:
            resp = P.chat_response(rid, created, served_model_name, outs[0], thinking, tok, k)
        else:
            resp = P.completion_response(rid, created, served_model_name, outs, n, tok, k)
        return JSONResponse(resp, headers={"x-request-id": rid})

    async def _collect(request: Request, queue: asyncio.Queue, jobs: list, open_jobs: set):
        outs: list = [None] * len(jobs)
        gone = asyncio.ensure_future(_disconnected(request))
        get = None
        try:
            while open_jobs:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    return P.ApiError(499, "client closed the request")
                i, ev = get.result()
                if ev[0] == "done":
                    outs[i] = ev[1]
                    open_jobs.discard(jobs[i].request_id)
                elif ev[0] == "error":
                    open_jobs.discard(jobs[i].request_id)
                    return P.ApiError(500, ev[1], type="server_error")
            return outs
        finally:
            gone.cancel()
            if get is not None:
                get.cancel()

    async def _events(fmt: P.StreamFormat, queue: asyncio.Queue, jobs: list, open_jobs: set, n: int,
                      thinking: bool):
        states = {}
        for i in range(len(jobs)):
            for s in range(n):
                states[i * n + s] = P.ChoiceStream(thinking)
                if fmt.chat:
                    yield _json_line(fmt.first(i * n + s))
        outs: list = [None] * len(jobs)
        while open_jobs:
            i, ev = await queue.get()
            if ev[0] == "delta":
                _, s, text, finish, new = ev
                idx = i * n + s
                for chunk in fmt.delta(idx, states[idx], text, finish, new):
                    yield _json_line(chunk)
            elif ev[0] == "done":
                outs[i] = ev[1]
                open_jobs.discard(jobs[i].request_id)
            else:
                open_jobs.discard(jobs[i].request_id)
                yield _json_line(P.ApiError(500, ev[1], type="server_error").body())
                yield "data: [DONE]\n\n"
                return
        if fmt.include_usage:
            yield _json_line(fmt.usage_chunk(outs))
        yield "data: [DONE]\n\n"

    return app
