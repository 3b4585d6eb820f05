"""`batchv4 run --model DIR --data-parallel-size 2 --enable-expert-parallel` on an official-layout
checkpoint folder with its own tokenizer.json: the same rows as one process, no error rows."""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "cli"))
from cli_engines import read_error_rows, read_outputs, run_main, write_jsonl  # noqa: E402
from test_job_safety import prompts, small_tokenizer  # noqa: E402


def test_run_two_ranks_equals_one(tmp_path, capsys):
    from batchv4.config import ModelConfig
    from batchv4.model.checkpoint import save_official_checkpoint
    from batchv4.model.model import Transformer

    torch.set_num_threads(1)
    cfg = ModelConfig.load("test")
    ckpt = tmp_path / "ckpt"
    save_official_checkpoint(Transformer(cfg).init_random(seed=3), cfg, str(ckpt))
    small_tokenizer(ckpt / "tokenizer.json", cfg.vocab_size)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    common = ["--model", str(ckpt), "--max-tokens", "4", "--quiet", "--kv-cache-memory", "32MiB", "--device", "cpu"]
    rows = {}
    for name, extra in (("one", []), ("two", ["--data-parallel-size", "2", "--enable-expert-parallel"])):
        out = str(tmp_path / name)
        code, _, err = run_main(["run", src, "-o", out, *common, *extra], capsys)
        assert code == 0, err
        assert read_error_rows(out) == []
        rows[name] = {r["id"]: r for r in read_outputs(out)}
    assert len(rows["one"]) == 6 and rows["one"].keys() == rows["two"].keys()
    for k, r in rows["one"].items():
        t = rows["two"][k]
        assert (r["output"], r["completion_tokens"], r["prompt_tokens"], r["finish_reason"]) == \
            (t["output"], t["completion_tokens"], t["prompt_tokens"], t["finish_reason"])
