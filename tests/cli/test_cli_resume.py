"""Resume: a run killed with SIGKILL at several points and run again gives the outputs of an
uninterrupted run, no row twice, none lost; a different configuration is refused without --overwrite."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import (  # noqa: E402
    CLI_WITH_TEST_ENGINE,
    fast_engine,  # noqa: F401  (fixture)
    read_error_rows,
    read_outputs,
    run_main,
    write_jsonl,
)

from batchv4.cli import cli  # noqa: E402


# what must not depend on where the run was killed (cache-hit split and cost may: the cache starts cold)
SAME = ("id", "sample_index", "output", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens",
        "reasoning_tokens", "content_hash")
TOPICS = ["rain", "the sea", "a cat", "snow", "the moon", "bread", "a river", "autumn", "a bridge", "tea",
          "a clock", "wind", "a lighthouse", "salt"]


def make_input(tmp_path):
    lines = []
    for i, t in enumerate(TOPICS):
        lines.append({"id": f"r{i}", "prompt": f"You are a poet. Write one line about {t}."})
        if i == 3:
            lines.append(b'{"id": "bad", ')
        if i == 7:
            lines.append({"id": "long", "prompt": "very " * 120 + "long"})
        if i == 9:
            lines.append({"id": "r2", "prompt": "a duplicate id"})
        if i == 11:
            lines.append({"id": "none", "prompt": None})
    return write_jsonl(tmp_path / "in.jsonl", lines), len(lines)


ARGS = ["--max-tokens", "6", "--temperature", "0.8", "--seed", "7", "--part-rows", "2", "--max-num-seqs", "2",
        "--max-model-len", "100", "--quiet"]


def snapshot(out):
    rows = read_outputs(out)
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    errors = read_error_rows(out)
    idx = [e["row_index"] for e in errors]
    assert len(idx) == len(set(idx)), "an error row was written twice"
    return (sorted(tuple(r[k] for k in SAME) for r in rows),
            sorted((e["row_index"], e["id"], e["error"]) for e in errors))


def parts_listed(out):
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return 0
    return len(m["parts"]) + len(m["error_parts"])


def start(src, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_TEST_ENGINE, "run", src, "-o", out, *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(proc, ready, timeout=90):
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.communicate()[1].decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_runs_resume_to_the_uninterrupted_outputs(tmp_path, capsys, fast_engine):
    src, n_lines = make_input(tmp_path)
    ref = str(tmp_path / "ref")
    code, _, err = run_main(["run", src, "-o", ref, *ARGS], capsys)
    assert code == 0, err
    expected = snapshot(ref)
    assert len(expected[0]) == len(TOPICS) and len(expected[1]) == n_lines - len(TOPICS)
    assert {e[1] for e in expected[1]} == {None, "long", "r2", "none"}

    out = str(tmp_path / "out")
    # 1: killed while starting (importing, reading, tokenizing, building the engine)
    p = start(src, out)
    time.sleep(1.0)
    kill_when(p, lambda: True)
    # 2: killed right after its first part is listed
    p = start(src, out)
    kill_when(p, lambda: parts_listed(out) >= 1)
    first = parts_listed(out)
    partial = CliRunner().invoke(cli, ["report", out, "--json"])
    assert partial.exit_code == 0 and json.loads(partial.output)["complete"] is False
    # 3: resumed, killed again two parts later
    p = start(src, out)
    kill_when(p, lambda: parts_listed(out) >= first + 2)
    killed_rows, killed_errors = snapshot(out)
    assert 0 < len(killed_rows) < len(TOPICS)
    # 4: resumed to the end
    p = start(src, out)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr.decode()[-3000:]
    assert snapshot(out) == expected
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["counts"]["output_rows"] == len(TOPICS) and s["counts"]["error_rows"] == n_lines - len(TOPICS)
    # the last invocation computed only what the killed ones had not finished
    assert s["counts"]["skipped_done"] >= len(killed_rows) + len(killed_errors)


def test_a_different_config_is_refused_unless_overwrite(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Line about {t}."} for t in TOPICS[:3]])
    out = tmp_path / "out"
    base = ["run", src, "-o", str(out), "--quiet", "--part-rows", "1"]
    assert run_main([*base, "--max-tokens", "3"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = sorted(os.listdir(out))
    code, _, err = run_main([*base, "--max-tokens", "4"], capsys)
    assert code == 1 and "holds a run with a different configuration" in err and "--overwrite" in err
    assert err.count("\n") == 1 and sorted(os.listdir(out)) == before
    # the same config resumes (nothing to do, no engine); --overwrite recomputes from scratch
    built = len(fast_engine)
    assert run_main([*base, "--max-tokens", "3"], capsys)[0] == 0 and len(fast_engine) == built
    assert run_main([*base, "--max-tokens", "4", "--overwrite"], capsys)[0] == 0 and len(fast_engine) == built + 1
    rows = read_outputs(str(out))
    assert len(rows) == 3 and all(r["completion_tokens"] <= 4 for r in rows)
    assert sorted(os.listdir(out)) == ["_batchv4.json", "manifest.json", "notes.txt", "part-00000.parquet", "part-00001.parquet",
                                       "part-00002.parquet", "summary.json"]
    with open(out / "summary.json") as f:
        assert json.load(f)["config"]["max_tokens"] == 4
    assert run_main([*base, "--max-tokens", "4", "--overwrite"], capsys)[0] == 0 and len(fast_engine) == built + 2
    assert len(read_outputs(str(out))) == 3
