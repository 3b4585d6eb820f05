import gzip
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchv4.io.readers import open_input
from batchv4.io.urls import first_line, redact_url


def _mem(name: str) -> str:
    return f"memory://readers-{uuid.uuid4().hex}/{name}"


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def _rows(src, batch_size=1024):
    return [r for batch in src.iter_rows(batch_size=batch_size) for r in batch]


MALFORMED = (
    b'{"prompt": "one", "id": "a"}\n'
    b"\n"
    b"   \n"
    b'{"prompt": "two", "id": "b"\n'
    b'["not", "an", "object"]\n'
    b'{"prompt": "caf\xe9"}\n'
    b'{"prompt": "three", "extra": 1}\r\n'
)


def test_malformed_jsonl_becomes_error_rows():
    url = _mem("in.jsonl")
    _put(url, MALFORMED)
    src = open_input(url)
    assert src.format == "jsonl"
    rows = _rows(src, batch_size=2)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]  # blank lines are not rows
    ok, bad_json, not_obj, bad_utf8, last = rows
    assert ok.data == {"prompt": "one", "id": "a"} and ok.error is None and ok.raw == '{"prompt": "one", "id": "a"}'
    assert bad_json.data is None and "line 4: invalid JSON" in bad_json.error
    assert bad_json.raw == '{"prompt": "two", "id": "b"'
    assert not_obj.data is None and "line 5: expected a JSON object, got an array" in not_obj.error
    assert bad_utf8.data is None and "line 6: invalid UTF-8 at byte" in bad_utf8.error
    assert bad_utf8.raw == '{"prompt": "caf\ufffd"}'
    assert last.data == {"prompt": "three", "extra": 1}
    for r in rows:
        assert r.error is None or "\n" not in r.error


def test_batches_are_bounded():
    url = _mem("many.jsonl")
    _put(url, b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(25)))
    batches = list(open_input(url).iter_rows(batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [r.index for b in batches for r in b] == list(range(25))


def test_columns_union_over_first_n_lines():
    url = _mem("cols.jsonl")
    lines = [{"a": 1}, {"b": 2}, {"a": 3, "c": 4}, {"late": 5}]
    _put(url, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    src = open_input(url, sample_lines=3)
    assert src.columns() == ["a", "b", "c"]
    assert src.columns(sample_lines=10) == ["a", "b", "c", "late"]


def test_openai_detection_and_extension_is_only_a_hint():
    url = _mem("batch.parquet")  # wrong extension on purpose
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    _put(url, b"not json\n" + json.dumps(line).encode() + b"\n")
    assert open_input(url).format == "openai"
    plain = _mem("plain.jsonl")
    _put(plain, b'{"custom_id": "x", "prompt": "no body"}\n')
    assert open_input(plain).format == "jsonl"
    assert open_input(plain, fmt="ndjson").format == "jsonl"
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        open_input(plain, fmt="csv")


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "zipped"}\n'))
    src = open_input(str(path))
    assert src.format == "jsonl" and _rows(src)[0].data == {"prompt": "zipped"}


def test_parquet_file_folder_and_glob(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"prompt": [f"p{i}a", f"p{i}b"], "n": [i, i]}), folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-9.parquet.crc").write_bytes(b"x")
    src = open_input(str(folder))
    assert src.format == "parquet" and len(src.files) == 3
    assert src.columns() == ["prompt", "n"]
    rows = _rows(src, batch_size=1)
    assert [r.data["prompt"] for r in rows] == ["p0a", "p0b", "p1a", "p1b", "p2a", "p2b"]
    assert [r.index for r in rows] == list(range(6)) and all(r.raw is None for r in rows)
    glob_src = open_input(f"file://{folder}/part-[12].parquet")
    assert [r.data["prompt"] for r in _rows(glob_src)] == ["p1a", "p1b", "p2a", "p2b"]


def test_parquet_in_memory_fs():
    url = _mem("t.parquet")
    with fsspec.open(url, "wb") as f:
        pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}]]}), f)
    src = open_input(url)
    assert src.format == "parquet"
    assert _rows(src)[0].data == {"messages": [{"role": "user", "content": "hi"}]}


def test_missing_input_and_redaction():
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_input(_mem("nope.jsonl"))
    with pytest.raises(FileNotFoundError) as e:
        open_input("memory://user:secret@nohost/x.jsonl?token=abc")
    assert "secret" not in str(e.value) and "token=abc" not in str(e.value)


def test_redact_url():
    assert redact_url("https://u:p@h.example:8443/a/b?sig=1#x") == "https://***@h.example:8443/a/b?<redacted>"
    assert redact_url("s3://bucket/key.parquet") == "s3://bucket/key.parquet"
    assert redact_url("/local/path") == "/local/path"
    assert first_line(OSError("GET https://h/x?X-Amz-Signature=s failed\nmore")) == "GET https://h/x?<redacted> failed"


def test_http_input_read_only(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (tmp_path / "in.jsonl").write_bytes(b'{"prompt": "web"}\n{bad\n')
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        src = open_input(f"{base}/in.jsonl?token=secret")
        rows = _rows(src)
        assert src.format == "jsonl" and rows[0].data == {"prompt": "web"}
        assert "invalid JSON" in rows[1].error and "secret" not in rows[1].error
        with pytest.raises(FileNotFoundError, match="input not found") as e:
            open_input(f"{base}/missing.jsonl?token=secret")
        assert "secret" not in str(e.value)
    finally:
        server.shutdown()
