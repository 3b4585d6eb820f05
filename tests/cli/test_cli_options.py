"""`-n`, `--shard`, `--thinking`, `estimate` token counts, and `--help` completeness."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_engines import fast_engine, folded_llm, read_error_rows, read_outputs, run_main, write_jsonl  # noqa: E402,F401

from batchv4.cli import cli  # noqa: E402

SHARED = ("Context: " + "the committee reviewed the annual report, the budget and the plans for next year; " * 4)


def test_n_samples_are_rows(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Say yes."}, {"id": "b", "prompt": "Say no."}])
    out = str(tmp_path / "out")
    code, stdout, err = run_main(["run", src, "-o", out, "-n", "3", "--temperature", "1.0", "--max-tokens", "4"],
                                 capsys)
    assert code == 0, err
    # without --quiet: progress bars on stderr, the table on stdout
    assert all(f"{bar}:" in err for bar in ("read", "tokenize", "generate")) and "2/2" in err
    assert stdout.startswith("output rows") and "DeepSeek V4 Pro" in stdout
    rows = read_outputs(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == [(i, k) for i in "ab" for k in range(3)]
    for r in rows:
        if r["sample_index"] > 0:   # later samples read the whole prompt from the cache
            assert r["prompt_cache_hit_tokens"] == r["prompt_tokens"]
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["totals"]["rows"] == 6 and s["totals"]["completion_tokens"] == sum(r["completion_tokens"] for r in rows)


def test_shards_partition_the_rows(tmp_path, capsys, fast_engine):
    lines = [{"id": f"s{i}", "prompt": SHARED + f"Question {i}?"} for i in range(4)]
    lines += [{"id": f"u{i}", "prompt": f"Unrelated question number {i}: name a {w}."}
              for i, w in enumerate(["bird", "tree", "stone", "star", "ship", "song", "door", "lamp"])]
    lines.insert(3, b"{not json")
    lines.insert(7, {"id": "null", "prompt": None})
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    got = []
    for i in range(2):
        out = str(tmp_path / f"shard{i}")
        code, _, err = run_main(["run", src, "-o", out, "--shard", f"{i}/2", "--max-tokens", "2", "--quiet"], capsys)
        assert code == 0, err
        got.append(({r["id"] for r in read_outputs(out)}, {e["row_index"] for e in read_error_rows(out)}))
    (ids0, err0), (ids1, err1) = got
    assert not ids0 & ids1 and ids0 | ids1 == {x["id"] for x in lines if isinstance(x, dict) and x["prompt"]}
    assert not err0 & err1 and err0 | err1 == {3, 7}
    # rows that share their first cache units stay in one shard
    assert {f"s{i}" for i in range(4)} <= ids0 or {f"s{i}" for i in range(4)} <= ids1
    assert ids0 and ids1
    # the estimate cuts the same shards
    est = [json.loads(CliRunner().invoke(cli, ["estimate", src, "--shard", f"{i}/2", "--json"]).output)
           for i in range(2)]
    assert [e["rows"] for e in est] == [len(ids0), len(ids1)]
    assert [e["error_rows"] for e in est] == [len(err0), len(err1)]


def test_thinking_fills_reasoning(tmp_path, capsys, fast_engine):
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.pipelines.run import RunConfig
    from batchv4.tokenizer import THINK_END, load_tokenizer

    prompts = ["Why is the sky blue?", "Count to three."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)])
    plain, think = str(tmp_path / "plain"), str(tmp_path / "think")
    assert run_main(["run", src, "-o", plain, "--max-tokens", "5", "--quiet"], capsys)[0] == 0
    assert run_main(["run", src, "-o", think, "--max-tokens", "5", "--thinking", "--quiet"], capsys)[0] == 0
    for r in read_outputs(plain):
        assert r["reasoning"] is None and r["reasoning_tokens"] == 0
    rows = sorted(read_outputs(think), key=lambda r: r["id"])
    # the same prompts generated without any reasoning split: the full text the model wrote
    ids = load_tokenizer().chat_token_ids([[{"role": "user", "content": p}] for p in prompts], True)
    llm = folded_llm(RunConfig(input="", output="", max_model_len=None))
    params = [SamplingParams(max_tokens=5, temperature=0.0, seed=0)] * 2   # what run passes
    full = {o.request_id: o for o in llm.generate_stream(llm.llm.plan_requests(["0", "1"], ids, params, [False] * 2))}
    for r in rows:
        text = full[r["id"]].outputs[0].text
        assert r["reasoning"] is not None
        if THINK_END in text:
            assert r["reasoning"] + THINK_END + r["output"] == text
            assert r["reasoning_tokens"] < r["completion_tokens"]
        else:   # no </think> yet: all of it is reasoning
            assert (r["reasoning"], r["output"]) == (text, "")
            assert r["reasoning_tokens"] == r["completion_tokens"] == len(full[r["id"]].outputs[0].token_ids)


def test_estimate_counts_equal_the_tokenizer(tmp_path):
    from batchv4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rows = [{"q": SHARED + "First?"}, {"q": SHARED + "Second?"}, {"q": "Short one."}, {"q": None}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    r = CliRunner().invoke(cli, ["estimate", src, "--prompt-column", "q", "--system", "Be terse.", "--thinking",
                                 "-n", "2", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    convs = [[{"role": "system", "content": "Be terse."}, {"role": "user", "content": x["q"]}] for x in rows[:3]]
    want = sum(len(ids) for ids in tok.chat_token_ids(convs, True))
    assert est["tokens"]["prompt_tokens"] == 2 * want
    assert (est["input_rows"], est["error_rows"], est["rows"], est["output_rows"]) == (4, 1, 3, 6)
    assert 0 < est["tokens"]["engine_cache_hit_tokens"] - want <= est["tokens"]["prompt_tokens"]  # shared prefix + n
    # OpenAI batch: each body's own thinking setting
    batch = [{"custom_id": "x", "body": {"messages": [{"role": "user", "content": "Hi"}],
                                         "thinking": {"type": "enabled"}}},
             {"custom_id": "y", "body": {"messages": [{"role": "user", "content": "Hi"}]}}]
    src = write_jsonl(tmp_path / "batch.jsonl", batch)
    r = CliRunner().invoke(cli, ["estimate", src, "--json"])
    assert r.exit_code == 0, r.output
    want = len(tok.chat_token_ids([batch[0]["body"]["messages"]], True)[0]) + len(
        tok.chat_token_ids([batch[1]["body"]["messages"]], False)[0])
    assert json.loads(r.output)["tokens"]["prompt_tokens"] == want
    table = CliRunner().invoke(cli, ["estimate", src])
    assert table.exit_code == 0 and "prompt tokens" in table.output and "cheapest window" in table.output


def test_estimate_does_not_import_torch(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    code = ("import sys; from batchv4.cli import main; sys.argv = ['batchv4', 'estimate', %r, '--json'];\n"
            "try:\n    main()\nfinally:\n    assert 'torch' not in sys.modules, 'torch was imported'") % src
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"] == 1


@pytest.mark.parametrize("command", ["run", "estimate", "report"])
def test_help_lists_every_option_with_its_default(command):
    import click

    from batchv4.cli import cli as group

    cmd = group.get_command(click.Context(group), command)
    r = CliRunner().invoke(cli, [command, "--help"], terminal_width=300)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    ctx = click.Context(cmd, info_name=command, show_default=True)
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        opts, help_text = p.get_help_record(ctx)
        help_text = " ".join(help_text.split())
        assert f"{opts} {help_text}" in text, p.name
        assert p.help, f"{command} {opts} has no help text"
        if p.default is not None and (not p.is_flag or p.secondary_opts) and not p.required:
            assert "[default:" in help_text, p.name


def test_fp8_kv_cache_runs_and_is_its_own_configuration(tmp_path, capsys, fast_engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": SHARED + f"Question {i}?"} for i in range(3)])
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, "--kv-cache-dtype", "fp8", "--max-tokens", "3", "--quiet"], capsys)
    assert code == 0, err
    assert fast_engine[-1].kv_cache_dtype == "fp8"
    rows = read_outputs(out)
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"]
    assert sum(r["prompt_cache_hit_tokens"] for r in rows) > 0        # the shared context was reused
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["config"]["kv_cache_dtype"] == "fp8"
    # the same folder with the native cache is another configuration (other numbers)
    code, _, err = run_main(["run", src, "-o", out, "--max-tokens", "3", "--quiet"], capsys)
    assert code != 0 and "different configuration" in err


def test_limit_zero_writes_an_empty_run(tmp_path, capsys, fast_engine):
    """Nothing to generate: no engine is built, and the folder still holds a manifest and a summary
    that `report` reads."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hi"}])
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, "--limit", "0", "--quiet"], capsys)
    assert code == 0, err
    assert fast_engine == [] and read_outputs(out) == []
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["counts"]["output_rows"] == 0
    code, stdout, err = run_main(["report", out], capsys)
    assert code == 0 and "output rows" in stdout, err


