"""Greedy outputs through the engine equal transformers' `generate` on the same small checkpoint
(float32; compared where the top two logits are clearly apart, so exact ties cannot flake it)."""

import sys
from pathlib import Path

import pytest
import torch

from batchv4 import LLM, SamplingParams

import transformers  # noqa: E402  (pinned in the test extra: a missing one fails, never skips)

transformers.logging.set_verbosity_error()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from hf_oracle import hf_model_like  # noqa: E402


def test_engine_greedy_equals_transformers_generate():
    llm = LLM("test", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=16, page_size=4,
              max_num_seqs=3)
    hf = hf_model_like(llm.model)
    g = torch.Generator().manual_seed(21)
    trunk = torch.randint(3, 512, (19,), generator=g).tolist()
    prompts = [trunk + torch.randint(3, 512, (k,), generator=g).tolist() for k in (4, 11, 2)]
    prompts += [torch.randint(3, 512, (k,), generator=g).tolist() for k in (6, 33)]
    n = 10
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    checked = 0
    for o, p in zip(outs, prompts):
        with torch.no_grad():
            r = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=1)
        want = r.sequences[0, len(p):].tolist()
        gaps = [float(lg[0].topk(2).values.diff().abs()) for lg in r.logits]
        if min(gaps) > 1e-3:
            assert o.outputs[0].token_ids == want
            checked += 1
    assert checked >= 3
    assert sum(o.num_cached_tokens for o in outs) > 0      # prefix hits were part of the run
