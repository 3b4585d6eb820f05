"""Support for the remote-backend tests (not a test module): real HTTP servers on loopback.

`StubAPI` is a small OpenAI-compatible chat-completions server with DeepSeek's cache semantics:
a request's prompt (its messages' text, one "token" per character) hits the cache for the whole
64-character units it shares with the prompt of a request that had already been answered when it
arrived. It answers `echo: <last user message>` and records every request it got (time, body,
headers). `FaultProxy` forwards to any upstream (the stub or `batchv4 serve`) and injects faults
chosen per (prompt, attempt) by a seeded rule: 429 with Retry-After, 500, 503, slow answers, and
connections dropped in the middle of the body; it counts attempts per prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UNIT = 64


def prompt_text(body: dict) -> str:
    return "".join(f"<{m.get('role')}>{m.get('content')}" for m in body.get("messages", []))


def prompt_key(body: dict) -> str:
    return hashlib.sha256(prompt_text(body).encode()).hexdigest()[:16]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class StubAPI(_Base):
    def __init__(self, delay: float = 0.0, usage: bool = True, fail_status: int | None = None,
                 fail_when=None) -> None:
        """`fail_status`: every request gets it; `fail_when(prompt text)`: only the requests it is
        true for (with `fail_status`, default 400)."""
        self.delay, self.usage, self.fail_status, self.fail_when = delay, usage, fail_status, fail_when
        self.lock = threading.Lock()
        self.answered: list[str] = []     # prompts of answered requests
        self.log: list[dict] = []         # {"t", "t_done", "id", "body", "headers", "hit"}
        super().__init__()

    def hit_for(self, text: str) -> int:
        best = 0
        for old in self.answered:
            n = 0
            for a, b in zip(old, text):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(text) - 1) // UNIT * UNIT

    def _handler(self):
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(n))
                text = prompt_text(body)
                with stub.lock:
                    hit = stub.hit_for(text)
                    entry = {"t": time.time(), "body": body, "headers": dict(self.headers), "hit": hit}
                    stub.log.append(entry)
                    rid = entry["id"] = f"stub-{len(stub.log)}"
                if stub.delay:
                    time.sleep(stub.delay)
                failing = stub.fail_when(text) if stub.fail_when is not None else stub.fail_status is not None
                if failing:                          # echoes the key it was sent, as some providers do
                    return self._send(stub.fail_status or 400, {"error": {"message": "refused: " + self.headers.get(
                        "authorization", "no key"), "type": "x"}})
                last = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
                think = (body.get("thinking") or {}).get("type") == "enabled" or \
                    (body.get("chat_template_kwargs") or {}).get("thinking")
                msg = {"role": "assistant", "content": f"echo: {last}"}
                completion = len(msg["content"])
                reasoning = 0
                if think:
                    msg["reasoning_content"] = "thinking about it"
                    reasoning = len(msg["reasoning_content"])
                out = {"id": rid, "object": "chat.completion", "model": body["model"],
                       "created": int(time.time()),
                       "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}
                if stub.usage:
                    out["usage"] = {"prompt_tokens": len(text), "completion_tokens": completion + reasoning,
                                    "total_tokens": len(text) + completion + reasoning,
                                    "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": len(text) - hit,
                                    "completion_tokens_details": {"reasoning_tokens": reasoning}}
                with stub.lock:
                    stub.answered.append(text)
                    entry["t_done"] = time.time()
                self._send(200, out)

            def _send(self, status: int, obj: dict) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        return H


FAULTS = ("429", "500", "503", "slow", "drop")


class FaultProxy(_Base):
    """`rate` of the attempts get a fault (one of `faults`, chosen by a seeded rule per prompt and
    attempt); the rest are forwarded as they are."""

    def __init__(self, upstream: str, rate: float = 0.4, seed: int = 0, faults=FAULTS, slow: float = 0.3) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate, self.seed, self.faults, self.slow = rate, seed, tuple(faults), slow
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.injected: dict[str, int] = {}
        super().__init__()

    def fault(self, key: str, attempt: int) -> str | None:
        r = random.Random(f"{self.seed}:{key}:{attempt}")
        if r.random() >= self.rate:
            return None
        return r.choice(self.faults)

    def _handler(self):
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:
                import httpx

                n = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(n)
                key = prompt_key(json.loads(raw))
                with proxy.lock:
                    attempt = proxy.attempts.get(key, 0)
                    proxy.attempts[key] = attempt + 1
                kind = proxy.fault(key, attempt)
                if kind is not None:
                    with proxy.lock:
                        proxy.injected[kind] = proxy.injected.get(kind, 0) + 1
                if kind == "429":
                    return self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                                      {"Retry-After": "0.05"})
                if kind in ("500", "503"):
                    return self._send(int(kind), b'{"error": {"message": "upstream trouble"}}')
                if kind == "slow":
                    time.sleep(proxy.slow)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                r = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=raw, headers=headers,
                               timeout=120)
                if kind == "drop":          # headers and half the body, then the connection closes
                    self.send_response(r.status_code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(r.content)))
                    self.end_headers()
                    self.wfile.write(r.content[: len(r.content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self._send(r.status_code, r.content)

            def _send(self, status: int, raw: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        return H
