"""The rank group's control messages are JSON (never pickle): round trips and refusals."""

import pytest

from batchv4.engine.distributed.wire import decode, encode
from batchv4.engine.outputs import CompletionOutput, RequestOutput
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, SavePlan
from batchv4.structured import StructuredOutputsParams


def test_round_trips():
    sp = SamplingParams(n=2, max_tokens=5, stop=["x"], seed=3,
                        structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    req = EngineRequest("r1", [1, 2, 3], sp, resume_key=(7, 2), resume_pos=2,
                        saves=(SavePlan((7, 3), 3, 1),), thinking=True, group=4)
    out = RequestOutput("r1", [1, 2], 1, [CompletionOutput(0, "hi", [5], "stop")],
                        metrics={"engine_seconds_by_sample": [0.5]})
    msg = [("step", [req]), {"pages": {4: 10, 128: 2}}, out, None]
    back = decode(encode(msg))
    assert back == msg
    assert back[0][1][0].resume_key == (7, 2) and hash(back[0][1][0].saves[0].key) == hash((7, 3))


def test_refusals():
    with pytest.raises(ValueError, match="unknown type"):
        decode(b'{"__type": "Popen", "fields": {}}')
    with pytest.raises(TypeError):
        encode(object())
