"""A job never loses, duplicates or misprices a row: each defect found by trying `run` and `estimate`
as a new user would, on real and hostile data, as a test (each fails on the code before the fix)."""

import json
import os
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import (  # noqa: E402
    CLI_WITH_TEST_ENGINE,
    WEEKDAY_PEAK,
    fast_engine,  # noqa: F401  (fixture)
    fix_clock,
    read_error_rows,
    read_outputs,
    run_main,
    write_jsonl,
)

Q = ["Name a colour.", "Name a fruit.", "Name a tree.", "Name a river.", "Name a bird.", "Name a town."]


def prompts(n, start=0):
    return [{"id": f"r{i}", "prompt": f"{Q[i % len(Q)]} ({i})"} for i in range(start, start + n)]


def run_ok(args, capsys):
    code, out, err = run_main(["run", *args, "--max-tokens", "2", "--quiet"], capsys)
    assert code == 0, err
    return out, err


# ---- output folders ---------------------------------------------------------------------------------
def test_a_folder_of_the_users_own_files_is_refused_even_with_overwrite(tmp_path, capsys, fast_engine):
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": Q[:2]}), d / "part-00000.parquet")
    other = write_jsonl(tmp_path / "other.jsonl", prompts(2))
    before = {p: (d / p).read_bytes() for p in os.listdir(d)}
    for src, want in ((str(d), "is the output folder or inside it"), (other, "is not empty and holds no batchv4 run")):
        for extra in ([], ["--overwrite"]):
            code, _, err = run_main(["run", src, "-o", str(d), "--quiet", *extra], capsys)
            assert code == 1 and want in err and err.count("\n") == 1, err
            assert {p: (d / p).read_bytes() for p in os.listdir(d)} == before      # nothing written, nothing lost
    assert fast_engine == []


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, capsys, fast_engine):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "rows.jsonl", prompts(6))
    for _ in range(2):
        run_ok([str(d), "-o", str(d / "out")], capsys)
        assert len(read_outputs(str(d / "out"))) == 6 and read_error_rows(str(d / "out")) == []
    # a second job's output folder there is left out too (it is marked), and said so
    code, _, err = run_main(["run", str(d), "-o", str(tmp_path / "other"), "--max-tokens", "2", "--quiet"], capsys)
    assert code == 0 and "out/ (" in err, err
    assert len(read_outputs(str(tmp_path / "other"))) == 6


def test_a_second_run_into_a_folder_in_use_is_kept_out(tmp_path, capsys, fast_engine):
    from batchv4.io.outdir import claim_output

    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out"
    with claim_output(str(out), fingerprint="x"):
        code, _, err = run_main(["run", src, "-o", str(out), "--quiet"], capsys)
    assert code == 1 and "is in use by another batchv4 run" in err and f"pid {os.getpid()}" in err, err
    assert fast_engine == []


def test_memory_urls_are_refused_by_the_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code, _, err = run_main(["run", src, "-o", "memory://somewhere/out"], capsys)
    assert code == 1 and "memory://" in err and err.count("\n") == 1


# ---- resume by content ------------------------------------------------------------------------------
def test_an_edited_row_is_generated_again_and_its_old_output_removed(tmp_path, capsys, fast_engine):
    rows = prompts(50)
    src = tmp_path / "in.jsonl"
    out = str(tmp_path / "out")
    write_jsonl(src, rows)
    run_ok([str(src), "-o", out, "--limit", "40", "--part-rows", "8"], capsys)
    rows[5] = {"id": "r5", "prompt": "Name a mountain."}
    rows[12] = {"id": "r12", "prompt": None}                 # edited into a bad row
    write_jsonl(src, rows)
    run_ok([str(src), "-o", out, "--limit", "40", "--part-rows", "8"], capsys)
    got = read_outputs(out)
    assert len(got) == 39 and len({r["id"] for r in got}) == 39
    assert "r12" not in {r["id"] for r in got} and [e["id"] for e in read_error_rows(out)] == ["r12"]
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["counts"]["output_rows"] == 39 and s["counts"]["stale_output_rows_removed"] == 2
    from batchv4.io.rows import content_hash

    r5 = next(r for r in got if r["id"] == "r5")
    assert r5["content_hash"] == content_hash([{"role": "user", "content": "Name a mountain."}], {})
    # the row is fixed again: its error row goes, its output comes back
    rows[12] = {"id": "r12", "prompt": "Name a lake."}
    write_jsonl(src, rows)
    run_ok([str(src), "-o", out, "--limit", "40"], capsys)
    assert len(read_outputs(out)) == 40 and read_error_rows(out) == []


