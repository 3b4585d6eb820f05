"""The step contract end to end on the `test` preset: a request whose logits are not finite fails
alone while the rest of the step goes on, and a consumer that stops a stream early (or raises)
leaves no sequence, page, slot, snapshot or kept logits held."""

import pytest

from batchv4 import LLM, SamplingParams
from batchv4.engine.backend import Backend

from test_engine import prompts_with_shared_prefixes  # noqa: E402  (tests/engine is on sys.path)


@pytest.fixture(scope="module")
def llm():
    return LLM("test", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=64, page_size=4)


def held(llm):
    st = llm.stats()
    return (sum(st["pages_in_use"].values()), llm.cache.slots.num_used, st["snapshots_held"],
            len(llm.runner.kept_logits), llm.scheduler.has_work())


SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_the_local_engine_is_a_backend(llm):
    assert isinstance(llm, Backend)


def test_nan_logits_fail_only_their_request(llm):
    prompts = [{"prompt_token_ids": p} for p in prompts_with_shared_prefixes()]
    clean = llm.generate(prompts, SP)

    def poison(rows, logits):
        # request "2" gets NaN logits at its third token, in the middle of a batched decode step
        bad = [i for i, r in enumerate(rows) if r.request_id == "2" and r.step == 2]
        if bad:
            logits = logits.clone()
            logits[bad] = float("nan")
        return logits

    llm.runner.logits_processors.append(poison)
    try:
        got = llm.generate(prompts, SP)
    finally:
        llm.runner.logits_processors.remove(poison)
    assert got[2].outputs[0].finish_reason == "error" and "not finite" in got[2].outputs[0].error
    assert [o.outputs[0].token_ids for i, o in enumerate(got) if i != 2] == \
        [o.outputs[0].token_ids for i, o in enumerate(clean) if i != 2]
    assert held(llm) == (0, 0, 0, 0, False)


@pytest.mark.parametrize("how", ["close", "raise"])
def test_a_consumer_that_stops_early_leaves_nothing_held(llm, how):
    ids = prompts_with_shared_prefixes()
    reqs = list(llm.plan_requests([str(i) for i in range(len(ids))], ids,
                                  [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)] * len(ids),
                                  [False] * len(ids)))
    stream = llm.generate_stream(reqs)
    if how == "close":
        first = next(stream)
        assert first.outputs and held(llm) != (0, 0, 0, 0, False)    # mid-run: something is held
        stream.close()
    else:
        with pytest.raises(RuntimeError):
            for _ in stream:
                raise RuntimeError("the consumer failed")
        del stream
    assert held(llm) == (0, 0, 0, 0, False)
    # and the engine still works
    out = llm.generate([{"prompt_token_ids": ids[0]}], SP)
    assert out[0].outputs[0].finish_reason == "length"
