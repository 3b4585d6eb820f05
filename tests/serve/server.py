"""A real `batchv4 serve` process for tests: `start_server(*args, env=None)` is a context manager
that starts `python -m batchv4 serve --model tiny --port 0 ARGS...` (loopback), reads the
"listening on" line, waits until /health answers 200, yields the base URL (`http://127.0.0.1:PORT`)
and on exit terminates the process and waits for it.

Import it with `from server import start_server` (test modules outside `tests/serve/` put that
folder on `sys.path` first). The server's stderr goes to a temporary file, shown in the error when
it fails to start. `--model` and `--port` may be overridden through ARGS (the last one wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

PREFIX = "batchv4 serve: listening on "


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            json.load(r)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


@contextlib.contextmanager
def start_server(*args: str, env: dict | None = None, timeout: float = 120.0) -> Iterator[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "batchv4", "serve", "--model", "tiny", "--port", "0", *args]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=full_env)

        def fail(why: str) -> None:
            err.seek(0)
            raise RuntimeError(f"batchv4 serve {why}; stderr:\n{err.read()[-4000:]}")

        try:
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            if not line or not line[0].startswith(PREFIX):
                fail(f"printed no listening line (got {line[0]!r})" if line else "printed no listening line")
            url = line[0][len(PREFIX):].strip()
            # keep stdout drained so the server never blocks on a full pipe
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            deadline = time.monotonic() + timeout
            while _health(url) != 200:
                if proc.poll() is not None:
                    fail(f"exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    fail(f"was not healthy within {timeout:.0f} s")
                time.sleep(0.1)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
