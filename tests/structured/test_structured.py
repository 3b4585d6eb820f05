"""Structured outputs in the engine (tiny preset, random weights: without the mask its outputs are
random text, so every valid output here is the constraint's doing)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from batchv4 import LLM, SamplingParams
from batchv4.engine.scheduler import EngineRequest
from batchv4.structured import StructuredOutputsParams
from batchv4.structured.check import check_output
from batchv4.structured.grammars import compiler_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
                 "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                  "zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
                 "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}
JSON = StructuredOutputsParams(json=SCHEMA)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", dtype="float32", max_num_seqs=16)


def convs(n, prefix=""):
    return [[{"role": "user", "content": f"{prefix}Describe animal number {i}."}] for i in range(n)]


def assert_valid(outs, n=1):
    for o in outs:
        assert len(o.outputs) == n
        for c in o.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_schema_greedy_and_sampled_with_n(llm):
    assert_valid(llm.chat(convs(3), SamplingParams(temperature=0, max_tokens=120, structured_outputs=JSON)))
    outs = llm.chat(convs(3), SamplingParams(temperature=1.0, max_tokens=120, n=3, seed=5, structured_outputs=JSON))
    assert_valid(outs, n=3)
    texts = {c.text for o in outs for c in o.outputs}
    assert len(texts) > 3                     # sampled: the samples differ, all of them valid


def test_regex_choice_and_a_budgeted_thinking_mode(llm):
    rx = StructuredOutputsParams(regex=r"[A-Z][a-z]{2,5}-[0-9]{3}")
    outs = llm.chat(convs(3), SamplingParams(temperature=1.0, max_tokens=30, seed=2, structured_outputs=rx))
    import re

    assert all(re.fullmatch(rx.regex, o.outputs[0].text) and o.outputs[0].finish_reason == "stop" for o in outs)
    ch = StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"])
    outs = llm.chat(convs(4), SamplingParams(temperature=1.0, max_tokens=10, seed=3, structured_outputs=ch))
    assert all(o.outputs[0].text in ch.choice for o in outs)
    # thinking: free text up to the budget, then </think> forced, then the constraint
    sp = SamplingParams(temperature=1.0, max_tokens=140, seed=4, max_thinking_tokens=6, structured_outputs=JSON)
    outs = llm.chat(convs(2), sp, thinking=True)
    for o in outs:
        c = o.outputs[0]
        assert c.num_reasoning_tokens == 7           # six free tokens and the forced </think>
        assert c.reasoning_text is not None
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_across_preemption_and_prefix_restore(llm):
    """Later prompts restore a shared prefix from the plan's snapshot, and two sequences are
    preempted in the middle of their JSON (recomputed from their tokens); every output matches."""
    shared = "Shared context. " * 20
    sp = SamplingParams(temperature=0.7, max_tokens=120, seed=9, structured_outputs=JSON)
    ids = llm.tokenizer.chat_token_ids(convs(5, prefix=shared), False)
    reqs = list(llm.plan_requests([f"r{i}" for i in range(5)], ids, [sp] * 5, [False] * 5))
    sch = llm.scheduler
    for r in reqs:
        sch.add_request(r)
    outs, steps, preempted = [], 0, 0
    try:
        while sch.has_work():
            outs += llm.step()
            steps += 1
            if steps in (12, 20):
                victim = next(s for s in sch.running if s.num_generated > 3)
                sch._preempt(victim)
                preempted += 1
    finally:
        sch.abort_all()
    assert preempted == 2 and len(outs) == 5
    assert sum(o.num_cached_tokens > 0 for o in outs) >= 2     # restored from the shared prefix
    assert_valid(outs)


def test_the_mask_never_allows_a_token_the_grammar_rejects(llm):
    """At several states of a matcher, no token the processor leaves finite is one the grammar
    rejects (checked for every allowed token and 3,000 random others, each consumed by a copy of an
    independent matcher in the same state)."""
    proc = llm.structured
    comp = compiler_for(llm.tokenizer, llm.cfg.vocab_size)
    ref = comp.matcher(JSON)
    text = '{"name":"ab","age":42,"kind":"dog","tags":[1,2],"home":{"city":"x","zip":1234}}'
    ids = llm.tokenizer.encode(text)
    rng = random.Random(0)
    sp = SamplingParams(temperature=0, max_tokens=200, structured_outputs=JSON)
    req = EngineRequest("mask-test", [1, 2, 3], sp)

    class Seq:
        request, sample_index = req, 0

    class Row:
        request_id, sample_index, step, params = "mask-test", 0, 0, sp

    class Chunk:
        seq, num_samples, sample = Seq, 1, True

    class Plan:
        chunks, ready = [Chunk], []

    try:
        for k in range(0, len(ids) + 1, 5):
            proc.prepare(Plan)
            out = proc([Row], torch.zeros(1, llm.cfg.vocab_size))[0]
            allowed = set(torch.nonzero(torch.isfinite(out)).flatten().tolist())
            sample = allowed | {rng.randrange(llm.cfg.vocab_size) for _ in range(3000)}
            assert allowed
            for t in sample:          # allowed => accepted (the mask may leave out non-canonical spellings)
                accepted = ref.deep_copy().try_consume_tokens([t]) == 1 or (t == llm.tokenizer.eos_id
                                                                           and ref.is_accepting())
                assert accepted or t not in allowed, (k, t)
            for t in ids[k:k + 5]:                 # advance both, as the scheduler's update does
                proc.on_token(Seq, t)
                assert ref.consume_token(t)
    finally:
        proc.on_finish(Seq)


def test_length_is_not_valid_and_a_bad_schema_fails_its_request_alone(llm):
    outs = llm.chat(convs(1), SamplingParams(temperature=0, max_tokens=5, structured_outputs=JSON))
    c = outs[0].outputs[0]
    assert c.finish_reason == "length"
    assert check_output(JSON, c.text, c.finish_reason) == (False, None)
    bad = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "strin"}}})
    ok = SamplingParams(temperature=0, max_tokens=4)
    reqs = [EngineRequest("bad", llm.tokenizer.encode("hi"), SamplingParams(max_tokens=4, structured_outputs=bad)),
            EngineRequest("ok", llm.tokenizer.encode("hi"), ok)]
    res = {o.request_id: o for o in llm.generate_stream(reqs)}
    assert res["bad"].failed and "strin" in res["bad"].outputs[0].error
    assert not res["ok"].failed


def test_checks():
    assert check_output(JSON, '{"name":"a"}', "stop") == (False, '{"name":"a"}')
    good = '{"name":"ab","age":42,"kind":"dog","tags":[1,2],"home":{"city":"x","zip":1234}}'
    assert check_output(JSON, good, "stop") == (True, good)
    assert check_output(StructuredOutputsParams(json_object=True), '{"a": 1}', "stop") == (True, '{"a":1}')
    assert check_output(StructuredOutputsParams(choice=["a", "b"]), "b", "stop")[0]
    assert not check_output(StructuredOutputsParams(regex="[0-9]+"), "12a", "stop")[0]
