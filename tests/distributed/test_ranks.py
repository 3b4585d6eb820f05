"""Two ranks over gloo on the `test` preset, through the engine: the same greedy tokens and
logprobs (log-softmax of the float32 logits) as one process, and uneven work (failures:
test_rank_failures.py, since a process holds one rank group at a time)."""

import pytest
import torch

from batchv4.engine.distributed.launcher import RankGroup
from batchv4.engine.llm import LLM
from batchv4.engine.sampling_params import SamplingParams

ENGINE = dict(device="cpu", kv_cache_memory="16MiB", max_num_seqs=8)


def prompts(n, prefix=(), base=0):
    return [{"prompt_token_ids": [*prefix, *[(7 * (i + base) + 3 * j) % 500 + 2 for j in range(6 + 3 * i)]]}
            for i in range(n)]


@pytest.fixture(scope="module")
def one():
    torch.set_num_threads(1)
    return LLM("test", **ENGINE)


@pytest.fixture(scope="module")
def group():
    torch.set_num_threads(1)
    g = LLM("test", **ENGINE, data_parallel_size=2, enable_expert_parallel=True, timeout_s=60)
    assert isinstance(g, RankGroup)
    yield g
    g.close()


def same(a, b):
    assert [o.request_id for o in a] == [o.request_id for o in b]
    for x, y in zip(a, b):
        assert x.outputs[0].finish_reason != "error" and y.outputs[0].finish_reason != "error"
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs or [], y.outputs[0].logprobs or []):
            assert lx.keys() == ly.keys()
            assert max(abs(lx[t] - ly[t]) for t in lx) <= 1e-5


def decode_tokens(g):
    return [s["decode_tokens"] for s in g.stats()["ranks"]]


def test_two_ranks_equal_one_process(one, group):
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    ps = prompts(8)
    before = decode_tokens(group)
    same(one.generate(ps, sp), group.generate(ps, sp))
    after = decode_tokens(group)
    assert all(a > b for a, b in zip(after, before))           # both ranks ran sequences
    s = group.stats()
    assert s["ranks"][1]["exchange_bytes_sent"] > 0 and s["data_parallel_size"] == 2


def test_every_request_on_one_rank(one, group):
    """One prefix group: all of it goes to one rank (its snapshots stay in that cache); the other
    rank only joins the exchange with no tokens."""
    sp = SamplingParams(max_tokens=4, temperature=0)
    ps = prompts(5, prefix=list(range(40, 104)))
    before = decode_tokens(group)
    same(one.generate(ps, sp), group.generate(ps, sp))
    grew = [a - b for a, b in zip(decode_tokens(group), before)]
    assert sorted(grew)[0] == 0 and sorted(grew)[1] > 0


def test_a_rank_that_finishes_first(one, group):
    ps = prompts(6)
    sps = [SamplingParams(max_tokens=1 if i % 2 else 24, temperature=0) for i in range(6)]
    same(one.generate(ps, sps), group.generate(ps, sps))
