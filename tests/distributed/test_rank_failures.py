"""A rank that raises, or is killed, ends the job with that rank's error within a bounded time
(a gloo timeout, and rank 0 watching its children), never a hang."""

import os
import signal
import time

import pytest

from batchv4.engine.distributed.launcher import RankError, RankGroup
from batchv4.engine.sampling_params import SamplingParams

ENGINE = dict(device="cpu", kv_cache_memory="16MiB", max_num_seqs=8)


def prompts(n):
    return [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 2 for j in range(6 + 3 * i)]} for i in range(n)]


def test_a_rank_that_raises_ends_the_job_with_its_error():
    t0 = time.monotonic()
    g = RankGroup("test", **ENGINE, data_parallel_size=2, enable_expert_parallel=True, timeout_s=30,
                  _fault={"rank": 1, "step": 3})
    try:
        with pytest.raises(RankError, match=r"rank 1 failed: RuntimeError: injected fault at step 3"):
            g.generate(prompts(4), SamplingParams(max_tokens=8, temperature=0))
    finally:
        g.close()
    assert time.monotonic() - t0 < 30
    assert all(p.poll() is not None for p in g._procs)


def test_a_killed_rank_ends_the_job():
    g = RankGroup("test", **ENGINE, data_parallel_size=2, enable_expert_parallel=True, timeout_s=30)
    sps = [SamplingParams(max_tokens=1 if i == 0 else 200, temperature=0) for i in range(4)]
    reqs = list(g.plan_requests([str(i) for i in range(4)], [p["prompt_token_ids"] for p in prompts(4)], sps,
                                [False] * 4, use_plan=False))
    t0 = None
    try:
        with pytest.raises(RankError, match=r"rank 1 failed: killed by signal 9"):
            for _ in g.generate_stream(reqs):
                if t0 is None:
                    os.kill(g._procs[0].pid, signal.SIGKILL)
                    t0 = time.monotonic()
    finally:
        g.close()
    assert t0 is not None and time.monotonic() - t0 < 15
