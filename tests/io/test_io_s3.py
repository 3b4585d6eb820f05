import json
import os
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s3_server import moto_endpoint, s3  # noqa: E402,F401  (pytest fixtures)

from batchv4.io.readers import open_input  # noqa: E402
from batchv4.io.rows import RowSpec, build_request, check_columns  # noqa: E402
from batchv4.io.writers import PartWriter, check_writable, read_errors, read_manifest, read_output_parts  # noqa: E402


def test_s3_round_trip(s3):
    opts = s3.storage_options
    fs = fsspec.filesystem("s3", **opts)
    fs.pipe_file(s3.url("in/data.jsonl"), b'{"q": "a", "k": "x1"}\n{bad\n{"q": "b", "k": "x2"}\n')
    with fs.open(s3.url("in/pq/part-0.parquet"), "wb") as f:
        pq.write_table(pa.table({"q": ["c"], "k": ["x3"]}), f)

    src = open_input(s3.url("in/data.jsonl"), storage_options=opts)
    assert src.format == "jsonl" and src.columns() == ["q", "k"]
    spec = check_columns(RowSpec(prompt_column="q", id_column="k"), src.columns())
    built = [build_request(r, spec) for batch in src.iter_rows(batch_size=2) for r in batch]
    assert [getattr(b, "id", None) for b in built] == ["x1", None, "x2"]

    pq_src = open_input(s3.url("in/pq/"), storage_options=opts)
    assert pq_src.format == "parquet" and [r.data for b in pq_src.iter_rows() for r in b] == [{"q": "c", "k": "x3"}]

    out = s3.url("out/run1")
    check_writable(out, storage_options=opts)
    w = PartWriter(out, storage_options=opts)
    from datetime import datetime, timezone

    row = {
        "id": "x1",
        "sample_index": 0,
        "output": "o",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 3,
        "completion_tokens": 1,
        "reasoning_tokens": 0,
        "finished_at": datetime(2026, 11, 2, tzinfo=timezone.utc),
        "content_hash": "h",
    }
    w.write_part([row])
    w.write_errors([b.to_record() for b in built if b.__class__.__name__ == "RowError"])
    assert read_output_parts(out, storage_options=opts).column("id").to_pylist() == ["x1"]
    assert read_errors(out, storage_options=opts).column("row_index").to_pylist() == [1]
    assert [p["file"] for p in read_manifest(out, storage_options=opts)["parts"]] == ["part-00000.parquet"]
    # no temporary objects were left on the store
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out, refresh=True)) == [
        "errors-00000.parquet",
        "manifest.json",
        "part-00000.parquet",
    ]


def test_s3_endpoint_from_environment(s3, monkeypatch):
    monkeypatch.setenv("BATCHV4_S3_ENDPOINT", s3.endpoint_url)
    fsspec.filesystem("s3", **s3.storage_options).pipe_file(s3.url("env/a.jsonl"), json.dumps({"prompt": "p"}).encode() + b"\n")
    src = open_input(s3.url("env/a.jsonl"), storage_options={})
    assert [r.data for b in src.iter_rows() for r in b] == [{"prompt": "p"}]


def test_s3_missing_bucket_error_is_one_line(s3):
    with pytest.raises(OSError) as e:
        open_input("s3://no-such-bucket-batchv4/x.jsonl", storage_options=s3.storage_options)
    assert "\n" not in str(e.value) and "testing" not in str(e.value)
