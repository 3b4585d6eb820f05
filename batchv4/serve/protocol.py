"""The OpenAI wire format of the server: request bodies in, response objects and stream chunks out.

Owns: `ApiError` (an OpenAI-style error with its HTTP status), reading the parts of a chat or
completions body that the engine does not parse itself (messages, prompts, thinking switches,
features the local engine lacks), the context-length rule, usage with DeepSeek's and OpenAI's
names, logprobs, and building `chat.completion`, `text_completion` and their chunks, including the
reasoning/answer split of streamed text. Sampling parameters are read by
`batchv4.engine.sampling_params.openai_overrides`, the one body parser. Does not own: HTTP, the
engine thread, tokenization itself (the tokenizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from batchv4.errors import UserError
from batchv4.tokenizer import split_reasoning


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(e: Exception, body: dict | None = None) -> ApiError:
    """A 400 from a UserError whose message starts with the body key it is about."""
    msg = str(e)
    m = re.match(r"([A-Za-z_]+)", msg)
    param = m.group(1) if m and (body is None or m.group(1) in body) else None
    return ApiError(400, msg, param=param)


_UNSUPPORTED_TOOLS = "tools are not supported by batchv4's local engine"


def check_supported(body: dict, chat: bool) -> None:
    """400 for what the local engine cannot do (rather than silently doing something else)."""
    for key in ("tools", "functions"):
        if body.get(key):
            raise ApiError(400, _UNSUPPORTED_TOOLS, param=key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) is not None and body.get(key) != "none":
            raise ApiError(400, _UNSUPPORTED_TOOLS, param=key)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by batchv4's local engine", param="logit_bias")
    if not chat:
        if body.get("echo"):
            raise ApiError(400, "echo is not supported by batchv4's local engine", param="echo")
        if body.get("suffix"):
            raise ApiError(400, "suffix is not supported by batchv4's local engine", param="suffix")
        best_of = body.get("best_of")
        if best_of is not None and best_of != (body.get("n") or 1):
            raise ApiError(400, "best_of other than n is not supported by batchv4's local engine",
                           param="best_of")
    if body.get("stream") not in (None, True, False):
        raise ApiError(400, f"stream must be true or false, got {body.get('stream')!r}", param="stream")


def thinking_enabled(body: dict) -> bool:
    """DeepSeek's `"thinking": {"type": "enabled"}` or vLLM's `chat_template_kwargs` `thinking` /
    `enable_thinking`; off by default."""
    on = False
    t = body.get("thinking")
    if isinstance(t, dict):
        kind = t.get("type")
        if kind not in ("enabled", "disabled", None):
            raise ApiError(400, f"thinking.type must be 'enabled' or 'disabled', got {kind!r}", param="thinking")
        on = kind == "enabled"
    elif isinstance(t, bool):
        on = t
    elif t is not None:
        raise ApiError(400, "thinking must be an object like {\"type\": \"enabled\"}", param="thinking")
    kw = body.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise ApiError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    for key in ("thinking", "enable_thinking"):
        if kw and kw.get(key) is True:
            on = True
    return on


_EFFORTS = {None: None, "low": "high", "medium": "high", "high": "high", "max": "max", "xhigh": "max"}


def reasoning_effort(body: dict) -> str | None:
    """V4 knows "high" (the default) and "max"; OpenAI's lower levels mean "high"."""
    kw = body.get("chat_template_kwargs") or {}
    v = body.get("reasoning_effort", kw.get("reasoning_effort"))
    if v not in _EFFORTS:
        raise ApiError(400, f"reasoning_effort must be one of low, medium, high, max, got {v!r}",
                       param="reasoning_effort")
    return _EFFORTS[v]


def prompts(body: dict) -> list:
    """A completions body's prompts: each a string or a list of token ids."""
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "prompt: required", param="prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in p):
            return [list(x) for x in p]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                        "lists of token ids (none empty)", param="prompt")


def max_tokens_for(overrides: dict, num_prompt: int, max_model_len: int, default: int, what: str) -> int:
    """The request's max_tokens: as asked, checked against the context (vLLM's 400), or when not
    asked the default cut to what the context leaves."""
    asked = overrides.get("max_tokens")
    if asked is None:
        room = max_model_len - num_prompt
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                                f"{what} is {num_prompt} tokens long, which leaves no room for the completion. "
                                f"Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        return min(default, room)
    if num_prompt + asked > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {num_prompt + asked} tokens ({num_prompt} in the {what}, {asked} in the "
                            f"completion). Please reduce the length of the {what} or completion.",
                       param=what, code="context_length_exceeded")
    return asked


def sampling_overrides(body: dict) -> dict:
    from batchv4.engine.sampling_params import openai_overrides

    try:
        return openai_overrides(body)
    except UserError as e:
        raise bad_request(e, body) from None


