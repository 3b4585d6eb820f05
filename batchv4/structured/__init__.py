"""Structured outputs: constrained decoding over the V4 tokenizer with llguidance (params, grammars,
the engine's per-step processor, output checks)."""

from batchv4.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
