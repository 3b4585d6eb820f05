import json
import uuid

import fsspec
import fsspec.compression
import fsspec.utils
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchv4.io.readers import InputNotFoundError, open_input
from batchv4.io.schema import keep_fields, output_schema, rows_to_table


def _mem(name: str = "") -> str:
    return f"memory://discovery-{uuid.uuid4().hex}/{name}"


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def _lines(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _rows(src):
    return [r for batch in src.iter_rows(batch_size=2) for r in batch]


def test_folder_reads_every_file_in_its_own_format_and_lists_what_it_skips(tmp_path):
    pq.write_table(pa.table({"prompt": ["a0", "a1"], "n": [0, 1]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_bytes(_lines({"prompt": "b0"}, {"prompt": "b1", "x": True}))
    (tmp_path / "README").write_text("# about this data\n")
    (tmp_path / "notes.txt").write_text("{}\n")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    src = open_input(str(tmp_path))
    assert src.format == "mixed" and src.file_formats == ["parquet", "jsonl"]
    assert src.files == [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]
    rows = _rows(src)
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.data["prompt"] for r in rows] == ["a0", "a1", "b0", "b1"]
    assert src.skipped == [f"{tmp_path}/README", f"{tmp_path}/notes.txt"]  # _SUCCESS: hidden, silent
    assert src.columns() == ["prompt", "n", "x"]


def test_suffixless_parts_are_sniffed_from_content():
    root = _mem("spark/")
    _put(root + "part-00000", _lines({"prompt": "p"}))
    _put(root + "LICENSE", b"MIT License\n")
    src = open_input(root)
    assert src.format == "jsonl" and [r.data for r in _rows(src)] == [{"prompt": "p"}]
    assert [s.rsplit("/", 1)[-1] for s in src.skipped] == ["LICENSE"]


def test_json_array_documents():
    url = _mem("pretty.json")
    _put(url, b'\xef\xbb\xbf [\n  {"prompt": "one", "score": 1},\n  5,\n  {"prompt": "three"}\n]\n')
    src = open_input(url)
    assert src.format == "jsonl" and src.file_formats == ["json"] and src.has_rows()
    one, bad, three = _rows(src)
    assert one.data == {"prompt": "one", "score": 1} and three.data == {"prompt": "three"} and three.index == 2
    assert bad.data is None and bad.raw == "5"
    assert bad.error == f"{url} element 2: expected a JSON object, got a number"
    assert src.columns() == ["prompt", "score"]
    jsonl_named_json = _mem("lines.json")  # a .json file not starting with "[" is JSON lines
    _put(jsonl_named_json, _lines({"prompt": "a"}, {"prompt": "b"}))
    assert [r.data["prompt"] for r in _rows(open_input(jsonl_named_json))] == ["a", "b"]
    blank = _mem("blank.json")
    _put(blank, b"  \n")
    assert not open_input(blank).has_rows() and _rows(open_input(blank)) == []


def test_broken_json_array_fails_at_open_naming_file_and_position():
    url = _mem("broken.json")
    _put(url, b'[\n  {"prompt": "one"},\n  {"prompt": \n]')
    with pytest.raises(ValueError) as e:
        open_input(url)
    assert str(e.value).startswith(f"cannot read {url}: invalid JSON at line 4 column 1")
    assert "\n" not in str(e.value)


def test_empty_inputs_open_and_have_no_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    src = open_input(str(tmp_path / "empty.jsonl"))
    assert src.format == "jsonl" and not src.has_rows()
    assert src.columns() == [] and _rows(src) == [] and src.arrow_schema() == pa.schema([])
    (tmp_path / "empty.parquet").write_bytes(b"")
    folder = open_input(str(tmp_path))
    assert folder.file_formats == ["jsonl", "parquet"] and not folder.has_rows() and _rows(folder) == []
    (tmp_path / "one.jsonl").write_bytes(b"\n{bad\n")
    assert open_input(str(tmp_path)).has_rows()  # an error row is a row


@pytest.mark.parametrize("suffix,package", [(".zst", "zstandard"), (".lz4", "lz4")])
def test_missing_codec_is_one_line_naming_the_file(tmp_path, monkeypatch, suffix, package):
    ext = suffix[1:]
    codec = fsspec.utils.compressions.get(ext)
    monkeypatch.delitem(fsspec.utils.compressions, ext, raising=False)  # as when the package is absent
    if codec is not None:
        monkeypatch.delitem(fsspec.compression.compr, codec, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(_lines({"prompt": "fine"}))
    (data / f"x.jsonl{suffix}").write_bytes(b"\x28\xb5\x2f\xfd not really compressed")
    monkeypatch.chdir(tmp_path)
    expected = (f"cannot read data/x.jsonl{suffix}: reading {suffix} files needs the '{package}' package "
                f"(pip install {package})")
    with pytest.raises(OSError) as e:
        open_input("data")
    assert str(e.value) == expected
    with pytest.raises(OSError) as e:
        open_input(f"data/x.jsonl{suffix}")
    assert str(e.value) == expected


def test_output_folder_inside_the_input_is_excluded(tmp_path, monkeypatch):
    inp = tmp_path / "input_dir"
    (inp / "out").mkdir(parents=True)
    (inp / "a.jsonl").write_bytes(_lines({"prompt": "a"}))
    pq.write_table(pa.table({"id": ["x"], "output": ["y"]}), inp / "out" / "part-00000.parquet")
    monkeypatch.chdir(tmp_path)
    src = open_input("input_dir", exclude=["input_dir/out"])
    assert src.files == [str(inp / "a.jsonl")] and src.format == "jsonl"
    assert src.skipped == ["input_dir/out/ (the output folder)"]
    assert open_input(f"file://{inp}", exclude=[str(inp / "out") + "/"]).files == [str(inp / "a.jsonl")]
    assert open_input("input_dir/*", exclude=["input_dir/out"]).files == [str(inp / "a.jsonl")]
    with pytest.raises(InputNotFoundError, match="is the output folder or inside it"):
        open_input("input_dir/out", exclude=["input_dir/out"])
    with pytest.raises(InputNotFoundError, match="inside the output folder"):
        open_input("input_dir/out/part-00000.parquet", exclude=["input_dir/out"])
    (inp / "a.jsonl").unlink()
    with pytest.raises(InputNotFoundError) as e:
        open_input("input_dir", exclude=["input_dir/out"])
    assert str(e.value) == "input folder input_dir holds no data files (skipped: input_dir/out/ (the output folder))"


def test_marked_batchv4_output_folders_are_excluded():
    root = _mem("ds/")
    _put(root + "a.jsonl", _lines({"prompt": "a"}))
    _put(root + "run1/_batchv4.json", b'{"format": "batchv4-output-folder"}')
    _put(root + "run1/part-00000.parquet", b"PAR1 not read")
    _put(root + "old/manifest.json", json.dumps({"format": "batchv4-output", "parts": []}).encode())
    _put(root + "old/part-00000.parquet", b"PAR1 not read")
    _put(root + "meta/manifest.json", _lines({"prompt": "a manifest.json that is data"}))
    src = open_input(root)
    assert [f.rsplit("/", 2)[-2:] for f in src.files] == [["ds", "a.jsonl"], ["meta", "manifest.json"]]
    assert src.skipped == [f"{root}old/ (a batchv4 output folder)", f"{root}run1/ (a batchv4 output folder)"]
    only = _mem("only/")
    _put(only + "run1/_batchv4.json", b"{}")
    _put(only + "run1/part-00000.parquet", b"PAR1")
    with pytest.raises(InputNotFoundError, match=r"holds no data files \(skipped: .*run1/ \(a batchv4 output folder\)\)"):
        open_input(only)


def test_openai_batch_files_mixed_with_other_data_is_an_error():
    root = _mem("batch/")
    req = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    _put(root + "a.jsonl", _lines(req))
    _put(root + "b.jsonl", _lines({"prompt": "plain"}))
    with pytest.raises(ValueError) as e:
        open_input(root)
    assert str(e.value) == (f"cannot mix OpenAI batch files with other inputs: {root}a.jsonl is an OpenAI batch "
                            f"file but {root}b.jsonl is a JSON lines file")
    ok = _mem("batch/")
    _put(ok + "a.jsonl", _lines(req))
    _put(ok + "b.jsonl", b"")  # an empty part has no kind of its own
    src = open_input(ok)
    assert src.format == "openai" and src.file_formats == ["openai", "openai"]


def test_explicit_format_applies_to_every_file():
    root = _mem("forced/")
    _put(root + "a.jsonl", _lines({"custom_id": "x", "body": {"prompt": "p"}}))
    _put(root + "b.json", b'[{"prompt": "q"}]')
    src = open_input(root, fmt="jsonl")
    assert src.format == "jsonl" and src.file_formats == ["jsonl", "json"]
    assert [r.index for r in _rows(src)] == [0, 1]


def test_jsonl_kept_columns_keep_their_types():
    url = _mem("typed.jsonl")
    first = {"prompt": "a", "score": 3, "mixed": 1, "ratio": 1, "tags": ["x"], "meta": {"k": 1}, "none": None}
    _put(url, _lines(first, {"prompt": "b", "score": 4, "mixed": "two", "ratio": 0.5, "flag": True}))
    src = open_input(url)
    schema = src.arrow_schema()
    types = {f.name: f.type for f in schema}
    assert types == {"prompt": pa.string(), "score": pa.int64(), "mixed": pa.string(), "ratio": pa.float64(),
                     "tags": pa.list_(pa.string()), "meta": pa.struct([("k", pa.int64())]), "none": pa.string(),
                     "flag": pa.bool_()}
    kept = keep_fields(["score", "mixed"], schema)
    assert [(f.name, f.type) for f in kept] == [("score", pa.int64()), ("mixed", pa.string())]
    table = rows_to_table([r.data for r in _rows(src)], pa.schema(kept))
    assert table.column("score").to_pylist() == [3, 4] and table.column("mixed").to_pylist() == ["1", "two"]
    assert output_schema(kept).field("score").type == pa.int64()


def test_mixed_schema_unifies_parquet_and_json_types():
    root = _mem("mix/")
    with fsspec.open(root + "a.parquet", "wb") as f:
        pq.write_table(pa.table({"score": [1], "label": ["x"], "only_pq": [True]}), f)
    _put(root + "b.jsonl", _lines({"score": 2.5, "label": 7, "only_js": 1}))
    src = open_input(root)
    assert src.format == "mixed"
    assert {f.name: f.type for f in src.arrow_schema()} == {
        "score": pa.float64(), "label": pa.string(), "only_pq": pa.bool_(), "only_js": pa.int64()}


def test_unreadable_files_fail_at_open_naming_the_file():
    root = _mem("bad/")
    _put(root + "a.jsonl", _lines({"prompt": "a"}))
    _put(root + "b.parquet", b"PAR1 but no footer")
    with pytest.raises(OSError, match=rf"^cannot read parquet {root}b\.parquet: "):
        open_input(root)
    gz = _mem("trunc/")
    _put(gz + "a.jsonl.gz", b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(OSError, match=rf"^cannot read {gz}a\.jsonl\.gz: "):
        open_input(gz)