# ---- input discovery --------------------------------------------------------------------------------
def test_every_data_file_of_a_folder_is_read_and_the_rest_listed(tmp_path, capsys, fast_engine):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": Q[:2]}), d / "a.parquet")
    write_jsonl(d / "b.jsonl", [{"id": "c", "prompt": Q[2]}])
    (d / "c.json").write_text(json.dumps([{"id": "d", "prompt": Q[3]}, {"id": "e", "prompt": Q[4]}], indent=2))
    (d / "README").write_text("about these prompts")
    _, err = run_ok([str(d), "-o", str(tmp_path / "out")], capsys)
    assert sorted(r["id"] for r in read_outputs(str(tmp_path / "out"))) == ["a", "b", "c", "d", "e"]
    assert "README" in err and "skipped" in err


def test_empty_and_unreadable_inputs_say_what_they_are(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run_main(["estimate", str(tmp_path / "empty.jsonl")], capsys)
    assert code == 1 and "holds no rows" in err and err.count("\n") == 1, err
    import fsspec.compression

    monkeypatch.delitem(fsspec.compression.compr, "zstd", raising=False)
    (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
    code, _, err = run_main(["estimate", str(tmp_path / "x.jsonl.zst")], capsys)
    assert code == 1 and "x.jsonl.zst" in err and "zstandard" in err and err.count("\n") == 1, err


# ---- one row never ends the job ---------------------------------------------------------------------
def test_a_lone_surrogate_is_an_error_row_and_the_job_goes_on(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "prompt": Q[0]},
        b'{"id": "a", "prompt": "bad \\ud800 surrogate"}',
        b'{"id": "b\\udc00", "prompt": "fine text, bad id"}',
        {"id": "ok2", "prompt": Q[1]},
    ])
    out = str(tmp_path / "out")
    for _ in range(2):            # and the resume does not stop at the same row
        code, _, err = run_main(["run", src, "-o", out, "--max-tokens", "2", "--quiet"], capsys)
        assert code == 0, err
    assert sorted(r["id"] for r in read_outputs(out)) == ["ok", "ok2"]
    errors = {e["row_index"]: e for e in read_error_rows(out)}
    assert sorted(errors) == [1, 2] and "surrogate" in errors[1]["error"] and "surrogate" in errors[2]["error"]


def test_rows_with_prompt_and_rows_with_messages_in_one_file(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "p", "prompt": Q[0]},
        {"id": "m", "messages": [{"role": "user", "content": Q[1]}]},
        {"id": "both-null", "prompt": None, "messages": None},
    ])
    out = str(tmp_path / "out")
    run_ok([src, "-o", out], capsys)
    assert sorted(r["id"] for r in read_outputs(out)) == ["m", "p"]
    assert [e["id"] for e in read_error_rows(out)] == ["both-null"]


