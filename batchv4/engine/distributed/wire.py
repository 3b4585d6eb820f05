"""The rank group's control messages as JSON, never pickle: requests dealt to ranks, finished
outputs, statistics, and the spec a worker starts from.

`encode(obj) -> bytes` / `decode(bytes) -> obj` for JSON values plus tuples, dicts with non-string
keys, dtypes, and the engine's own dataclasses (`EngineRequest`, `SavePlan`, `SamplingParams`,
`StructuredOutputsParams`, `RequestOutput`, `CompletionOutput`, `RankGroupSpec`), each tagged by
name; decoding builds only those named types (an unknown tag is an error), so a message can never
run code.

Owns: the format. Does not own: what is sent when (`launcher`, `worker`) or the transport (`group`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def _types() -> dict[str, type]:
    from batchv4.engine.distributed.group import RankGroupSpec
    from batchv4.engine.outputs import CompletionOutput, RequestOutput
    from batchv4.engine.sampling_params import SamplingParams
    from batchv4.engine.scheduler import EngineRequest, SavePlan
    from batchv4.structured.params import StructuredOutputsParams

    return {t.__name__: t for t in (EngineRequest, SavePlan, SamplingParams, StructuredOutputsParams,
                                    RequestOutput, CompletionOutput, RankGroupSpec)}


def _enc(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        items = [_enc(v) for v in x]
        return items if isinstance(x, list) else {"__tuple": items}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {"__dict": {k: _enc(v) for k, v in x.items()}}
        return {"__pairs": [[_enc(k), _enc(v)] for k, v in x.items()]}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        name = type(x).__name__
        if name not in _types():
            raise TypeError(f"cannot send a {name}")
        return {"__type": name, "fields": {f.name: _enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    import torch

    if isinstance(x, torch.dtype):
        return {"__dtype": str(x).removeprefix("torch.")}
    raise TypeError(f"cannot send a {type(x).__name__}")


def _dec(x: Any, types: dict[str, type]) -> Any:
    if isinstance(x, list):
        return [_dec(v, types) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tuple" in x:
        return tuple(_dec(v, types) for v in x["__tuple"])
    if "__dict" in x:
        return {k: _dec(v, types) for k, v in x["__dict"].items()}
    if "__pairs" in x:
        return {_dec(k, types): _dec(v, types) for k, v in x["__pairs"]}
    if "__dtype" in x:
        import torch

        dt = getattr(torch, x["__dtype"], None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"not a dtype: {x['__dtype']!r}")
        return dt
    if "__type" in x:
        t = types.get(x["__type"])
        if t is None:
            raise ValueError(f"unknown type in a rank message: {x['__type']!r}")
        return t(**{k: _dec(v, types) for k, v in x["fields"].items()})
    raise ValueError("malformed rank message")


def encode(obj: Any) -> bytes:
    return json.dumps(_enc(obj), separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> Any:
    return _dec(json.loads(data.decode("utf-8")), _types())