# ---- responses ----------------------------------------------------------------------------------
def usage(outs: list) -> dict:
    """Usage of RequestOutputs (one per prompt; each prompt counted once, however many samples)."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    hit = sum(o.num_cached_tokens for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    reasoning = sum(c.num_reasoning_tokens for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def _token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t])


def chat_logprobs(tokenizer, token_ids: list[int], lps: list, k: int) -> dict:
    content = []
    for t, d in zip(token_ids, lps):
        d = d or {}
        s = _token_text(tokenizer, t)
        top = [{"token": _token_text(tokenizer, i), "logprob": v, "bytes": list(_token_text(tokenizer, i).encode())}
               for i, v in list(d.items())[:k]]
        content.append({"token": s, "logprob": d.get(t), "bytes": list(s.encode()), "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, token_ids: list[int], lps: list, k: int, offset: int = 0) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, d in zip(token_ids, lps):
        d = d or {}
        s = _token_text(tokenizer, t)
        tokens.append(s)
        token_lps.append(d.get(t))
        tops.append({_token_text(tokenizer, i): v for i, v in list(d.items())[:k]} if k else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_message(c, thinking: bool) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text}
    if thinking:
        msg["reasoning_content"] = msg["reasoning"] = c.reasoning_text or ""
    return msg


def chat_response(rid: str, created: int, model: str, out, thinking: bool, tokenizer, k: int | None) -> dict:
    choices = []
    for c in out.outputs:
        lp = chat_logprobs(tokenizer, c.token_ids, c.logprobs or [], k) if k is not None else None
        choices.append({"index": c.index, "message": chat_message(c, thinking), "logprobs": lp,
                        "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage([out])}


def completion_response(rid: str, created: int, model: str, outs: list, n: int, tokenizer, k: int | None) -> dict:
    choices = []
    for i, out in enumerate(outs):
        for c in out.outputs:
            lp = completion_logprobs(tokenizer, c.token_ids, c.logprobs or [], k) if k is not None else None
            choices.append({"index": i * n + c.index, "text": c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(outs)}


# ---- streams ------------------------------------------------------------------------------------
@dataclass
class ChoiceStream:
    """One streamed choice: what was sent so far, so each engine delta becomes the text it adds."""

    thinking: bool = False
    reasoning: str = ""
    content: str = ""
    offset: int = 0                       # characters sent (completions' text_offset)
    finished: bool = False
    parts: list = field(default_factory=list)

    def advance(self, text: str) -> tuple[str, str]:
        """(new reasoning, new answer) from the sample's whole visible text so far."""
        reasoning, content = split_reasoning(text, self.thinking)
        dr = (reasoning or "")[len(self.reasoning):]
        dc = content[len(self.content):]
        self.reasoning, self.content = reasoning or "", content
        return dr, dc


class StreamFormat:
    """Chunks of one streamed request, in OpenAI's chunk format (chat or completions)."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, tokenizer, k: int | None,
                 include_usage: bool) -> None:
        self.rid, self.created, self.model, self.chat = rid, created, model, chat
        self.tokenizer, self.k, self.include_usage = tokenizer, k, include_usage

    def _chunk(self, choices: list) -> dict:
        d = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
             "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            d["usage"] = None
        return d

    def first(self, index: int) -> dict:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta(self, index: int, st: ChoiceStream, text: str, finish_reason: str | None, new_tokens: list) -> list[dict]:
        dr, dc = st.advance(text)
        lp = None
        if self.k is not None and new_tokens:
            ids, lps = [t for t, _ in new_tokens], [d for _, d in new_tokens]
            lp = chat_logprobs(self.tokenizer, ids, lps, self.k) if self.chat else \
                completion_logprobs(self.tokenizer, ids, lps, self.k, st.offset)
        out = []
        if self.chat:
            deltas = []
            if dr:
                deltas.append({"reasoning_content": dr, "reasoning": dr})
            if dc:
                deltas.append({"content": dc})
            if not deltas and (finish_reason is not None or lp is not None):
                deltas.append({})
            for j, d in enumerate(deltas):
                last = j == len(deltas) - 1
                out.append(self._chunk([{"index": index, "delta": d, "logprobs": lp if last else None,
                                         "finish_reason": finish_reason if last else None}]))
        elif dc or finish_reason is not None or lp is not None:
            out.append(self._chunk([{"index": index, "text": dc, "logprobs": lp, "finish_reason": finish_reason}]))
        st.offset += len(dr) + len(dc)
        if finish_reason is not None:
            st.finished = True
        return out

    def usage_chunk(self, outs: list) -> dict:
        d = self._chunk([])
        d["usage"] = usage(outs)
        return d
