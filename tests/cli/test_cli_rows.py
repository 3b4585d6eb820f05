"""Every input row ends up exactly once, in the outputs or the error rows; user errors are one-line
`Error: ...` messages with a non-zero exit, raised before any work starts."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import fast_engine, read_error_rows, read_outputs, run_main, write_jsonl  # noqa: E402,F401


LONG = "word " * 300   # about 300 tokens: over a 128-token context
BAD_LINES = [
    {"id": "ok-0", "prompt": "Name a colour."},
    b'{"id": "broken", "prompt": "no closing brace"',                      # malformed JSON
    {"id": "no-prompt"},                                                   # missing prompt
    {"id": "null-prompt", "prompt": None},                                 # null prompt
    {"id": "int-prompt", "prompt": 42},                                    # wrong type
    {"id": ["list-id"], "prompt": "hi"},                                   # wrong id type
    b'{"id": "latin1", "prompt": "caf\xe9"}',                              # not UTF-8
    b'["an", "array"]',                                                    # not an object
    {"id": "too-long", "prompt": LONG},                                    # longer than the context
    {"id": "ok-0", "prompt": "Name another colour."},                      # duplicate id
    {"id": "empty", "prompt": "   "},                                      # empty prompt
    {"id": "ok-1", "prompt": "Name a fruit."},
    {"id": "msgs", "prompt": "Name a tree.", "extra": {"nested": True}},
]


def assert_exactly_once(out, n_rows, ids_by_index):
    rows, errors = read_outputs(out), read_error_rows(out)
    out_idx = [ids_by_index[r["id"]] for r in rows]
    err_idx = [e["row_index"] for e in errors]
    assert sorted(out_idx + err_idx) == list(range(n_rows)), (out_idx, err_idx)
    assert all(e["error"] and "\n" not in e["error"] for e in errors)
    return rows, {e["row_index"]: e for e in errors}


def test_bad_rows_become_error_rows_once(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    out = str(tmp_path / "out")
    code, stdout, err = run_main(["run", src, "-o", out, "--max-tokens", "4", "--max-model-len", "128", "--quiet"],
                                 capsys)
    # --quiet: no bars, no table; the error rows are still counted on stderr
    assert code == 0 and stdout == "" and err.startswith("10 error row(s) this run") and err.count("\n") == 1, err
    ids = {"ok-0": 0, "ok-1": 11, "msgs": 12}
    rows, errors = assert_exactly_once(out, len(BAD_LINES), ids)
    assert sorted(r["id"] for r in rows) == ["msgs", "ok-0", "ok-1"]
    assert "invalid JSON" in errors[1]["error"] and errors[1]["id"] is None and "no closing brace" in errors[1]["raw"]
    assert "missing or null" in errors[2]["error"] and "missing or null" in errors[3]["error"]
    assert "expected a string" in errors[4]["error"]
    assert "id column 'id'" in errors[5]["error"]
    assert "invalid UTF-8" in errors[6]["error"] and errors[6]["raw"].startswith('{"id": "latin1"')
    assert "expected a JSON object" in errors[7]["error"]
    assert "exceeds the model's context of 128" in errors[8]["error"] and errors[8]["id"] == "too-long"
    assert errors[9]["error"] == "duplicate id 'ok-0'" and "another colour" in errors[9]["raw"]
    assert "empty prompt" in errors[10]["error"]
    # a second run of the same command has nothing left to do: no engine, no new rows
    built = len(fast_engine)
    code, _, err = run_main(["run", src, "-o", out, "--max-tokens", "4", "--max-model-len", "128", "--quiet"], capsys)
    assert code == 0, err
    assert len(fast_engine) == built
    assert_exactly_once(out, len(BAD_LINES), ids)


def test_template_with_a_column_missing_from_some_rows(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"topic": "rain", "style": "haiku"}, {"topic": "sea"},
                                              {"topic": "cats", "style": None}, {"topic": "snow", "style": "ode"}])
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, "--template", "Write a {style} about {topic}.",
                             "--max-tokens", "2", "--quiet"], capsys)
    assert code == 0, err
    rows, errors = assert_exactly_once(out, 4, {"0": 0, "1": 1, "2": 2, "3": 3})
    assert sorted(errors) == [1, 2]
    assert "'style' is missing" in errors[1]["error"] and "'style' is null" in errors[2]["error"]


def test_parquet_wrong_types_and_duplicates(tmp_path, capsys, fast_engine):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "a", None], "messages": [
        [{"role": "user", "content": "Hello"}], [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]}), src)
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, "--max-tokens", "2", "--quiet"], capsys)
    assert code == 0, err
    rows, errors = assert_exactly_once(out, 4, {"a": 0})
    assert "unsupported role 'robot'" in errors[1]["error"]
    assert errors[2]["error"] == "duplicate id 'a'" and json.loads(errors[2]["raw"])["id"] == "a"
    assert "missing or null" in errors[3]["error"]


@pytest.mark.parametrize("args,message", [
    (["--prompt-column", "question"], "column 'question' (from --prompt-column) is not in the input; "
                                      "available columns: id, prompt, lang"),
    (["--keep-columns", "lang,topic"], "column 'topic' (from --keep-column) is not in the input"),
    (["--template", "Q: {q}"], "column 'q' (from --template) is not in the input"),
    (["--id-column", "key"], "column 'key' (from --id-column) is not in the input"),
    (["--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--price", "nope"], "unknown price card 'nope'"),
    (["--kv-cache-memory", "lots"], "kv_cache_memory: cannot read 'lots'"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
])
def test_user_errors_before_any_work(tmp_path, capsys, fast_engine, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "prompt": "p", "lang": "en"}])
    out = tmp_path / "out"
    code, stdout, err = run_main(["run", src, "-o", str(out), "--quiet", *args], capsys)
    assert code == 1 and stdout == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and fast_engine == []


def test_unwritable_output_is_reported_before_any_work(tmp_path, capsys, fast_engine, monkeypatch):
    import batchv4.tokenizer

    def no_tokenizer(*a, **k):
        raise AssertionError("the input was tokenized before the output was checked")

    monkeypatch.setattr(batchv4.tokenizer, "load_tokenizer", no_tokenizer)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_main(["run", src, "-o", str(tmp_path / "file" / "out"), "--quiet"], capsys)
    assert code == 1 and err.startswith("Error: cannot claim output folder ") and "Not a directory" in err
    assert err.count("\n") == 1
    assert fast_engine == []


def test_error_message_from_the_console_script(tmp_path):
    """The installed `batchv4` entry point: one line on stderr, exit 1, no traceback, nothing written."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "text": "p"}])
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "batchv4")
    p = subprocess.run([exe, "run", src, "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == ("Error: no prompt column: pass --prompt-column, --messages-column or --template; "
                        "available columns: id, text\n")
    assert not out.exists()
