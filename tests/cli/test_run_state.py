"""The run's on-disk state (duplicates, resume sets, row records with typed kept values), and that a
`run`'s memory does not grow with its input."""

import datetime
import decimal
import gc
import json
import os
import sys
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import EchoEngine, read_error_rows, read_outputs, write_jsonl  # noqa: E402

from batchv4.io.rows import RowRequest  # noqa: E402
from batchv4.pipelines.run_state import RunState  # noqa: E402


def test_seen_marks_duplicates_including_lone_surrogates():
    with RunState() as st:
        ids = ["a", "b", "a", "\ud800x", "c", "\ud800x", "b"]
        assert [st.seen(i) for i in ids] == [False, False, True, False, False, True, True]


def test_done_sets_from_an_earlier_invocation():
    with RunState() as st:
        st.add_done([("r1", "h1"), ("r2", "h2"), ("r1", "h1")])
        st.add_done_errors([(3, "k3"), (7, "k7")])
        assert st.is_done("r1", "h1") and st.is_done("r2", "h2")
        assert not st.is_done("r1", "h2") and not st.is_done("r3", "h1")   # new content: generate again
        assert st.is_done_error(7, "k7") and not st.is_done_error(4, "k7") and not st.is_done_error(3, "other")


def test_stale_rows_are_what_was_read_with_other_content():
    with RunState() as st:
        st.add_done([("a", "h1"), ("b", "h2"), ("c", "h3"), ("d", "h4")])
        st.add_done_errors([(5, "k5"), (6, "k6"), (9, "k9")])
        for i in ("a", "b", "c"):
            st.seen(i)
        assert st.is_done("a", "h1") and not st.is_done("b", "changed")   # b was edited; c became an error
        assert st.is_done_error(5, "k5") and not st.is_done_error(6, "edited")
        # read up to row 8 (a --limit): d was not read, row 9 not reached: both stay
        assert st.stale(False, 8) == (2, 1)
        assert st.is_stale("b", "h2") and st.is_stale("c", "h3") and not st.is_stale("a", "h1")
        assert not st.is_stale("d", "h4") and st.is_stale_error(6, "k6") and not st.is_stale_error(9, "k9")
        # the whole input was read: what it no longer holds is stale too
        assert st.stale(True, 8) == (3, 2)
        assert st.is_stale("d", "h4") and st.is_stale_error(9, "k9")


def test_records_round_trip_with_typed_kept_values():
    kept = [pa.field("ts", pa.timestamp("us", tz="UTC")), pa.field("day", pa.date32()),
            pa.field("amount", pa.decimal128(10, 2)), pa.field("blob", pa.binary()),
            pa.field("tags", pa.list_(pa.struct([("k", pa.string()), ("v", pa.int64())]))),
            pa.field("note", pa.string())]
    keeps = [
        {"ts": datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc), "day": datetime.date(2026, 1, 2),
         "amount": decimal.Decimal("12.34"), "blob": b"\x00\xff", "tags": [{"k": "a", "v": 1}], "note": "x"},
        {"ts": None, "day": None, "amount": None, "blob": None, "tags": None, "note": None},
    ]
    from batchv4.engine.sampling_params import SamplingParams

    rows = [(RowRequest(i, f"id{i}", [{"role": "user", "content": f"q{i} \ud800"}], {"temperature": 0.5}, k, f"h{i}"),
             SamplingParams(temperature=0.5, stop=["x"], n=i + 1), bool(i)) for i, k in enumerate(keeps)]
    with RunState(kept) as st:
        folder = st.dir
        st.put(rows)
        for req, over, thinking in reversed(rows):
            assert st.get(req.id) == (req, over, thinking)
        with pytest.raises(KeyError):
            st.get("missing")
    assert not os.path.exists(folder)          # the state and the planner's spill go with it


def test_records_without_kept_columns():
    with RunState() as st:
        from batchv4.engine.sampling_params import SamplingParams

        req = RowRequest(5, "only", [{"role": "user", "content": "hi"}], {}, {}, "h")
        st.put([(req, SamplingParams(), False)])
        assert st.get("only") == (req, SamplingParams(), False)


def _prompt(i: int) -> str:
    doc = " ".join(f"word{(i // 4 * 7 + k) % 97}" for k in range(150))     # 4 questions per document
    return f"Document: {doc}\nQuestion {i}: what does it say about word{i % 89}?"