def test_estimate_predicts_the_cache_hits_the_run_gets(tmp_path, capsys, fast_engine):
    """The estimate plans with the run's packing, so with a cache that holds a group its predicted
    engine hits are exactly the prompt_cache_hit_tokens the run reports."""
    docs = [SHARED, "Background: " + "the river rose after three days of rain in the northern valleys; " * 3]
    lines = [{"id": f"d{i}q{j}", "prompt": docs[i] + f" Question {j}: what happened {j} days later?"}
             for i in range(2) for j in range(3)]
    lines += [{"id": "solo", "prompt": "A question that shares nothing."}, {"id": "dup", "prompt": lines[0]["prompt"]}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    r = CliRunner().invoke(cli, ["estimate", src, "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)["tokens"]
    out = str(tmp_path / "out")
    code, _, err = run_main(["run", src, "-o", out, "--max-tokens", "2", "--quiet"], capsys)
    assert code == 0, err
    rows = read_outputs(out)
    assert sum(r["prompt_tokens"] for r in rows) == est["prompt_tokens"]
    assert est["engine_cache_hit_tokens"] > 0
    assert sum(r["prompt_cache_hit_tokens"] for r in rows) == est["engine_cache_hit_tokens"]
    assert sum(r["api_cache_hit_tokens"] for r in rows) == est["api_cache_hit_tokens"]
