"""Exactly once, whatever the input and however it changes between two runs.

A property test drives the whole pipeline (an engine stand-in in place of the model) over any mix of
good and bad rows, in JSONL and in Parquet, then edits the input (rows changed, dropped, inserted,
broken, fixed) and runs again into the same folder: every current input row is then in the outputs
or the error rows exactly once, with its current content, nothing stale, and `estimate` counts the
same rows. Then `kill -9` and resume on the real tiny model, on two fixed inputs, equal an
uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import EchoEngine, read_error_rows, read_outputs, write_jsonl  # noqa: E402

from batchv4.io.rows import content_hash  # noqa: E402

IDS = list("abcdefgh")
TEXTS = ["Name a colour.", "Name a fruit.", "Name a tree.", "Name a river."]

# a row: (kind, id, text); kinds: ok, null (prompt null), empty (blank prompt), broken (not JSON),
# surrogate (a lone surrogate escape in the prompt). Parquet cannot hold the last two.
JSONL_KINDS = ["ok", "ok", "ok", "null", "empty", "broken", "surrogate"]
PARQUET_KINDS = ["ok", "ok", "ok", "null", "empty"]


def row_st(kinds):
    return st.tuples(st.sampled_from(kinds), st.sampled_from(IDS), st.sampled_from(TEXTS))


def edits_st(kinds):
    """A second version of the rows: each row kept, changed, dropped or broken; new rows inserted."""
    op = st.sampled_from(["keep", "keep", "change", "drop", "break", "insert"])
    return st.lists(st.tuples(op, row_st(kinds)), max_size=12)


def apply(rows, ops):
    out = []
    for i, (op, new) in enumerate(ops):
        old = rows[i] if i < len(rows) else None
        if op == "insert" or old is None:
            out.append(new)
            if old is not None:
                out.append(old)
        elif op == "keep":
            out.append(old)
        elif op == "change":
            out.append((old[0], old[1], new[2] if new[2] != old[2] else old[2] + " Again."))
        elif op == "break":
            out.append((new[0] if new[0] != "ok" else "null", old[1], old[2]))
    return out + rows[len(ops):]


def write(path, rows, fmt):
    if fmt == "jsonl":
        lines = []
        for kind, rid, text in rows:
            if kind == "broken":
                lines.append(b'{"id": "' + rid.encode() + b'", "prompt": ')
            elif kind == "surrogate":
                lines.append(json.dumps({"id": rid, "prompt": text}).encode().replace(b'."', b' \\ud800."'))
            else:
                prompt = {"ok": text, "null": None, "empty": "  "}[kind]
                lines.append({"id": rid, "prompt": prompt})
        write_jsonl(path, lines)
    else:
        pq.write_table(pa.table({"id": [r[1] for r in rows],
                                 "prompt": [{"ok": r[2], "null": None, "empty": " "}[r[0]] for r in rows]}), path)


def expected(rows):
    """{id: content hash} of the rows that must have an output, and the row numbers of error rows:
    the first row with an id takes it, whatever it is (a later row with that id is a duplicate)."""
    outputs, errors, taken = {}, [], set()
    for i, (kind, rid, text) in enumerate(rows):
        if kind == "broken":
            errors.append(i)
            continue
        if rid in taken:
            errors.append(i)
            continue
        taken.add(rid)
        if kind == "ok":
            outputs[rid] = content_hash([{"role": "user", "content": text}], {})
        else:
            errors.append(i)
    return outputs, errors


def check_folder(out, rows):
    want_out, want_err = expected(rows)
    got = read_outputs(out)
    assert sorted((r["id"], r["content_hash"]) for r in got) == sorted(want_out.items())
    assert sorted(e["row_index"] for e in read_error_rows(out)) == want_err
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert (s["counts"]["output_rows"], s["counts"]["error_rows"]) == (len(want_out), len(want_err))


def one_job(tmp, fmt, v1, ops):
    from batchv4.pipelines.estimate import EstimateConfig, estimate
    from batchv4.pipelines.run import RunConfig, run

    src = os.path.join(tmp, f"in.{fmt}")
    out = os.path.join(tmp, "out")
    v2 = apply(v1, ops)
    for rows in (v1, v2):
        write(src, rows, fmt)
        if not rows:
            continue
        run(RunConfig(input=src, output=out, quiet=True, max_tokens=2, part_rows=3), llm_factory=lambda c: EchoEngine())
        check_folder(out, rows)
        est = estimate(EstimateConfig(input=src, max_tokens=2))
        want_out, want_err = expected(rows)
        assert (est["rows"], est["error_rows"], est["input_rows"]) == (len(want_out), len(want_err), len(rows))


SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def in_tmp(fmt, v1, ops):
    tmp = tempfile.mkdtemp(prefix="exactly-once-")
    try:
        one_job(tmp, fmt, v1, ops)
    finally:
        shutil.rmtree(tmp)


@SETTINGS
@given(v1=st.lists(row_st(JSONL_KINDS), min_size=1, max_size=10), ops=edits_st(JSONL_KINDS))
def test_jsonl_every_row_exactly_once_across_edits(v1, ops):
    in_tmp("jsonl", v1, ops)


@SETTINGS
@given(v1=st.lists(row_st(PARQUET_KINDS), min_size=1, max_size=10), ops=edits_st(PARQUET_KINDS))
def test_parquet_every_row_exactly_once_across_edits(v1, ops):
    in_tmp("parquet", v1, ops)


# ---- kill -9 and resume on the real tiny model ------------------------------------------------------
SAME = ("id", "sample_index", "output", "finish_reason", "prompt_tokens", "completion_tokens", "content_hash")
ARGS = ["--max-tokens", "4", "--temperature", "0.7", "--seed", "3", "--part-rows", "1", "--max-num-seqs", "1",
        "--max-model-len", "200", "--quiet"]


def fixed_inputs(tmp):
    """A JSONL file with bad lines and a Parquet folder whose rows mix prompt and messages."""
    jsonl = write_jsonl(os.path.join(tmp, "a.jsonl"), [
        {"id": "a0", "prompt": "Write one line about rain."}, b'{"id": "bad", ',
        {"id": "a1", "prompt": "Write one line about the sea."}, {"id": "a0", "prompt": "duplicate"},
        {"id": "a2", "prompt": "Write one line about snow."}, {"id": "a3", "prompt": "Write one line about tea."}])
    folder = os.path.join(tmp, "b")
    os.makedirs(folder)
    pq.write_table(pa.table({"id": ["b0", "b1", "b2"], "prompt": ["Name a bird.", None, "Name a tree."],
                             "messages": [None, [{"role": "user", "content": "Name a fish."}], None]}),
                   os.path.join(folder, "part-0.parquet"))
    pq.write_table(pa.table({"id": ["b3", "b4"], "prompt": ["Name a town.", None],
                             "messages": [None, None]}), os.path.join(folder, "part-1.parquet"))
    return [jsonl, folder]


def snapshot(out):
    rows, errors = read_outputs(out), read_error_rows(out)
    assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows)
    return sorted(tuple(r[k] for k in SAME) for r in rows), sorted((e["row_index"], e["error"]) for e in errors)


def cli(src, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "batchv4", "run", src, "-o", out, *ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def listed(out):
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return len(json.load(f)["parts"])
    except (OSError, ValueError):
        return 0


def test_kill_9_then_resume_on_the_tiny_model_equals_an_uninterrupted_run(tmp_path):
    """Two fixed inputs: each run by the CLI (default engine, `--model tiny`), killed with SIGKILL once
    its first part is listed, and run again; the uninterrupted references run in this process on
    one shared engine while the CLI runs go on."""
    import torch

    import batchv4.pipelines.run as run_mod
    from batchv4.pipelines.run import RunConfig

    srcs = fixed_inputs(str(tmp_path))
    outs = [str(tmp_path / f"out{i}") for i in range(2)]
    t0 = time.monotonic()
    for src, out in zip(srcs, outs):          # one at a time: a run left alone would finish
        p = cli(src, out)
        while listed(out) < 1:
            assert p.poll() is None, p.communicate()[1].decode()[-2000:]
            assert time.monotonic() - t0 < 240, "timed out waiting for a part"
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert all(1 <= len(snapshot(o)[0]) < 4 for o in outs)
    resumed = [cli(s, o) for s, o in zip(srcs, outs)]
    cfg = dict(max_tokens=4, temperature=0.7, seed=3, part_rows=1, max_num_seqs=1, max_model_len=200, quiet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = []

        def shared(c):
            if not engine:
                engine.append(run_mod._default_llm(c))
            return engine[0]

        refs = [str(tmp_path / f"ref{i}") for i in range(2)]
        for s, r in zip(srcs, refs):
            run_mod.run(RunConfig(input=s, output=r, **cfg), llm_factory=shared)
    finally:
        torch.set_num_threads(threads)
    for p in resumed:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    for ref, out in zip(refs, outs):
        assert snapshot(out) == snapshot(ref)
    assert len(snapshot(refs[0])[0]) == 4 and len(snapshot(refs[1])[0]) == 4
