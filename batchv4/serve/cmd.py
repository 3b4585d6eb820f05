"""`batchv4 serve`: the Click command that runs the OpenAI-compatible server over the local engine.

Owns: the options, reading the API key from the environment variable named by `--api-key-env`,
binding the socket (loopback by default; `--port 0` picks a free port), printing the one line
`batchv4 serve: listening on http://HOST:PORT` once it listens, then building the engine in the
engine thread (so clients see 503 while it loads, never a refused connection), and shutting down.
Does not own: the routes (`app`), the engine thread (`engine_loop`).
"""

from __future__ import annotations

import os
import socket
import sys

import click

from batchv4.errors import UserError


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)     # connections queue from now on, while uvicorn starts
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@click.command(context_settings={"show_default": True})
@click.option("--model", required=True, help="Preset name or checkpoint directory (its tokenizer.json is used).")
@click.option("--host", default="127.0.0.1", help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--served-model-name", default=None, show_default=False,
              help="The model id clients name.  [default: the --model argument as given]")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Require `Authorization: Bearer KEY`, KEY read from the environment variable VAR.  "
                   "[default: no key]", show_default=False)
@click.option("--prefix-unit", default=64, type=click.IntRange(0),
              help="Snapshot a prompt's prefix every this many tokens (besides message ends); 0: message ends only.")
@click.option("--max-queue", default=1024, type=click.IntRange(1),
              help="Requests waiting or running at most; more get 429.")
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--max-num-seqs", default=64, type=click.IntRange(1), help="Sequences running at once.")
@click.option("--max-batched-tokens", default=2048, type=click.IntRange(1), help="Token budget per engine step.")
@click.option("--max-model-len", default=None, type=click.IntRange(1), show_default=False,
              help="Context limit: prompt + max_tokens; longer requests get 400.  [default: the model's]")
@click.option("--default-max-tokens", default=4096, type=click.IntRange(1),
              help="max_tokens of a chat request that does not set it (cut to what the context leaves; "
                   "completions: 16, as OpenAI).")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--seed", default=0, type=int, help="Sampling seed of requests that set none.")
def serve(model, host, port, served_model_name, api_key_env, prefix_unit, max_queue, kv_cache_memory,
          max_num_seqs, max_batched_tokens, max_model_len, default_max_tokens, device, seed):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health), one local engine for all requests, with prompt prefixes cached across
    requests."""
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env, "")
        if not api_key.strip():
            raise UserError(f"--api-key-env {api_key_env}: the environment variable is not set or empty")
        api_key = api_key.strip()
    from batchv4.config import ModelConfig

    ModelConfig.load(model)          # a bad model name or folder fails here, before listening
    try:
        import uvicorn

        from batchv4.serve.app import create_app
        from batchv4.serve.engine_loop import EngineLoop
    except ImportError as e:
        raise UserError(f"batchv4 serve needs fastapi and uvicorn ({e}); pip install 'fastapi>=0.110' "
                        "'uvicorn>=0.29'") from None

    def build():
        from batchv4.engine.llm import LLM

        return LLM(model, device=device, kv_cache_memory=kv_cache_memory, max_num_batched_tokens=max_batched_tokens,
                   max_num_seqs=max_num_seqs, seed=seed, max_model_len=max_model_len)

    sock = _bind(host, port)
    server: uvicorn.Server | None = None

    def failed(e: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    engine = EngineLoop(build, prefix_unit=prefix_unit, max_queue=max_queue, on_failure=failed)
    app = create_app(engine, served_model_name or model, api_key, default_max_tokens=default_max_tokens)
    url = _url(sock)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                click.echo(f"batchv4 serve: listening on {url}")
                sys.stdout.flush()
                engine.start()

    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=3, lifespan="off")
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    if engine.error is not None:
        e = engine.error
        if isinstance(e, (UserError, OSError)):
            raise e
        raise UserError(f"the engine failed to start: {type(e).__name__}: {e}")
