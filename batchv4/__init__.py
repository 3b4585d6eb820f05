"""batchv4: offline batch inference for DeepSeek-V4-class MoE models.

The public engine API (`LLM`, `SamplingParams`, `RequestOutput`, `CompletionOutput`) is exported
lazily so that `import batchv4` (and `batchv4 estimate`) never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": "batchv4.engine.llm",
    "SamplingParams": "batchv4.engine.sampling_params",
    "RequestOutput": "batchv4.engine.outputs",
    "CompletionOutput": "batchv4.engine.outputs",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchv4' has no attribute {name!r}")
