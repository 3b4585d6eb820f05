"""`--executor ray` on a local Ray cluster (one per module, 2 CPUs) with the tiny model: the same
rows as a local run, every prefix group on one replica, the same prefill, a killed replica retried
without a row lost or duplicated, and a killed job that finishes when run again."""

import json
import logging
import os

import pytest

ray = pytest.importorskip("ray")

from batchv4.io.writers import read_errors, read_manifest, read_output_parts  # noqa: E402
from batchv4.pipelines.run import RunConfig, run  # noqa: E402

DOCS = ["The Rhine rises in the Swiss Alps, flows through Lake Constance and reaches the North Sea in the "
        "Netherlands; its basin is home to about sixty million people. ",
        "Honeybees communicate the direction and distance of flowers with a waggle dance performed on the "
        "vertical comb inside the dark hive. ",
        "The Antikythera mechanism is an ancient Greek hand-powered orrery used to predict astronomical "
        "positions and eclipses decades in advance. "]
QUESTIONS = ["Summarize it.", "Give a title.", "List three facts.", "Who would care?"]
# outputs and usage; not times, nor what depends on how rows are cut into parts (amortized cost)
SAME = ["output", "finish_reason", "prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens",
        "completion_tokens", "api_cache_hit_tokens", "cost_usd", "content_hash"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    lines = [json.dumps({"id": f"d{i}q{j}", "prompt": doc + q}) for i, doc in enumerate(DOCS)
             for j, q in enumerate(QUESTIONS)]
    lines.insert(5, "{not json")                     # a bad line: an error row, in both executors
    path = d / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def config(src, out, **kw):
    base = dict(input=src, output=str(out), model="tiny", device="cpu", max_tokens=5, kv_cache_memory="64MiB",
                quiet=True)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    summary = run(config(data, out))
    return summary, rows_of(out), errors_of(out)


def rows_of(out):
    t = read_output_parts(str(out)).to_pylist()
    return {(r["id"], r["sample_index"]): r for r in t}


def errors_of(out):
    return sorted((r["row_index"], r["error"], r["raw"]) for r in read_errors(str(out)).to_pylist())


def assert_same_rows(out, local, same=SAME):
    t = read_output_parts(str(out)).to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in t]
    assert len(keys) == len(set(keys)), "a row was written twice"
    got = {k: r for k, r in zip(keys, t)}
    assert got.keys() == local[1].keys()
    for k, r in local[1].items():
        assert {c: got[k][c] for c in same} == {c: r[c] for c in same}, k
    assert errors_of(out) == local[2]


