"""The prompts and the cutting of `summarize`: documents into chunks on token boundaries, and
summaries into merge groups that fit the context.

Every prompt is `[system: the instructions, user: a fixed header + text]`, so its first tokens
(BOS, the instructions, the user marker, the header) are the same for the whole corpus and are
computed once. A chunk is cut at a token boundary no later than its token budget allows, at the
last paragraph break in the last quarter of the window if there is one, else the last line break,
else the last word boundary, else exactly at the budget. Chunks are measured with their exact
chat-encoded prompt and cut again, shorter, when the text re-tokenizes longer than its slice.

Owns: reading the corpus into documents (Parquet/JSONL rows through `batchv4.io`, or a folder of
text files), the prompt texts, `Layout` (the token overheads and budgets of one configuration),
`cut_document` and `merge_groups`. Does not own: running anything (`pipelines.summarize`), the
tokenizer itself (`batchv4.tokenizer`). Never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from batchv4.errors import UserError

DEFAULT_INSTRUCTIONS = (
    "You summarize documents. Write a faithful, self-contained summary in plain prose: keep the "
    "main claims, definitions, names, numbers and conclusions, in the order the text gives them; "
    "leave out examples, repetition and formatting. Do not add anything the text does not say. "
    "When the text is a part of a longer document, summarize only that part."
)
CHUNK_HEADER = "An excerpt of a longer document follows.\n\n"
MERGE_HEADER = ("Summaries of consecutive parts of one document follow, in order. Merge them into one "
                "summary of the whole.\n\n")
CORPUS_HEADER = ("Summaries of the documents of one corpus follow. Merge them into one summary of the "
                 "corpus.\n\n")
RUNNING_HEADER = ("The summary so far of a document follows, then its next part. Rewrite the summary so "
                  "that it covers both.\n\n")
CORPUS_RUNNING_HEADER = ("The summary so far of a corpus follows, then summaries of its next documents. Rewrite "
                         "the summary so that it covers them all.\n\n")
SEPARATOR = "\n\n"
RUNNING_MID = "\n\nNext part:\n\n"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")   # a folder of these: one document per file
MARGIN = 4          # tokens: a cut text may re-tokenize a little longer than its slice


def messages(instructions: str, user: str) -> list[dict]:
    return [{"role": "system", "content": instructions}, {"role": "user", "content": user}]


def join_summaries(header: str, texts: list[str]) -> str:
    return header + SEPARATOR.join(texts)


def running_text(summary: str, chunk: str) -> str:
    return RUNNING_HEADER + "Summary so far:\n\n" + summary + RUNNING_MID + chunk


def corpus_running_header(summary: str) -> str:
    """The head of a running corpus step; the next documents' summaries follow it."""
    return CORPUS_RUNNING_HEADER + "Summary so far:\n\n" + summary + "\n\nNext documents:\n\n"


@dataclass(frozen=True)
class Layout:
    """Token counts of one configuration: `prompt_len(user)` is the exact prompt length."""

    tok: object                 # V4Tokenizer
    instructions: str
    max_model_len: int
    max_summary_tokens: int

    def prompt_lens(self, users: list[str]) -> list[int]:
        if not users:
            return []
        return [len(ids) for ids in self.tok.chat_token_ids([messages(self.instructions, u) for u in users], False)]

    def prompt_len(self, user: str) -> int:
        return self.prompt_lens([user])[0]

    def fits(self, prompt_tokens: int) -> bool:
        return prompt_tokens + self.max_summary_tokens <= self.max_model_len

    def budget(self, header: str, reserved: int = 0) -> int:
        """Text tokens that fit after `header` (and `reserved` tokens of other text)."""
        return self.max_model_len - self.max_summary_tokens - self.prompt_len(header) - reserved - MARGIN

    def check(self, strategy: str) -> None:
        """Two summaries must fit a merge prompt, and a chunk must hold some text (UserError)."""
        merge = self.budget(MERGE_HEADER)
        if merge < 2 * self.max_summary_tokens + 2:
            raise UserError(f"--max-model-len {self.max_model_len} leaves room for {max(merge, 0)} tokens of "
                            f"summaries in a merge prompt; two summaries of --max-summary-tokens "
                            f"{self.max_summary_tokens} need {2 * self.max_summary_tokens + 2}: raise "
                            "--max-model-len or lower --max-summary-tokens")
        if strategy == "incremental" and self.budget(RUNNING_HEADER, self.max_summary_tokens + 16) < 16:
            raise UserError(f"--max-model-len {self.max_model_len} leaves no room for text beside a running "
                            f"summary of {self.max_summary_tokens} tokens (--strategy incremental)")


@dataclass(frozen=True)
class Chunk:
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int


