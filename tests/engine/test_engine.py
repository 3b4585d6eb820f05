"""The engine end to end on the small `test` preset (float32): greedy outputs equal a plain
one-sequence loop over the model whatever the batch composition, chunk size, prefix hits,
evictions and preemptions; seeded sampling is batch-independent; bad requests become errors."""

import pytest
import torch

from batchv4 import LLM, SamplingParams
from batchv4.engine.scheduler import EngineRequest

MARGIN = 1e-3


@pytest.fixture(scope="module")
def llm():
    return LLM("test", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=64, page_size=4)


def greedy_loop(model, prompt, n):
    """The plain loop: recompute the whole sequence each step, take the argmax. Returns the tokens
    and whether every step's top-two logits were separated by more than MARGIN."""
    toks, clear = list(prompt), True
    for _ in range(n):
        lg = model.forward_reference(torch.tensor(toks))[-1]
        top = lg.topk(2).values
        clear &= bool(top[0] - top[1] > MARGIN)
        toks.append(int(lg.argmax()))
    return toks[len(prompt):], clear


def prompts_with_shared_prefixes():
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(3, 512, (45,), generator=g).tolist()
    sysp = torch.randint(3, 512, (21,), generator=g).tolist()
    out = [doc + torch.randint(3, 512, (int(k),), generator=g).tolist() for k in (3, 9, 1, 14)]
    out += [sysp + torch.randint(3, 512, (int(k),), generator=g).tolist() for k in (5, 2, 30)]
    out += [torch.randint(3, 512, (int(k),), generator=g).tolist() for k in (1, 7, 70)]
    dup = sysp + list(range(100, 120))
    out += [dup, list(dup)]                              # duplicates: the second is fully cached
    return out


def check_against_loop(llm, outs, prompts, n):
    checked = 0
    for o, p in zip(outs, prompts):
        want, clear = greedy_loop(llm.model, p, n)
        if clear:
            assert o.outputs[0].token_ids == want, p[:5]
            checked += 1
    assert checked >= len(prompts) // 2


@pytest.mark.parametrize("budget,seqs", [(64, 64), (7, 3), (1000, 2)])
def test_greedy_equals_plain_loop(budget, seqs):
    llm = LLM("test", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=budget,
              max_num_seqs=seqs, page_size=4)
    prompts = prompts_with_shared_prefixes()
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    check_against_loop(llm, outs, prompts, 6)
    st = llm.stats()
    assert st["cached_prompt_tokens"] > 0
    # everything returns to the pools after a run
    assert sum(st["pages_in_use"].values()) == 0 and llm.cache.slots.num_used == 0


def test_prefix_hits_reported_and_planned_work_is_minimal():
    llm = LLM("test", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=256, page_size=4)
    prompts = prompts_with_shared_prefixes()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    distinct = len({tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)})
    st = llm.stats()
    assert st["prefill_tokens"] <= distinct + len(prompts)
    assert outs[-1].num_cached_tokens == len(prompts[-1])


def test_tight_memory_evicts_and_preempts_but_stays_exact():
    llm = LLM("test", dtype="float32", kv_cache_memory="1MiB", max_num_batched_tokens=32,
              max_num_seqs=8, max_snapshots=2, page_size=4)
    prompts = prompts_with_shared_prefixes()
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    check_against_loop(llm, outs, prompts, 8)
    st = llm.stats()
    assert st["preemptions"] + st["snapshot_evictions"] > 0


def test_seeded_sampling_is_batch_independent(llm):
    g = torch.Generator().manual_seed(9)
    target = torch.randint(3, 512, (12,), generator=g).tolist()
    others = [torch.randint(3, 512, (int(k),), generator=g).tolist() for k in (5, 30, 2)]
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=123, ignore_eos=True)
    alone = list(llm.generate_stream([EngineRequest("row-7", target, sp)]))[0].outputs[0].token_ids
    reqs = [EngineRequest(f"other-{i}", p, sp) for i, p in enumerate(others)]
    mixed = {o.request_id: o for o in llm.generate_stream(reqs[:2] + [EngineRequest("row-7", target, sp)] + reqs[2:])}
    assert mixed["row-7"].outputs[0].token_ids == alone
    other = list(llm.generate_stream([EngineRequest("row-8", target, sp)]))[0].outputs[0].token_ids
    assert other != alone          # the stream is keyed by the request id too


def test_n_samples_share_the_prompt(llm):
    p = list(range(10, 40))
    sp = SamplingParams(temperature=1.0, n=3, max_tokens=5, seed=1, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": p}], sp)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 5 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_bad_requests_become_errors_and_the_rest_completes(llm):
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": []}, {"prompt_token_ids": [5, 6, 100000]},
                         {"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(3, 500)) * 400}], sp)
    assert outs[0].outputs[0].finish_reason == "error" and "empty" in outs[0].outputs[0].error
    assert outs[1].outputs[0].finish_reason == "error" and "vocabulary" in outs[1].outputs[0].error
    assert outs[2].outputs[0].finish_reason == "length" and len(outs[2].outputs[0].token_ids) == 3
    assert outs[3].outputs[0].finish_reason == "error" and "budget" in outs[3].outputs[0].error


def test_context_limit_is_an_error():
    llm = LLM("test", dtype="float32", kv_cache_memory="64MiB", max_model_len=20, page_size=4)
    out = llm.generate([{"prompt_token_ids": list(range(3, 23))}, {"prompt_token_ids": [3, 4]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "error" and "context" in out[0].outputs[0].error
    assert out[1].outputs[0].finish_reason == "length"


def test_stack_rows_reuses_a_whole_logits_tensor_and_copies_otherwise():
    from batchv4.engine.runner import _stack_rows

    x = torch.randn(3, 5)
    assert _stack_rows([x[i] for i in range(3)], x) is x
    assert torch.equal(_stack_rows([x[2], x[0], x[1]], x), x[[2, 0, 1]])
    assert torch.equal(_stack_rows([x[0], x[1]], x), x[:2])
    assert torch.equal(_stack_rows([x[0], x[0], x[1]], x), x[[0, 0, 1]])     # a fork's repeated row
    y = torch.randn(2, 5)
    assert torch.equal(_stack_rows([x[0], y[1], x[2]], x), torch.stack([x[0], y[1], x[2]]))
    assert torch.equal(_stack_rows([y[0], y[1]], None), y)


def test_fp8_kv_cache_equals_native_pools_under_the_same_simulation():
    """`kv_cache_dtype="fp8"` (packed FP8 entries, FP4 indexer keys, the activation simulation on)
    gives the same greedy tokens as native pools with the simulation switched on by hand, through
    prefix hits and batched decode, and holds fewer bytes per page."""
    kw = dict(dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=64, page_size=4, seed=3)
    fp8 = LLM("test", kv_cache_dtype="fp8", **kw)
    native = LLM("test", **kw)
    native.model.set_activation_sim(True)
    prompts = prompts_with_shared_prefixes()
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = fp8.generate([{"prompt_token_ids": p} for p in prompts], sp)
    b = native.generate([{"prompt_token_ids": p} for p in prompts], sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.num_cached_tokens for o in a] == [o.num_cached_tokens for o in b]
    assert fp8.stats()["page_bytes_per_token"] < 0.6 * native.stats()["page_bytes_per_token"]
    with pytest.raises(ValueError, match="use_kernels=False"):
        LLM("test", kv_cache_dtype="fp8", use_kernels=True, **kw)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("test", kv_cache_dtype="int4", **kw)
