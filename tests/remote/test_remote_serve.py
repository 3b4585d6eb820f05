"""`run --backend openai` against `batchv4 serve` (the tiny model, started once for the module):
row for row the same outputs as the local engine, cache hits for the later rows of a shared
prefix, and exactly once through a fault-injecting proxy in front of the server."""

from __future__ import annotations

import json
import os
import sys

import polars as pl
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "serve"))
from fakes import FaultProxy  # noqa: E402
from server import start_server  # noqa: E402

from batchv4.pipelines.run import RunConfig, run  # noqa: E402

SYSTEM = ("You answer questions about the following passage. " +
          "Sphinx of black quartz, judge my vow; pack my box with five dozen liquor jugs. " * 6)


@pytest.fixture(scope="module")
def server():
    with start_server("--max-num-seqs", "16") as url:
        yield url + "/v1"


def rows_file(path):
    rows = [{"id": f"q{i}", "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": f"Question {i}: what is word {i}?"}]}
            for i in range(6)]
    rows += [{"id": f"u{i}", "prompt": f"Say something about the number {i}."} for i in range(3)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def table(folder):
    import glob

    return pl.concat([pl.read_parquet(p) for p in sorted(glob.glob(os.path.join(folder, "part-*.parquet")))]).sort("id")


def test_remote_equals_local_row_for_row(tmp_path, server):
    rows = rows_file(tmp_path / "in.jsonl")
    common = dict(input=str(tmp_path / "in.jsonl"), max_tokens=8, quiet=True, model="tiny")
    run(RunConfig(output=str(tmp_path / "local"), **common))
    s = run(RunConfig(output=str(tmp_path / "remote"), backend="openai", base_urls=(server,), concurrency=4,
                      **common))
    local, remote = table(tmp_path / "local"), table(tmp_path / "remote")
    assert remote["id"].to_list() == local["id"].to_list() == sorted(r["id"] for r in rows)
    assert remote["output"].to_list() == local["output"].to_list()
    assert remote["finish_reason"].to_list() == local["finish_reason"].to_list()
    assert remote["completion_tokens"].to_list() == local["completion_tokens"].to_list()
    assert remote["prompt_tokens"].to_list() == local["prompt_tokens"].to_list()
    # the first request of the shared system prompt computes it; the five after it hit the
    # server's prefix cache (at least the system message, about 200 tokens)
    q = remote.filter(pl.col("id").str.starts_with("q"))
    hits = sorted(q["prompt_cache_hit_tokens"].to_list())
    assert hits[0] == 0 and all(h >= 128 for h in hits[1:]), hits
    assert s["this_run"]["remote"]["requests"] == len(rows)
    assert remote["provider_request_id"].n_unique() == len(rows)


def test_faults_in_front_of_the_server(tmp_path, server):
    rows = rows_file(tmp_path / "in.jsonl")
    with FaultProxy(server, rate=0.5, seed=11, slow=0.2) as proxy:
        run(RunConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), max_tokens=4, quiet=True,
                      model="tiny", backend="openai", base_urls=(proxy.url,), max_retries=4, concurrency=4))
    import glob

    ids = list(table(tmp_path / "out")["id"])
    for p in glob.glob(str(tmp_path / "out" / "errors-*.parquet")):
        ids += pl.read_parquet(p)["id"].to_list()
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert max(proxy.attempts.values()) <= 5 and sum(proxy.injected.values()) > 0
