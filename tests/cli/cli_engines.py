"""Support for the CLI tests (not a test module): a fast real engine, a fixed clock, helpers.

The `test` preset builds in about a second but has a 512-token vocabulary, while prompts are
tokenized with the real V4 tokenizer (129,280 ids). `FoldedLLM` wraps a real `LLM("test")` and
maps prompt ids into its vocabulary (id % 512) on the way in; everything else (planning, prefix
cache, scheduling, sampling, detokenizing with the V4 tokenizer, finish reasons, stats) is the real
engine. Prompt lengths are unchanged, so token accounting is exact.

`install()` makes `batchv4 run` use it: the tests patch `batchv4.pipelines.run._default_llm`, and
the subprocess tests run `python -c CLI_WITH_TEST_ENGINE run ...`, which is `batchv4.cli.main` with
that one patch.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 512

# A Wednesday, 02:00 UTC = 10:00 Beijing: a DeepSeek peak hour on a weekday, after peak billing began
WEEKDAY_PEAK = datetime(2026, 12, 2, 2, 0, tzinfo=timezone.utc)
# A Saturday, same hour: DeepSeek bills it off-peak, genai-prices' table says peak
SATURDAY_PEAK = datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)

CLI_WITH_TEST_ENGINE = (
    f"import sys; sys.path.insert(0, {HERE!r}); import cli_engines; cli_engines.install(); "
    "from batchv4.cli import main; main()"
)


class FoldedLLM:
    """The engine interface `run` uses (generate_stream, stats) over `LLM("test")`."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def generate_stream(self, requests):
        from dataclasses import replace

        return self.llm.generate_stream(replace(r, prompt_token_ids=[t % VOCAB for t in r.prompt_token_ids])
                                        for r in requests)

    def stats(self) -> dict:
        return self.llm.stats()


class EchoEngine:
    """The engine interface `run` uses, with no model: every request comes back at once with a
    fixed two-token output."""

    def generate_stream(self, requests):
        from batchv4.engine.outputs import CompletionOutput, RequestOutput

        for r in requests:
            yield RequestOutput(r.request_id, r.prompt_token_ids, r.resume_pos,
                                [CompletionOutput(i, "ok", [100, 101], "length")
                                 for i in range(r.params.n)])

    def stats(self) -> dict:
        return {"forward_seconds": 0.0, "prefill_tokens": 0, "decode_tokens": 0, "cached_prompt_tokens": 0,
                "preemptions": 0, "snapshot_evictions": 0, "peak_snapshots": 0}


def folded_llm(cfg) -> FoldedLLM:
    from batchv4.engine.llm import LLM

    return FoldedLLM(LLM("test", dtype="float32", device=cfg.device, kv_cache_memory="64MiB", page_size=4,
                         max_num_batched_tokens=cfg.max_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                         seed=cfg.seed, max_model_len=cfg.max_model_len, kv_cache_dtype=cfg.kv_cache_dtype))


def install() -> None:
    import batchv4.pipelines.run as run_mod

    run_mod._default_llm = folded_llm


@pytest.fixture
def fast_engine(monkeypatch: pytest.MonkeyPatch) -> list:
    """`batchv4 run` on the folded `test` engine; the returned list records each engine built."""
    import batchv4.pipelines.run as run_mod

    built: list = []

    def factory(cfg):
        built.append(cfg)
        return folded_llm(cfg)

    monkeypatch.setattr(run_mod, "_default_llm", factory)
    return built


def fix_clock(monkeypatch: pytest.MonkeyPatch, when: datetime) -> None:
    import batchv4.pipelines.run as run_mod

    monkeypatch.setattr(run_mod, "_now", lambda: when)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """`batchv4 ARGS` through `batchv4.cli.main` (the console script's error handling), in process:
    (exit code, stdout, stderr)."""
    from batchv4.cli import main

    old = sys.argv
    sys.argv = ["batchv4", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path, rows) -> str:
    """Rows are dicts (written as JSON) or bytes (written as they are, one line each)."""
    import json

    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return str(path)


def read_outputs(out: str, storage_options: dict | None = None) -> list[dict]:
    from batchv4.io.writers import read_output_parts

    return read_output_parts(out, None, storage_options).to_pylist()


def read_error_rows(out: str, storage_options: dict | None = None) -> list[dict]:
    from batchv4.io.writers import read_errors

    return read_errors(out, None, storage_options).to_pylist()
