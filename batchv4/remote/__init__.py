"""Remote backends: OpenAI-compatible chat-completions APIs (DeepSeek, vLLM, SGLang, `batchv4 serve`)
behind the engine's backend protocol. Never imports torch."""

from batchv4.remote.client import OpenAIBackend

__all__ = ["OpenAIBackend"]
