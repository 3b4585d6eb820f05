"""`batchv4 generate`: dedup (exact and near, against earlier nights), the nightly layout read as one
dataset, reproducibility, resume after kill -9, and a second night with the same seeds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import polars as pl
import pyarrow.dataset as ds

from batchv4.pipelines.dedup import Deduper, dedup

WORDS = "river stone cloud amber falcon meadow lantern copper willow harbor ember quartz".split()


def sentence(rng, n=30):
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n))


def test_planted_exact_and_near_duplicates_are_all_found_and_no_unique_row_is_dropped():
    """300 unique sentences of 30 words, 40 exact copies (case and whitespace changed) and 40 near
    copies (one word replaced), shuffled: in each family (a sentence and its copies) exactly the
    first one seen is kept and every other is dropped as a duplicate of that family; exact copies
    of a kept row are found as exact."""
    rng = random.Random(0)
    uniques = [sentence(rng) for _ in range(300)]
    items, family = [], {}
    for i, u in enumerate(uniques):
        items.append((f"u{i}", u))
        family[f"u{i}"] = i
    for j in range(40):
        src = rng.randrange(300)
        items.append((f"e{j}", "  " + uniques[src].upper().replace(" ", "   ") + "\n"))
        family[f"e{j}"] = src
    for j in range(40):
        src = rng.randrange(300)
        words = uniques[src].split()
        words[rng.randrange(len(words))] = "zzz"
        items.append((f"n{j}", " ".join(words)))
        family[f"n{j}"] = src
    rng.shuffle(items)
    decisions = [d for d, _, _ in dedup(items, threshold=0.7)]
    kept_of: dict[int, str] = {}
    for d in decisions:
        f = family[d.key]
        if f not in kept_of:
            assert d.kind is None, d                     # the first of a family is kept
            kept_of[f] = d.key
        else:
            assert d.kind is not None and family[d.duplicate_of] == f, d
            if d.key.startswith("e") and kept_of[f].startswith("u"):
                assert d.kind == "exact", d
    assert len(kept_of) == 300 and sum(d.kind is None for d in decisions) == 300


def test_references_from_an_earlier_night():
    rng = random.Random(1)
    a, b = sentence(rng), sentence(rng)
    first = Deduper(0.8)
    (dec, h, sig), = [first.decide("old", a)]
    second = Deduper(0.8)
    second.add_reference("old", h, [int(x) for x in sig])
    assert second.decide("x", a)[0].kind == "exact"
    assert second.decide("y", b)[0].kind is None


def _cli(*args, **kw):
    return [sys.executable, "-m", "batchv4", "generate", *args]


def _seeds(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "topic": ["cats", "rivers", "stars"][i % 3], "k": i}) + "\n")


ARGS = ["--template", "Write one line about {topic} (seed {k}).", "-n", "2", "--max-tokens", "6", "--quiet"]


def _table(out):
    return pl.scan_parquet(os.path.join(out, "*=*", "part-*.parquet"), hive_partitioning=True).collect()


def test_nightly_layout_reproducible_resume_and_second_night(tmp_path):
    seeds = str(tmp_path / "seeds.jsonl")
    _seeds(seeds)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    # greedy: the two samples of a seed are identical, so every sample 1 is an exact duplicate
    greedy = [*ARGS, "--temperature", "0", "--partition", "date=2026-12-01"]
    p = subprocess.run(_cli(seeds, "-o", ref, *greedy), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    t = _table(ref)
    assert len(t) == 6 and set(t["sample_index"]) == {0} and {str(d) for d in t["date"]} == {"2026-12-01"}
    dropped = pl.read_parquet(os.path.join(ref, "_dropped", "date=2026-12-01.parquet"))
    assert sorted(dropped["id"]) == sorted(t["id"]) and set(dropped["duplicate_kind"]) == {"exact"}
    assert (dropped["duplicate_of_id"] == dropped["id"]).all()
    # a night killed (kill -9) in the middle, then run again, equals the uninterrupted night
    proc = subprocess.Popen(_cli(seeds, "-o", out, *greedy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = os.path.join(out, "_runs", "date=2026-12-01")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not os.path.exists(os.path.join(run_dir, "_batchv4.lock")):
        time.sleep(0.05)
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = subprocess.run(_cli(seeds, "-o", out, *greedy), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    cols = ["id", "sample_index", "output"]
    assert _table(out).select(cols).sort("id").equals(t.select(cols).sort("id"))
    # the same command again: nothing new, the same dataset
    p = subprocess.run(_cli(seeds, "-o", out, *greedy), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and " 0 seeds done on other nights" in p.stdout
    assert _table(out).select(cols).sort("id").equals(t.select(cols).sort("id"))
    # a second night with the same seeds generates nothing new
    p = subprocess.run(_cli(seeds, "-o", out, *[a if a != "date=2026-12-01" else "date=2026-12-02" for a in greedy]),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "0 generated" in p.stdout and "6 seeds done on other nights" in p.stdout
    # one dataset for pyarrow (hive) and polars; partition folders hold only parts
    table = ds.dataset(out, partitioning="hive", exclude_invalid_files=True).to_table()
    assert table.num_rows == 6 and "date" in table.column_names
    for night in ("date=2026-12-01", "date=2026-12-02"):
        assert os.listdir(os.path.join(out, night)) == ["part-00000.parquet"]
    card = open(os.path.join(out, "README.md")).read()
    assert "date=2026-12-01 | 12 | 6 | 6 | 0" in card and "date=2026-12-02 | 0 | 0" in card


def test_sampled_is_reproducible_and_partition_names_are_checked(tmp_path):
    seeds = str(tmp_path / "seeds.jsonl")
    _seeds(seeds, n=3)
    a = subprocess.run(_cli(seeds, "-o", str(tmp_path / "a"), *ARGS, "--seed", "7"), capture_output=True, text=True)
    b = subprocess.run(_cli(seeds, "-o", str(tmp_path / "b"), *ARGS, "--seed", "7"), capture_output=True, text=True)
    assert a.returncode == b.returncode == 0, a.stderr[-2000:]
    cols = ["id", "sample_index", "output"]
    assert _table(str(tmp_path / "a")).select(cols).sort(cols[:2]).equals(
        _table(str(tmp_path / "b")).select(cols).sort(cols[:2]))
    bad = subprocess.run(_cli(seeds, "-o", str(tmp_path / "c"), *ARGS, "--partition", "../x=1"),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "--partition" in bad.stderr and bad.stderr.count("\n") == 1