def test_a_job_where_every_row_failed_exits_non_zero(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": None}, b"{broken"])
    out = str(tmp_path / "out")
    code, stdout, err = run_main(["run", src, "-o", out, "--quiet"], capsys)
    assert code == 1 and stdout == "" and "2 error row(s)" in err and "every row" in err, err
    code, _, err = run_main(["run", src, "-o", out, "--quiet"], capsys)      # nothing left to do
    assert code == 0 and err == "", err


def test_devices_torch_does_not_know_and_internal_errors(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code, _, err = run_main(["run", src, "-o", str(tmp_path / "o"), "--device", "tpu"], capsys)
    assert code == 1 and err.startswith("Error: --device 'tpu'") and err.count("\n") == 1, err
    # anything else is a bug: its traceback is shown, not a bare "Error: 'x'"
    import batchv4.pipelines.run as run_mod

    def broken(cfg):
        raise KeyError("x")

    monkeypatch.setattr(run_mod, "check_options", broken)
    code, _, err = run_main(["run", src, "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" in err and "KeyError: 'x'" in err and "bug" in err


# ---- one tokenizer, one price -----------------------------------------------------------------------
def small_tokenizer(path, vocab_size=512):
    """A byte-level BPE of `vocab_size` ids trained on the stdlib's Zen of Python, with V4's special tokens."""
    import codecs
    import this

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from batchv4 import tokenizer as v4

    text = codecs.decode(this.s, "rot13")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [v4.BOS_TOKEN, v4.EOS_TOKEN, v4.USER_TOKEN, v4.ASSISTANT_TOKEN, v4.THINK_START, v4.THINK_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(str(path))
    return tok


def test_a_checkpoint_folder_brings_its_own_tokenizer(tmp_path, capsys, monkeypatch):
    """`--model DIR` encodes, estimates and decodes with DIR's tokenizer.json (a 512-id vocabulary
    here; the bundled V4 one has 129,280 ids, which the model would refuse)."""
    import torch

    from batchv4.config import ModelConfig
    from batchv4.model.checkpoint import save_official_checkpoint
    from batchv4.model.model import Transformer
    from batchv4.tokenizer import load_tokenizer

    cfg = ModelConfig.load("test")
    ckpt = tmp_path / "ckpt"
    save_official_checkpoint(Transformer(cfg).init_random(seed=3).to(torch.bfloat16), cfg, str(ckpt))
    small_tokenizer(ckpt / "tokenizer.json", cfg.vocab_size)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = str(tmp_path / "out")
    torch.set_num_threads(1)
    code, _, err = run_main(["run", src, "-o", out, "--model", str(ckpt), "--max-tokens", "3", "--quiet",
                             "--kv-cache-memory", "64MiB"], capsys)
    assert code == 0, err
    rows = read_outputs(out)
    assert len(rows) == 3 and read_error_rows(out) == []
    tok = load_tokenizer(str(ckpt))
    want = tok.chat_token_ids([[{"role": "user", "content": p["prompt"]}] for p in prompts(3)], False)
    assert sorted(r["prompt_tokens"] for r in rows) == sorted(len(w) for w in want)
    code, est, err = run_main(["estimate", src, "--model", str(ckpt), "--json"], capsys)
    assert code == 0 and json.loads(est)["tokens"]["prompt_tokens"] == sum(len(w) for w in want), err


def test_run_charges_what_estimate_predicts(tmp_path, capsys, fast_engine, monkeypatch):
    """The same API cache semantics in both: api_cache_hit_tokens and the input side of cost_usd."""
    from batchv4.accounting.cards import get_card
    from batchv4.accounting.pricing import price_row
    from batchv4.pipelines.estimate import EstimateConfig, estimate

    fix_clock(monkeypatch, WEEKDAY_PEAK)
    doc = "Background: " + "the river rose after three days of rain in the northern valleys; " * 12
    rows = [{"id": f"q{i}", "prompt": doc + f" Question {i}?"} for i in range(5)] + [{"id": "solo", "prompt": "Hi."}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out")
    run_ok([src, "-o", out, "-n", "2"], capsys)
    got = read_outputs(out)
    est = estimate(EstimateConfig(input=src, n=2, output_tokens=(0, 0, 0)), now=WEEKDAY_PEAK)
    assert est["tokens"]["api_cache_hit_tokens"] == sum(r["api_cache_hit_tokens"] for r in got) > 0
    assert est["tokens"]["engine_cache_hit_tokens"] == sum(r["prompt_cache_hit_tokens"] for r in got)
    card = get_card("deepseek-v4-flash")
    # each row's cost_usd without its output tokens is what the estimate charges for its prompt
    input_cost = sum(price_row({"prompt_cache_hit_tokens": r["api_cache_hit_tokens"],
                                "prompt_cache_miss_tokens": r["prompt_tokens"] - r["api_cache_hit_tokens"],
                                "completion_tokens": 0, "reasoning_tokens": 0}, card, WEEKDAY_PEAK) for r in got)
    assert est["cost_usd"]["expected"] == pytest.approx(input_cost, rel=1e-9)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["totals"]["api_cache_hit_tokens"] == est["tokens"]["api_cache_hit_tokens"]


# ---- estimate counts what run runs ------------------------------------------------------------------
def test_estimate_takes_runs_options_and_counts_its_rows(tmp_path, capsys, fast_engine):
    lines = [{"key": "a", "prompt": Q[0]}, {"key": "a", "prompt": Q[1]}, {"key": None, "prompt": Q[2]},
             {"key": "b", "prompt": "word " * 200}, {"key": "c", "prompt": Q[3]}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    opts = ["--id-column", "key", "--max-model-len", "64", "--model", "test", "--max-tokens", "2"]
    code, est, err = run_main(["estimate", src, *opts, "--json"], capsys)
    assert code == 0, err
    est = json.loads(est)
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, *opts, "--quiet"], capsys)
    assert code == 0, err
    assert (est["rows"], est["error_rows"]) == (len(read_outputs(out)), len(read_error_rows(out))) == (2, 3)
    # an OpenAI batch: per-row n and max_tokens, and OpenAI's default temperature
    batch = [{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "Hi"}], "n": 3, "max_tokens": 7}},
             {"custom_id": "y", "body": {"messages": [{"role": "user", "content": "Yo"}]}},
             {"custom_id": "x", "body": {"messages": [{"role": "user", "content": "dup"}]}}]
    src = write_jsonl(tmp_path / "batch.jsonl", batch)
    code, est, err = run_main(["estimate", src, "--max-tokens", "10", "--json"], capsys)
    est = json.loads(est)
    assert (est["rows"], est["output_rows"], est["error_rows"]) == (2, 4, 1)
    assert est["tokens"]["output_tokens_per_row"]["high"] == pytest.approx((3 * 7 + 10) / 4)


def test_openai_bodies_without_temperature_sample_at_openais_default(tmp_path):
    from batchv4.pipelines.frontend import Frontend, RowOptions

    src = write_jsonl(tmp_path / "b.jsonl", [
        {"custom_id": "x", "body": {"messages": [{"role": "user", "content": "Hi"}]}},
        {"custom_id": "y", "body": {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.2}}])
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])

    def temps(path, **kw):
        fe = Frontend(RowOptions(input=path, **kw))
        seen: set = set()
        return [r.sampling.temperature for b in fe.batches(lambda i: i in seen or seen.add(i), print, {}, {})
                for r in b]

    assert temps(src) == [1.0, 0.2] and temps(plain) == [0.0]
    assert temps(src, temperature=0.5) == [0.5, 0.2] and temps(plain, temperature=0.5) == [0.5]


# ---- signals ----------------------------------------------------------------------------------------
def _listed_parts(out) -> int:
    try:
        with open(out / "manifest.json") as f:
            return len(json.load(f)["parts"])
    except (OSError, ValueError):
        return 0


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    import signal
    import tempfile

    src = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    args = [sys.executable, "-c", CLI_WITH_TEST_ENGINE, "run", src, "-o", str(out), "--max-tokens", "4",
            "--part-rows", "2", "--max-num-seqs", "2", "--quiet"]
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not _listed_parts(out):                       # a part is listed (not only written)
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() - t0 < 90
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and b"Terminated." in err, err.decode()[-2000:]
    with open(out / "manifest.json") as f:
        listed = {e["file"] for e in json.load(f)["parts"]}
    on_disk = {p.name for p in out.glob("part-*.parquet")}
    # flushed: every part is listed, but the one the signal may have caught between its rename and
    # its listing (never read; the rerun below redoes its rows)
    assert listed and listed <= on_disk and len(on_disk - listed) <= 1
    assert not (out / "_batchv4.lock").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("batchv4-run-")]   # scratch removed
    assert tempfile.gettempdir() != str(tmp_path)
    p = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert sorted(r["id"] for r in read_outputs(str(out))) == sorted(f"r{i}" for i in range(40))


def test_object_store_output_folders_are_claimed_too(tmp_path, capsys, fast_engine):
    """An fsspec output that is not local (memory:// through the library) gets the marker, and a
    folder of someone else's objects there is refused."""
    from batchv4.errors import UserError
    from batchv4.pipelines.run import RunConfig, run

    fs = fsspec.filesystem("memory")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    try:
        fs.pipe_file("/safety/theirs/data.csv", b"a,b\n")
        with pytest.raises(UserError, match="is not empty"):
            run(RunConfig(input=src, output="memory://safety/theirs", quiet=True, max_tokens=2))
        run(RunConfig(input=src, output="memory://safety/ours", quiet=True, max_tokens=2))
        assert fs.exists("/safety/ours/_batchv4.json") and not fs.exists("/safety/ours/_batchv4.lock")
    finally:
        fs.rm("/safety", recursive=True)
