"""The one protocol between the pipelines and whatever generates.

A backend takes engine requests in plan order (`EngineRequest`: a caller-supplied `request_id`,
prompt token ids, `SamplingParams`, plan hints for snapshots) and yields one finished
`RequestOutput` per request, in any order, as they finish. Usage comes with each output: the
prompt's token ids, `num_cached_tokens` (prompt tokens the backend served from its cache), and per
sample the generated token ids and `num_reasoning_tokens`; prices are computed from these by the
caller. `stats()` gives backend-wide counters (the local engine's forward seconds, prefill and
decode tokens, ...; a remote backend may return fewer keys, never raise).

The local `LLM` implements it now; a rank group, a remote API client and Ray replicas are meant to.
A consumer that stops early (closes the iterator or raises) must leave the backend with nothing
held for those requests. Owns: the protocol. Does not own: any implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from batchv4.engine.outputs import RequestOutput


@runtime_checkable
class Backend(Protocol):
    def generate_stream(self, requests: Iterable) -> Iterator[RequestOutput]:
        """EngineRequests in plan order -> a RequestOutput per request as it finishes."""

    def stats(self) -> dict:
        """Backend-wide counters (see the module docstring)."""