def _peak_of_run(tmp_path, n: int, trace: bool = True) -> int:
    """Peak Python-heap bytes (tracemalloc) of a whole `run` of n rows on the engine stand-in."""
    from batchv4.pipelines.run import RunConfig, run

    path = write_jsonl(tmp_path / f"in-{n}.jsonl", [{"id": f"r{i}", "prompt": _prompt(i), "tag": i} for i in range(n)])
    cfg = RunConfig(input=path, output=str(tmp_path / f"out-{n}"), quiet=True, max_tokens=2,
                    keep_columns=("tag",), read_batch_rows=64, part_rows=64)
    gc.collect()
    if trace:
        tracemalloc.start()
    try:
        res = run(cfg, llm_factory=lambda c: EchoEngine())
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        tracemalloc.stop()
    assert res["counts"]["output_rows"] == n
    return peak


def small_packing(monkeypatch, window_rows: int = 64) -> None:
    """`run`'s planner with its in-memory sizes cut to a few dozen rows."""
    import batchv4.packing as packing
    from batchv4.packing import PackConfig

    real = packing.plan

    def plan(items, spill_dir=None):
        return real(items, config=PackConfig(window_rows=window_rows, sort_rows=128, spill_buffer_rows=64,
                                             n_buckets=8, spill_dir=spill_dir))

    monkeypatch.setattr(packing, "plan", plan)


def test_run_memory_does_not_grow_with_the_input(tmp_path, monkeypatch):
    """Python-heap peak of a whole `run` (engine stand-in, the planner's buffers cut to 64 rows so
    both sizes spill) at 400 and 1,600 rows. Holding every row until the engine starts (the
    list-based path did; so does a planner window that takes all rows) grows it about 3x."""
    small_packing(monkeypatch)
    _peak_of_run(tmp_path, 40, trace=False)    # warm-up untraced: imports, tokenizer, price table
    small, big = _peak_of_run(tmp_path, 400), _peak_of_run(tmp_path, 1600)
    assert big < 1.3 * small, (small, big)
    rows = read_outputs(str(tmp_path / "out-1600"))
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(1600))
    assert {r["id"]: r["tag"] for r in rows} == {f"r{i}": i for i in range(1600)}   # JSONL ints stay ints


def test_parquet_kept_values_keep_their_types(tmp_path, monkeypatch):
    """Kept Parquet columns go through the on-disk records and come back with their Arrow types."""
    from batchv4.pipelines.run import RunConfig, run

    ts = [datetime.datetime(2026, 3, 1, 12, i, tzinfo=datetime.timezone.utc) for i in range(6)]
    table = pa.table({"id": [f"p{i}" for i in range(6)], "prompt": [f"Say {i}." for i in range(6)],
                      "when": pa.array(ts, pa.timestamp("ms", tz="UTC")),
                      "meta": pa.array([{"n": i, "xs": [i, i + 1]} for i in range(6)])})
    pq.write_table(table, tmp_path / "in.parquet")
    run(RunConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), quiet=True, max_tokens=2,
                  keep_columns=("when", "meta")), llm_factory=lambda c: EchoEngine())
    got = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert got.schema.field("when").type == pa.timestamp("ms", tz="UTC")
    assert got.schema.field("meta").type == table.schema.field("meta").type
    by_id = {r["id"]: r for r in got.to_pylist()}
    assert [by_id[f"p{i}"]["when"] for i in range(6)] == ts
    assert [by_id[f"p{i}"]["meta"] for i in range(6)] == [{"n": i, "xs": [i, i + 1]} for i in range(6)]
    assert read_error_rows(str(tmp_path / "out")) == []
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["output_rows"] == 6


def test_folders_of_killed_runs_are_swept(tmp_path):
    """A run killed with SIGKILL cannot remove its scratch folder; the next run removes folders
    whose process is gone, and leaves live ones and foreign folders alone."""
    import subprocess

    from batchv4.pipelines.run_state import sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "batchv4-run-stale"
    stale.mkdir()
    (stale / "pid").write_text(str(dead.pid))
    (stale / "state.sqlite").write_bytes(b"x" * 100)
    live = tmp_path / "batchv4-run-live"
    live.mkdir()
    (live / "pid").write_text(str(os.getpid()))
    young = tmp_path / "batchv4-run-young"             # just created, pid file not written yet
    young.mkdir()
    old = tmp_path / "batchv4-run-old"                 # from a version without pid files
    old.mkdir()
    os.utime(old, (os.path.getatime(old) - 3600, os.path.getmtime(old) - 3600))
    with RunState(parent=str(tmp_path)) as st:
        assert not stale.exists() and not old.exists() and live.exists() and young.exists()
        assert (tmp_path / os.path.basename(st.dir) / "pid").read_text() == str(os.getpid())
        assert sweep_stale(str(tmp_path)) == []          # its own folder is alive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchv4-run-live", "batchv4-run-young"]
