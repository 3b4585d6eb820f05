import json
import os
import uuid
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pytest

import batchv4.io.urls as urls
from batchv4.io.rows import RowError
from batchv4.io.schema import ERROR_SCHEMA, OUTPUT_SCHEMA, keep_fields
from batchv4.io.writers import (
    PartWriter,
    check_writable,
    finished_ids,
    read_errors,
    read_manifest,
    read_output_parts,
    write_openai_batch_output,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


def out_row(i, sample=0, **extra):
    row = {
        "id": f"r{i}",
        "sample_index": sample,
        "output": f"answer {i}",
        "reasoning": "because",
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "prompt_cache_hit_tokens": 4,
        "prompt_cache_miss_tokens": 6,
        "completion_tokens": 5,
        "reasoning_tokens": 2,
        "cost_usd": 1e-6,
        "cost_usd_amortized": 1e-6,
        "finished_at": T0,
        "content_hash": "h",
    }
    row.update(extra)
    return row


def test_schema_has_required_columns():
    for name, typ in [
        ("id", pa.string()),
        ("sample_index", pa.int32()),
        ("reasoning", pa.string()),
        ("prompt_cache_hit_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cost_usd_amortized", pa.float64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("content_hash", pa.string()),
    ]:
        assert OUTPUT_SCHEMA.field(name).type == typ
    assert OUTPUT_SCHEMA.field("reasoning").nullable and OUTPUT_SCHEMA.field("cost_usd").nullable
    assert ERROR_SCHEMA.names == ["id", "row_index", "error", "raw"]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_parts_manifest_and_resume(tmp_path, kind):
    url = str(tmp_path / "out") if kind == "local" else f"memory://writers-{uuid.uuid4().hex}/out"
    kept = keep_fields(["topic"], pa.schema([("topic", pa.string())]))
    w = PartWriter(url, kept=kept, meta={"model": "tiny"})
    assert w.write_part([out_row(0, topic="a"), out_row(1, topic="b")]) == "part-00000.parquet"
    assert w.write_part([]) is None
    assert w.write_errors([RowError(2, None, "line 3: invalid JSON", "{bad").to_record()]) == "errors-00000.parquet"
    m = read_manifest(url)
    assert [p["file"] for p in m["parts"]] == ["part-00000.parquet"]
    assert m["parts"][0]["rows"] == 2 and m["parts"][0]["first_id"] == "r0" and m["meta"] == {"model": "tiny"}
    # a second writer on the same folder resumes the numbering
    w2 = PartWriter(url, kept=kept)
    assert w2.write_part([out_row(3, topic="c")]) == "part-00001.parquet"
    table = read_output_parts(url)
    assert table.column("id").to_pylist() == ["r0", "r1", "r3"]
    assert table.column("topic").to_pylist() == ["a", "b", "c"]
    assert table.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert finished_ids(url) == {"r0", "r1", "r3"}
    errs = read_errors(url)
    assert errs.to_pylist() == [{"id": None, "row_index": 2, "error": "line 3: invalid JSON", "raw": "{bad"}]
    assert read_manifest(url)["rows"] == 3 and read_manifest(url)["error_rows"] == 1


def test_crash_between_temp_write_and_rename_lists_nothing(tmp_path, monkeypatch):
    url = str(tmp_path / "out")
    w = PartWriter(url)
    w.write_part([out_row(0)])

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(urls, "_rename", crash)
    with pytest.raises(OSError, match="cannot write"):
        w.write_part([out_row(1)])
    monkeypatch.undo()
    # what a killed process leaves behind: a hidden temp file and an unlisted final-looking part
    (tmp_path / "out" / ".part-00001.parquet.tmp-dead").write_bytes(b"partial")
    (tmp_path / "out" / "part-00001.parquet").write_bytes(b"PAR1 truncated")
    assert [p["file"] for p in read_manifest(url)["parts"]] == ["part-00000.parquet"]
    assert read_output_parts(url).column("id").to_pylist() == ["r0"]
    # resuming overwrites the unlisted part and lists it only when complete
    w2 = PartWriter(url)
    assert w2.write_part([out_row(1)]) == "part-00001.parquet"
    assert read_output_parts(url).column("id").to_pylist() == ["r0", "r1"]
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp-" in n and n != ".part-00001.parquet.tmp-dead"]


def test_bad_rows_and_missing_output(tmp_path):
    w = PartWriter(str(tmp_path / "o"))
    row = out_row(0)
    del row["content_hash"]
    with pytest.raises(ValueError, match="'content_hash' is required"):
        w.write_part([row])
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        read_output_parts(str(tmp_path / "elsewhere"))
    assert finished_ids(str(tmp_path / "elsewhere")) == set()
    (tmp_path / "o" / "manifest.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(str(tmp_path / "o"))


def test_empty_output_reads_as_empty_table(tmp_path):
    w = PartWriter(str(tmp_path / "o"))
    w.update_meta(note="nothing yet")
    assert read_output_parts(str(tmp_path / "o")).num_rows == 0
    assert read_errors(str(tmp_path / "o"), columns=["error"]).schema.names == ["error"]


def test_keep_fields_name_clash():
    with pytest.raises(ValueError, match="name of an output column"):
        keep_fields(["output"])


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "new" / "folder"))
    assert os.listdir(tmp_path / "new" / "folder") == []
    check_writable(f"memory://writers-{uuid.uuid4().hex}/x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is not writable") as e:
        check_writable(str(blocker / "sub"))
    assert "\n" not in str(e.value)


def test_openai_batch_output(tmp_path):
    rows = [
        out_row(0, sample=1, output="second", finish_reason="length"),
        out_row(0, sample=0, output="first"),
        out_row(1, finish_reason="error", error="engine failed"),
    ]
    errors = [{"id": "bad-1", "row_index": 7, "error": "line 8: invalid JSON", "raw": "{"}]
    name = write_openai_batch_output(str(tmp_path), rows, errors, model="deepseek-v4-flash")
    lines = [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["r0", "r1", "bad-1"]
    ok = lines[0]
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"].startswith("req_")
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "deepseek-v4-flash"
    assert body["created"] == int(T0.timestamp())
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "first", "stop"),
        (1, "second", "length"),
    ]
    assert body["choices"][0]["message"]["reasoning_content"] == "because"
    # one request, one usage: its prompt once (the n samples share it), completions summed
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert lines[1]["response"] is None and lines[1]["error"] == {"code": "server_error", "message": "engine failed"}
    assert lines[2]["error"] == {"code": "invalid_request", "message": "line 8: invalid JSON"}
    # error lines without a custom_id (or repeating one) still get an id of their own
    nameless = [{"id": None, "row_index": i, "error": "bad", "raw": "{"} for i in (3, 4)]
    nameless.append({"id": "r0", "row_index": 5, "error": "duplicate id 'r0'", "raw": "{}"})
    write_openai_batch_output(str(tmp_path), rows, nameless, model="m", filename="two.jsonl")
    ids = [json.loads(x)["id"] for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 5
    # deterministic: writing again gives the same bytes
    first = (tmp_path / name).read_bytes()
    write_openai_batch_output(str(tmp_path), rows, errors, model="deepseek-v4-flash")
    assert (tmp_path / name).read_bytes() == first


def test_openai_output_to_memory():
    url = f"memory://writers-{uuid.uuid4().hex}/o"
    write_openai_batch_output(url, [out_row(0)])
    with fsspec.open(url + "/output.jsonl", "rt") as f:
        assert json.loads(f.readline())["custom_id"] == "r0"


def test_manifest_is_rewritten_a_few_hundred_times_for_thousands_of_parts(tmp_path, monkeypatch):
    """After the first 64 parts the manifest is rewritten once per 1/64 of the listed parts (not
    once per part, which is quadratic); parts written since are unlisted until then, ignored by
    readers, and overwritten by a resumed writer; `flush` lists them."""
    url = str(tmp_path / "out")
    w = PartWriter(url)
    writes = []
    orig = w._write_manifest
    monkeypatch.setattr(w, "_write_manifest", lambda: (writes.append(1), orig())[1])
    for i in range(65):
        w.write_part([out_row(i)])
    assert len(writes) == 64 and len(read_manifest(url)["parts"]) == 64
    assert len(read_output_parts(url)) == 64                 # part 65 is written but not listed
    # a crash now: the next writer reuses the unlisted part's name
    w2 = PartWriter(url)
    assert w2.write_part([out_row(99)]) == "part-00064.parquet"
    w2.flush()
    assert read_output_parts(url).column("id").to_pylist()[-2:] == ["r63", "r99"]
    w = PartWriter(url)
    writes.clear()
    monkeypatch.setattr(w, "_write_manifest", lambda: (writes.append(1), orig.__func__(w))[1])
    for i in range(2000):
        w.write_part([out_row(i)])
    assert len(writes) < 250                               # 64 * ln(2065 / 65) ~ 221
    w.flush()
    assert len(read_manifest(url)["parts"]) == 2065 and len(read_output_parts(url)) == 2065