def test_two_replicas_give_the_local_rows_prefill_and_groups(cluster, data, local, tmp_path, monkeypatch):
    from batchv4.pipelines import ray_tasks
    from batchv4.pipelines.ray_executor import run_ray

    monkeypatch.setattr(ray_tasks.ReadTasks, "FRAGMENT_BYTES", 400)
    out = tmp_path / "ray"
    summary = run_ray(config(data, out, executor="ray", replicas=2, read_batch_rows=3))
    assert_same_rows(out, local)        # the bad line's error (its line number) included
    # the input was read by Ray tasks in byte ranges of 400, and its 13 lines built and tokenized
    # in Ray tasks, three rows each
    assert summary["this_run"]["read_tasks"] == -(-os.path.getsize(data) // 400) >= 4
    assert summary["this_run"]["front_end_tasks"] == 5
    for c in ("amortized",):            # one part per replica chunk here, as locally: the same too
        assert {k: r[f"cost_usd_{c}"] for k, r in rows_of(out).items()} == \
            {k: r[f"cost_usd_{c}"] for k, r in local[1].items()}
    assert summary["this_run"]["prefill_tokens_computed"] == local[0]["this_run"]["prefill_tokens_computed"]
    assert summary["counts"]["output_rows"] == 12 and summary["counts"]["error_rows"] == 1
    # every prefix group ran on one replica, and both replicas ran some
    manifest = read_manifest(str(out))
    where: dict[int, set] = {}
    for e in manifest["parts"]:
        for g in e["groups"]:
            where.setdefault(g, set()).add(e["replica"])
    assert len(where) == len(DOCS) and all(len(v) == 1 for v in where.values())
    assert {e["replica"] for e in manifest["parts"]} == {0, 1}
    assert set(summary["this_run"]["replicas"]) == {"0", "1"}
    # the same folder run again: nothing left to do
    again = run_ray(config(data, out, executor="ray", replicas=2))
    assert again["counts"]["skipped_done"] == 13 and again["counts"]["new_output_rows"] == 0
    assert_same_rows(out, local)


def slow_engine(seconds=0.3):
    """An llm_factory whose engine waits after each finished row, so a kill lands mid-chunk
    (defined in a function: Ray's cloudpickle then ships it by value to the actors)."""
    def factory(cfg):
        import time

        from batchv4.pipelines.run import _default_llm

        class Slow:
            def __init__(self, llm):
                self.llm = llm

            def generate_stream(self, requests):
                for out in self.llm.generate_stream(requests):
                    time.sleep(seconds)
                    yield out

            def stats(self):
                return self.llm.stats()

        return Slow(_default_llm(cfg))
    return factory


def test_a_killed_replica_is_retried_without_losing_or_repeating_a_row(cluster, data, local, tmp_path):
    from batchv4.pipelines.ray_executor import run_ray

    killed = []

    def kill_once(r, actor, ev):
        if r == 0 and not killed:
            killed.append(ev["entry"]["file"])   # the actor is busy: a call to it would wait
            ray.kill(actor, no_restart=False)       # Ray restarts it; its chunk's unlisted rows are redone

    out = tmp_path / "ray"
    summary = run_ray(config(data, out, executor="ray", replicas=2, part_rows=1), slow_engine(), on_event=kill_once)
    assert killed and summary["counts"]["replica_retries"] >= 1
    # a redone row whose group's first rows were listed before the kill computed the shared prefix
    # again: its engine hits are its own; all else (outputs, API hits, cost) is the local run's
    assert_same_rows(out, local, [c for c in SAME if not c.startswith("prompt_cache_")])
    assert summary["counts"]["output_rows"] == 12


def test_a_killed_job_run_again_finishes_as_an_uninterrupted_one(cluster, data, local, tmp_path):
    from batchv4.pipelines.ray_executor import run_ray

    seen = []

    def die(r, actor, ev):
        seen.append(ev)
        if len(seen) == 3:
            raise KeyboardInterrupt         # the driver stops, as on Ctrl-C; actors go with it

    out = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt):
        run_ray(config(data, out, executor="ray", replicas=2, part_rows=1), slow_engine(), on_event=die)
    listed = read_manifest(str(out))["rows"]
    assert 3 <= listed < 12
    summary = run_ray(config(data, out, executor="ray", replicas=2, part_rows=1))
    assert summary["counts"]["skipped_done"] >= listed
    assert_same_rows(out, local, [c for c in SAME if not c.startswith("prompt_cache_")])


def _listed(out) -> int:
    try:
        return read_manifest(str(out))["rows"]
    except Exception:          # not written yet, or being replaced
        return 0


