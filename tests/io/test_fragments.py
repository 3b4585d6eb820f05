"""Reading an input by fragments (what the Ray executor's read tasks do) gives the rows of
`iter_rows`, in order and with the same indices, raw texts and error messages (line and element
numbers), at any fragment size: JSON lines with a BOM, blank, bad and non-object lines; a JSON
array with a non-object element; Parquet row groups; a gzipped file (read whole)."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchv4.io.fragments import fragments, place, read_fragment
from batchv4.io.readers import open_input


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("frags")
    lines = ['\ufeff{"a": 1}'] + [json.dumps({"a": i, "t": "x" * (i % 7)}) for i in range(2, 60)]
    lines.insert(10, "")
    lines.insert(20, "{bad")
    lines.insert(33, "[1]")
    lines.insert(34, "   ")
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "b.json").write_text(json.dumps([{"b": 1}, 3, {"b": 2}]))
    pq.write_table(pa.table({"c": list(range(25))}), str(d / "c.parquet"), row_group_size=7)
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write('{"d": 1}\n\n{"d": 2\n')
    return open_input(str(d))


def _by_fragments(src, target):
    got, index, line = [], 0, {}
    for f in fragments(src, target_bytes=target):
        rows, n = read_fragment(src, f)
        got += place(src, f, rows, index, line.get(f.file, 0))
        index += len(rows)
        line[f.file] = line.get(f.file, 0) + n
    return got


@pytest.mark.parametrize("target", [1, 17, 100, 1 << 20])
def test_fragments_give_the_rows_of_iter_rows(src, target):
    want = [r for b in src.iter_rows(batch_size=5) for r in b]
    assert sum(r.error is not None for r in want) == 4
    assert _by_fragments(src, target) == want


def test_fragment_kinds(src):
    kinds = [f.kind for f in fragments(src, target_bytes=1 << 20)]
    assert kinds == ["jsonl", "json", "parquet", "parquet", "parquet", "parquet", "jsonl"]
    assert fragments(src, target_bytes=1 << 20)[-1].end == -1          # compressed: whole
