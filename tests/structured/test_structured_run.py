"""Structured outputs through `batchv4 run`: --json-schema / --choice for every row, an OpenAI batch
body's own response_format, `valid` and `parsed`, and a schema that cannot compile as an error row."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import polars as pl

from batchv4.pipelines.run import RunConfig, run

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 5}},
          "required": ["answer", "score"], "additionalProperties": False}


def parts(folder, kind="part"):
    import glob

    files = sorted(glob.glob(f"{folder}/{kind}-*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def test_run_with_a_json_schema_and_openai_bodies(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Is {i} small?"}) + "\n")
    run(RunConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), max_tokens=40, quiet=True,
                  json_schema=json.dumps(SCHEMA), temperature=0.8))
    out = parts(tmp_path / "out")
    assert len(out) == 3 and out["valid"].all()
    for p in out["parsed"]:
        jsonschema.validate(json.loads(p), SCHEMA)
    # OpenAI batch bodies: each row's own response_format; a schema that cannot compile fails its row
    bodies = [{"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
              {"response_format": {"type": "json_object"}},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {
                  "type": "object", "properties": {"x": {"type": "strin"}}}}}},
              {}]
    with open(tmp_path / "batch.jsonl", "w") as f:
        for i, b in enumerate(bodies):
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "max_tokens": 40, "temperature": 0,
                                         "messages": [{"role": "user", "content": f"row {i}"}], **b}}) + "\n")
    run(RunConfig(input=str(tmp_path / "batch.jsonl"), output=str(tmp_path / "batch"), quiet=True))
    out = parts(tmp_path / "batch").sort("id")
    assert out["id"].to_list() == ["c0", "c1", "c3"]
    valid, finish = out["valid"].to_list(), out["finish_reason"].to_list()
    assert valid[0] and valid[2] is None
    # any JSON object: the random model may run out of tokens inside it (length: not valid)
    assert valid[1] == (finish[1] == "stop")
    if valid[1]:
        assert isinstance(json.loads(out["parsed"][1]), dict)
    err = parts(tmp_path / "batch", "errors")
    assert err["id"].to_list() == ["c2"] and "strin" in err["error"][0]


def test_cli_options(tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "Pick a colour."}) + "\n")
    p = subprocess.run([sys.executable, "-m", "batchv4", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o"),
                        "--choice", "red,green", "--max-tokens", "6", "--quiet"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = parts(tmp_path / "o")
    assert out["output"][0] in ("red", "green") and out["valid"][0]
    p = subprocess.run([sys.executable, "-m", "batchv4", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o2"),
                        "--choice", "a,b", "--regex", "x+", "--quiet"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "--choice" in p.stderr
