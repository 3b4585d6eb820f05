"""The server's OpenAI wire format without a server: thinking switches, unsupported features, the
context rule, usage, and streamed deltas across the reasoning/answer boundary."""

import pytest

from batchv4.engine.outputs import CompletionOutput, RequestOutput
from batchv4.serve import protocol as P


def test_thinking_switches():
    assert not P.thinking_enabled({})
    assert P.thinking_enabled({"thinking": {"type": "enabled"}})
    assert not P.thinking_enabled({"thinking": {"type": "disabled"}})
    assert P.thinking_enabled({"chat_template_kwargs": {"thinking": True}})
    assert P.thinking_enabled({"chat_template_kwargs": {"enable_thinking": True}})
    with pytest.raises(P.ApiError) as ei:
        P.thinking_enabled({"thinking": {"type": "maybe"}})
    assert ei.value.status == 400 and ei.value.param == "thinking"
    assert P.reasoning_effort({"reasoning_effort": "low"}) == "high"
    assert P.reasoning_effort({"chat_template_kwargs": {"reasoning_effort": "max"}}) == "max"


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"logit_bias": {"1": 5}}, "logit_bias")])
def test_what_the_local_engine_lacks_is_400(body, param):
    with pytest.raises(P.ApiError) as ei:
        P.check_supported(body, chat=True)
    assert (ei.value.status, ei.value.param) == (400, param)


def test_unused_switches_pass():
    P.check_supported({"tools": [], "tool_choice": "none", "response_format": {"type": "json_object"}, "user": "u",
                       "some_vendor_key": 1}, chat=True)


def test_the_context_rule():
    assert P.max_tokens_for({}, 100, 1000, 4096, "messages") == 900
    assert P.max_tokens_for({"max_tokens": 10}, 100, 1000, 4096, "messages") == 10
    with pytest.raises(P.ApiError) as ei:
        P.max_tokens_for({"max_tokens": 901}, 100, 1000, 4096, "messages")
    assert ei.value.status == 400 and "maximum context length is 1000" in ei.value.message
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(P.ApiError):
        P.max_tokens_for({}, 1000, 1000, 4096, "prompt")


def test_bad_sampling_values_name_their_key():
    with pytest.raises(P.ApiError) as ei:
        P.sampling_overrides({"temperature": -1})
    assert (ei.value.status, ei.value.param) == (400, "temperature")


def test_usage_counts_each_prompt_once():
    outs = [RequestOutput("a", [1, 2, 3, 4], 2, [CompletionOutput(0, "x", [5, 6], "length", num_reasoning_tokens=1),
                                                 CompletionOutput(1, "y", [7], "stop")]),
            RequestOutput("b", [1, 2], 0, [CompletionOutput(0, "z", [8], "stop")])]
    assert P.usage(outs) == {
        "prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10, "prompt_cache_hit_tokens": 2,
        "prompt_cache_miss_tokens": 4, "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 1}}


def test_streamed_deltas_cross_from_reasoning_to_the_answer():
    fmt = P.StreamFormat("id", 0, "m", True, None, None, include_usage=False)
    st = P.ChoiceStream(thinking=True)
    sent = []
    for text, fin in [("Let me", None), ("Let me think.", None), ("Let me think.</think>The", None),
                      ("Let me think.</think>The answer", "stop")]:
        sent += [c["choices"][0] for c in fmt.delta(0, st, text, fin, [])]
    assert [c["delta"] for c in sent] == [
        {"reasoning_content": "Let me", "reasoning": "Let me"},
        {"reasoning_content": " think.", "reasoning": " think."},
        {"content": "The"}, {"content": " answer"}]
    assert [c["finish_reason"] for c in sent] == [None, None, None, "stop"]
    # a finish with nothing new still says why
    st2 = P.ChoiceStream()
    assert fmt.delta(0, st2, "abc", None, [])[0]["choices"][0]["delta"] == {"content": "abc"}
    last = fmt.delta(0, st2, "abc", "length", [])
    assert [c["choices"][0] for c in last] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
