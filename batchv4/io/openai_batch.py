"""The OpenAI batch output file (`output.jsonl`) built from output and error rows.

Owns: the line format of OpenAI's batch output (`{id, custom_id, response: {status_code,
request_id, body: chat.completion}, error}`), grouping the samples of one request into `choices`,
and the usage block. Does not own: computing outputs or usage, or the Parquet parts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from batchv4.io.urls import first_line, get_fs, join, redact_url, write_atomic_chunks


def _hid(prefix: str, key: str, length: int = 24) -> str:
    # Deterministic ids: rewriting the file from the same parts gives the same bytes.
    return prefix + hashlib.sha256(key.encode("utf-8")).hexdigest()[:length]


def _created(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, (int, float)):
        return int(value)
    return 0


def _int(row: Mapping[str, Any], key: str) -> int:
    v = row.get(key)
    return int(v) if v is not None else 0


def _success_line(custom_id: str, samples: list[Mapping[str, Any]], model: str) -> dict[str, Any]:
    samples = sorted(samples, key=lambda r: _int(r, "sample_index"))
    choices = [
        {
            "index": _int(r, "sample_index"),
            "message": {"role": "assistant", "content": r.get("output") or "", "reasoning_content": r.get("reasoning")},
            "logprobs": None,
            "finish_reason": r.get("finish_reason"),
        }
        for r in samples
    ]
    # One request, one usage (as OpenAI's batch output has it): the prompt counts once however many
    # samples (n) it had, with the hits of its first sample; completions sum over the samples.
    prompt = _int(samples[0], "prompt_tokens")
    cached = _int(samples[0], "prompt_cache_hit_tokens")
    completion = sum(_int(r, "completion_tokens") for r in samples)
    reasoning = sum(_int(r, "reasoning_tokens") for r in samples)
    body = {
        "id": _hid("chatcmpl-", custom_id),
        "object": "chat.completion",
        "created": max(_created(r.get("finished_at")) for r in samples),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }
    return {
        "id": _hid("batch_req_", custom_id),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": _hid("req_", custom_id, 32), "body": body},
        "error": None,
    }


def _error_line(custom_id: str | None, message: str, code: str, row_index: int | None = None) -> dict[str, Any]:
    # named by its input row too: a line without a custom_id, or a duplicate of another line's
    # custom_id, still has an id of its own
    key = custom_id if custom_id is not None and row_index is None else f"{custom_id}:row {row_index}:{message}"
    return {
        "id": _hid("batch_req_", key),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def write_openai_batch_output(
    out_url: str,
    rows: Iterable[Mapping[str, Any]],
    errors: Iterable[Mapping[str, Any]] = (),
    *,
    model: str = "deepseek-v4-flash",
    filename: str = "output.jsonl",
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write `filename` in the output folder: one line per request id (its samples as `choices`),
    then one error line per error row. Returns the file's name. A request whose sample ended with
    `finish_reason == "error"` becomes an error line. The samples of one id must be adjacent in
    `rows` (as a run writes them); both iterables are consumed once, as a stream."""

    def lines() -> Iterator[bytes]:
        for custom_id, group in itertools.groupby(rows, key=lambda r: str(r["id"])):
            samples = list(group)
            failed = [r for r in samples if r.get("finish_reason") == "error"]
            if failed:
                line = _error_line(custom_id, failed[0].get("error") or "generation failed", "server_error")
            else:
                line = _success_line(custom_id, samples, model)
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        for e in errors:
            line = _error_line(e.get("id"), str(e.get("error")), "invalid_request", e.get("row_index"))
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")

    fs, path = get_fs(out_url, storage_options)
    try:
        write_atomic_chunks(fs, join(fs, path, filename), lines())
    except OSError as e:
        raise OSError(f"cannot write {redact_url(out_url)}/{filename}: {first_line(e)}") from e
    return filename
