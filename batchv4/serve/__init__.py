"""The OpenAI-compatible server over the local engine (`batchv4 serve`).

Modules: `cmd` (the Click command, the socket, startup), `app` (the FastAPI routes), `protocol`
(the OpenAI wire format), `engine_loop` (the one thread that drives the one `LLM`), `prefix_cache`
(which prompt prefixes get snapshots online). Owns nothing itself; importing it imports nothing
heavy (FastAPI and torch load only when a server is built).
"""