def test_the_driver_killed_by_sigkill_then_the_same_command_finishes(cluster, data, local, tmp_path):
    """A second driver process (the CLI, connected to this cluster with --address) is killed with
    SIGKILL once some rows are listed; its actors die with it; the same command run again finishes
    with every row exactly once, equal to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ray"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "batchv4", "run", data, "-o", str(out), "--model", "tiny", "--device", "cpu",
           "--max-tokens", "5", "--kv-cache-memory", "64MiB", "--quiet", "--part-rows", "1", "--max-num-seqs", "1",
           "--executor", "ray", "--address", address, "--replicas", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while _listed(out) < 2:
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() - t0 < 180, "timed out waiting for the first parts"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    listed = _listed(out)
    assert 2 <= listed < 12
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["counts"]["skipped_done"] >= listed and summary["counts"]["output_rows"] == 12
    assert_same_rows(out, local, [c for c in SAME if not c.startswith("prompt_cache_")])


def test_run_dataset_takes_and_returns_a_ray_dataset(cluster, data, local, tmp_path):
    from batchv4.pipelines.ray_executor import run_dataset

    rows = [json.loads(line) for line in open(data) if line.startswith('{"')]
    ds = ray.data.from_items(rows)
    got = run_dataset(ds, config("", tmp_path / "ds", executor="ray", replicas=2))
    assert isinstance(got, ray.data.Dataset)
    out = {(r["id"], r["sample_index"]): r for r in got.take_all()}
    assert out.keys() == local[1].keys()
    for k, r in local[1].items():
        assert {c: out[k][c] for c in SAME} == {c: r[c] for c in SAME}, k


def test_a_replica_of_two_ranks_gives_the_local_rows(cluster, data, local, tmp_path):
    """--gpus-per-replica 2 with --device cpu: the replica is a rank group of two processes over
    gloo (expert-parallel MoE), and the rows are the local run's."""
    from batchv4.pipelines.ray_executor import run_ray

    out = tmp_path / "ranks"
    summary = run_ray(config(data, out, executor="ray", replicas=1, gpus_per_replica=2,
                             enable_expert_parallel=True))
    assert summary["counts"]["output_rows"] == 12
    assert_same_rows(out, local)


def test_one_big_group_is_split_at_branch_points_over_both_replicas(cluster, local, tmp_path, monkeypatch):
    """A dataset under one system prompt is one prefix group: cut into pieces (chunks of 8 rows
    here; a cut only where the prefix to compute again is at most a quarter of the piece's work, so
    each question is longer than a quarter of the prompt), it runs on both replicas, each piece
    computing the shared prefix once more, with the outputs of a local run."""
    import batchv4.pipelines.ray_executor as rx

    monkeypatch.setattr(rx, "CHUNK_ROWS", 8)
    system = DOCS[0] + DOCS[1]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "system", "content": system},
                                                                     {"role": "user", "content": f"Question {i}: " + " ".join(
                                                                         str(i * j + 7) for j in range(16))}]})
                            + "\n" for i in range(40)))
    want = run(config(str(path), tmp_path / "local", max_tokens=3))
    summary = rx.run_ray(config(str(path), tmp_path / "ray", executor="ray", replicas=2, max_tokens=3, part_rows=2))
    assert summary["counts"]["split_groups"] == 1 and summary["counts"]["output_rows"] == 40
    manifest = read_manifest(str(tmp_path / "ray"))
    assert {g for e in manifest["parts"] for g in e["groups"]} == {0}
    assert {e["replica"] for e in manifest["parts"]} == {0, 1}
    a, b = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert a.keys() == b.keys() and all(a[k]["output"] == b[k]["output"] for k in a)
    extra = summary["this_run"]["prefill_tokens_computed"] - want["this_run"]["prefill_tokens_computed"]
    # what the split cost: each later piece computed the shared prefix once more, nothing else
    assert extra == summary["counts"]["split_recompute_tokens"] > 0


def test_parquet_row_groups_read_by_tasks_give_the_local_rows(cluster, data, local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchv4.pipelines.ray_executor import run_ray

    rows = [json.loads(line) for line in open(data) if line.startswith('{"')]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=4)
    want = run(config(str(path), tmp_path / "local"))
    summary = run_ray(config(str(path), tmp_path / "ray", executor="ray", replicas=2))
    assert summary["this_run"]["read_tasks"] == 3          # 12 rows in row groups of 4
    a, b = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert a.keys() == b.keys() == local[1].keys()
    for k in a:
        assert {c: a[k][c] for c in SAME} == {c: b[k][c] for c in SAME}, k
    assert want["this_run"]["prefill_tokens_computed"] == summary["this_run"]["prefill_tokens_computed"]
