import pytest

from batchv4 import CompletionOutput, RequestOutput, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert p.logprobs is None and p.seed is None
    assert not p.is_greedy and not p.has_penalties


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=[5, 7], top_k=-1, temperature=0)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 7) and p.top_k == 0
    assert p.is_greedy and isinstance(p.temperature, float)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(p) == hash(SamplingParams(stop=["###"], stop_token_ids=(5, 7), top_k=0, temperature=0.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 1.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"logprobs": 21}, "logprobs must be in [0, 20]"),
        ({"logprobs": -1}, "logprobs must be in [0, 20]"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"top_k": -2}, "top_k must be 0 or -1 (off) or >= 1"),
        ({"min_p": 1.1}, "min_p must be in [0, 1]"),
        ({"stop": ["ok", ""]}, "stop must not contain an empty string"),
        ({"stop": [3]}, "stop must contain only strings"),
        ({"stop_token_ids": [1, -4]}, "stop_token_ids[1] must be >= 0"),
        ({"ignore_eos": 1}, "ignore_eos must be true or false"),
        ({"seed": "7"}, "seed must be an integer"),
    ],
)
def test_validation_names_the_parameter(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_replace_validates_and_rejects_unknown():
    p = SamplingParams(temperature=0.7, stop="x")
    q = p.replace(max_tokens=5, stop=["y"])
    assert (q.max_tokens, q.temperature, q.stop) == (5, 0.7, ("y",)) and p.max_tokens == 16
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        p.replace(temperature=-0.5)
    with pytest.raises(ValueError, match="unknown sampling parameter 'beam_width'"):
        p.replace(beam_width=2)
    with pytest.raises(AttributeError):
        p.temperature = 3.0


def test_to_dict_round_trips():
    p = SamplingParams(n=2, stop=["a"], stop_token_ids=[9], logprobs=3, seed=11, min_p=0.1)
    d = p.to_dict()
    assert d["stop"] == ["a"] and d["stop_token_ids"] == [9] and d["logprobs"] == 3
    assert SamplingParams(**d) == p


def test_from_openai_maps_chat_body():
    body = {
        "model": "deepseek-v4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "temperature": 0.2, "top_p": 0.9, "n": 3, "stop": "END", "seed": 4, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 5, "stream": False, "user": None,
    }
    p = SamplingParams.from_openai(body)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (50, 0.2, 0.9, 3, ("END",), 4)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -0.5, 5)
    assert SamplingParams.from_openai({"max_tokens": 10, "max_completion_tokens": 20}).max_tokens == 20
    assert SamplingParams.from_openai({"logprobs": True}).logprobs == 0
    assert SamplingParams.from_openai({"logprobs": False}).logprobs is None
    assert SamplingParams.from_openai({"temperature": None}).temperature == 1.0
    assert SamplingParams.from_openai({"top_k": 20, "ignore_eos": True}).top_k == 20
    assert SamplingParams.from_openai({}) == SamplingParams()


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens must be >= 1"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_logprobs": 3}, "top_logprobs requires logprobs to be true"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs must be in [0, 20]"),
        ({"logprobs": "yes"}, "logprobs must be true or false"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
    ],
)
def test_from_openai_errors_name_the_key(body, message):
    with pytest.raises(ValueError) as e:
        SamplingParams.from_openai(body)
    assert message in str(e.value)


def test_from_openai_rejects_non_object():
    with pytest.raises(ValueError, match="request body must be an object"):
        SamplingParams.from_openai(["max_tokens", 3])


def test_outputs_error_helper():
    out = RequestOutput.error("r1", [1, 2], "prompt too long", n=2)
    assert out.request_id == "r1" and out.prompt_token_ids == [1, 2] and out.finished and out.failed
    assert [o.index for o in out.outputs] == [0, 1]
    assert all(o.finish_reason == "error" and o.error == "prompt too long" and o.text == "" for o in out.outputs)
    assert RequestOutput.error("r2", None, "bad row").prompt_token_ids == []
    with pytest.raises(ValueError, match="non-empty message"):
        RequestOutput.error("r3", [], "")


def test_completion_output_invariants():
    ok = CompletionOutput(0, "hi", [5, 6], "stop", stop_reason="\n")
    assert ok.finished() and ok.num_reasoning_tokens == 0 and ok.logprobs is None
    assert not CompletionOutput(0, "", [], None).finished()
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        CompletionOutput(0, "", [], "done")
    with pytest.raises(ValueError, match="error must be set exactly"):
        CompletionOutput(0, "", [], "error")
    with pytest.raises(ValueError, match="error must be set exactly"):
        CompletionOutput(0, "", [], "stop", error="oops")
