"""The engine's results: RequestOutput (one per prompt) holding CompletionOutputs (one per sample).

Owns: the result types and their invariants (a known finish reason; an error message exactly when
the finish reason is "error"), and `RequestOutput.error()` for rows that fail before or during
generation.
Does not own: producing results (the engine), token accounting or prices (accounting/), or
writing them (io/). Never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# "tool_calls" and "content_filter" come only from remote providers
FinishReason = Literal["stop", "length", "error", "tool_calls", "content_filter"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "error", "tool_calls", "content_filter")


@dataclass
class CompletionOutput:
    """One sample of a request.

    `token_ids` are all generated tokens, including a stop token (EOS or one of `stop_token_ids`),
    and the tokens of a matched stop string, which `text` leaves out. `finish_reason` is None only
    while the sample is still running. `stop_reason` is the matched stop string or stop token id
    (None for EOS and for length). `logprobs[i]` maps token ids to logprobs for the i-th generated
    token when logprobs were requested; `cumulative_logprob` is then the sum over the sampled
    tokens. `usage` is set by backends that are billed per sample (a remote API): prompt_tokens,
    prompt_cache_hit_tokens, completion_tokens, reasoning_tokens as the provider counted them,
    `counted_locally` when the response had none and batchv4's tokenizer counted, `finished_at`
    (an aware datetime), `model` (the model that answered) and `provider_request_id`.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    error: str | None = None
    reasoning_text: str | None = None
    num_reasoning_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None
    usage: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {self.finish_reason!r}")
        if (self.finish_reason == "error") != (self.error is not None):
            raise ValueError("error must be set exactly when finish_reason is 'error'")

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result for one prompt: its samples, in sample order.

    `num_cached_tokens` counts the prompt tokens served from the prefix cache. `metrics` holds
    per-request timings and counters (names chosen by the engine).
    """

    request_id: str
    prompt_token_ids: list[int]
    num_cached_tokens: int
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(o.finish_reason == "error" for o in self.outputs)

    @classmethod
    def error(
        cls, request_id: str, prompt_token_ids: Sequence[int] | None, message: str, n: int = 1
    ) -> RequestOutput:
        """A finished result whose `n` samples all failed with `message` (no text, no tokens)."""
        if not message:
            raise ValueError("an error result needs a non-empty message")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        outputs = [CompletionOutput(i, "", [], "error", error=message) for i in range(n)]
        return cls(request_id, list(prompt_token_ids or []), 0, outputs)


def request_output(request_id: str, prompt_token_ids: Sequence[int], seqs: Sequence[Any], thinking: bool,
                   think_end_id: int, num_cached_tokens: int, error: str | None = None, n: int = 1
                   ) -> RequestOutput:
    """The RequestOutput of a finished request from its samples' sequences (the scheduler's
    `Sequence`: tokens, num_prompt, detok, finish and stop reasons, logprobs), or its error."""
    if error is not None:
        return RequestOutput.error(request_id, prompt_token_ids, error, n=n)
    from batchv4.tokenizer import count_reasoning_tokens, split_reasoning

    outs = []
    for x in seqs:
        text, reasoning, n_reason = x.detok.text, None, 0
        generated = x.tokens[x.num_prompt:]
        if thinking:
            reasoning, text = split_reasoning(text, True)
            n_reason = count_reasoning_tokens(generated, think_end_id)
        want_logprobs = x.request.params.logprobs is not None
        outs.append(CompletionOutput(
            index=x.sample_index, text=text, token_ids=generated, finish_reason=x.finish_reason, error=None,
            reasoning_text=reasoning, num_reasoning_tokens=n_reason,
            logprobs=x.out_logprobs if want_logprobs else None, cumulative_logprob=None, stop_reason=x.stop_reason))
    # forward seconds of the steps each sample took part in, split by its tokens in each step
    metrics = {"engine_seconds_by_sample": [x.engine_seconds for x in seqs]}
    return RequestOutput(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                         num_cached_tokens=num_cached_tokens, outputs=outs, metrics=metrics)