def encode_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` alone and each token's character span (HF offsets are characters)."""
    enc = tok._tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def _score(text: str, pos: int) -> int:
    before = text[max(0, pos - 2):pos]
    if before.endswith("\n\n"):
        return 3
    if before.endswith("\n"):
        return 2
    if before[-1:].isspace() or text[pos:pos + 1].isspace():
        return 1
    return 0


def _cut(text: str, offsets: list, start: int, size: int) -> int:
    """The token index to end a chunk starting at token `start` that holds at most `size` tokens."""
    n = len(offsets)
    end = start + size
    if end >= n:
        return n
    best, best_score = end, -1
    for t in range(end, max(start + 1, end - max(1, size // 4)) - 1, -1):
        if offsets[t][0] < offsets[t - 1][1]:       # inside one character's bytes: not a cut
            continue
        s = _score(text, offsets[t][0])
        if s > best_score:
            best, best_score = t, s
            if s == 3:
                break
    return best


def cut_document(layout: Layout, text: str, header: str, size: int, reserved: int = 0) -> list[Chunk]:
    """Chunks covering `text` (char offsets with no gap and no overlap), each of at most `size`
    tokens and each prompt (`header` + chunk, plus `reserved` tokens of other text) within the
    context with room for a summary."""
    if size < 1:
        raise UserError(f"chunks of {size} tokens: raise --max-model-len or lower --max-summary-tokens")
    ids, offsets = encode_offsets(layout.tok, text)
    n = len(ids)
    if n == 0:
        return [Chunk(text, 0, len(text), 0, 0)]
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        want = size
        while True:
            end = _cut(text, offsets, start, want)
            c0 = 0 if start == 0 else offsets[start][0]
            c1 = len(text) if end >= n else offsets[end][0]
            piece = text[c0:c1]
            if layout.fits(layout.prompt_len(header + piece) + reserved) or end - start <= 1:
                break
            want = max(1, min(want, end - start) - 8)
        chunks.append(Chunk(piece, c0, c1, start, end))
        start = end
    return chunks


def truncate(tok, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (a summary longer than a merge can hold)."""
    ids, offsets = encode_offsets(tok, text)
    if len(ids) <= max_tokens:
        return text
    return text[:offsets[max_tokens - 1][1]]


def pack_by_length(lens: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indexes whose lengths sum to at most `budget` (an item longer than
    the budget is a group alone)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(lens):
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + ([cur] if cur else [])


def merge_groups(layout: Layout, texts: list[str], header: str) -> list[list[int]]:
    """Consecutive groups of `texts` (indexes) whose merge prompt fits with room for a summary,
    each of two or more items where the budget allows (texts are at most half the budget, see
    `item_cap`); a group of one is passed up unmerged by the caller."""
    lens = [len(layout.tok.encode(t)) + 2 for t in texts]
    out: list[list[int]] = []
    for g in pack_by_length(lens, layout.budget(header)):            # exact check; split a group whose prompt is too long after all
        while len(g) > 1 and not layout.fits(layout.prompt_len(join_summaries(header, [texts[i] for i in g]))):
            out.append(g[:len(g) // 2])
            g = g[len(g) // 2:]
        out.append(g)
    return out


def item_cap(layout: Layout, header: str) -> int:
    """Tokens a summary may hold inside a merge prompt (half the budget, so two always fit)."""
    return max(1, layout.budget(header) // 2 - 2)


# ---- the corpus --------------------------------------------------------------------------------
def read_corpus(run, text_column: str, id_column: str | None,
                exclude: str | None = None) -> tuple[list[tuple[str, str]], list[dict]]:
    """(id, text) of every document, in corpus order, and the documents that cannot be read."""
    from batchv4.io.urls import get_fs

    so = run.storage_options or None
    url = run.input
    fs, path = get_fs(url, so)
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if not _hidden(os.path.relpath(f, path)))
        texts = [f for f in files if f.lower().endswith(TEXT_SUFFIXES)]
        if texts and len(texts) == len([f for f in files if not _is_output(f, exclude)]):
            return [(os.path.relpath(f, path), _read_text(fs, f)) for f in texts], []
    elif path.lower().endswith(TEXT_SUFFIXES):
        return [(os.path.basename(path), _read_text(fs, path))], []
    return _read_rows(run, text_column, id_column, exclude)


def _hidden(rel: str) -> bool:
    return any(p.startswith((".", "_")) for p in rel.split(os.sep))


def _is_output(f: str, exclude: str | None) -> bool:
    return exclude is not None and os.path.abspath(f).startswith(os.path.abspath(exclude) + os.sep)


def _read_text(fs, f: str) -> str:
    with fs.open(f, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _read_rows(run, text_column: str, id_column: str | None, exclude: str | None):
    from batchv4.io.readers import open_input

    src = open_input(run.input, run.fmt, storage_options=run.storage_options or None,
                     exclude=(exclude,) if exclude else ())
    columns = src.columns()
    if text_column not in columns:
        raise UserError(f"--text-column {text_column!r} is not a column of the corpus (columns: "
                        f"{', '.join(columns) or 'none'})")
    id_col = id_column or ("id" if "id" in columns else None)
    if id_column and id_column not in columns:
        raise UserError(f"--id-column {id_column!r} is not a column of the corpus")
    docs, bad, seen = [], [], set()
    for batch in src.iter_rows():
        for raw in batch:
            data = raw.data or {}
            did = str(data.get(id_col)) if id_col and data.get(id_col) is not None else str(raw.index)
            text = data.get(text_column)
            err = raw.error or (None if isinstance(text, str) and text.strip() else
                                f"{text_column} is {'empty' if isinstance(text, str) else 'not a string'}")
            if err is None and did in seen:
                err = f"duplicate id {did!r}"
            if err is not None:
                bad.append({"id": did, "row_index": raw.index, "error": err})
                continue
            seen.add(did)
            docs.append((did, text))
    return docs, bad
