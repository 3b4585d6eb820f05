"""`summarize`: long documents and whole corpora, as a composition of `run`, level by level.

A document whose prompt (the instructions, then its text) fits the context with room for a summary
is summarized in one pass. A longer one is cut into chunks (`summarize_chunks`); each chunk is
summarized (map), then the summaries are merged in groups that fit, level by level, until one
remains (hierarchical), or with `strategy="incremental"` a running summary is rewritten chunk by
chunk. `corpus_summary` then merges the document summaries into one the same way: in groups,
level by level, or as a running summary rewritten with the next documents' summaries (as many as
fit each step).

Each round of work is one ordinary durable `run` over a JSONL input that this module writes (one
row per chunk or merge, `id` = the chunk id, `messages` = [system: the instructions, user: the
text]); round N+1's input is built from round N's outputs, which are a function of the corpus and
the configuration only, so a killed job rerun rebuilds the same inputs and each round's `run`
resumes where it stopped (the rounds already finished generate nothing):

    OUT/documents.parquet     one row per document: summary, levels, token counts, cost_usd
    OUT/chunks.parquet        one row per chunk or merge: the tree, offsets, summary, tokens, cost
    OUT/corpus.json           the corpus summary and its merges (with corpus_summary)
    OUT/summary.json          totals, counts, the rounds, this invocation's engine figures
    OUT/_inputs/<round>.jsonl the input of each round
    OUT/_levels/<round>/      each round's run (parts, errors-*.parquet, summary.json)

Rounds are `level-N` (the documents' rounds) and `corpus-N`. With the hierarchical strategy a
document's round N is its level N. With the incremental one every step reads from the document,
so every step is a level-1 chunk (covering its own part of the text), the parent of step k is step
k+1, and the last step's summary is the document's. A group of one summary is passed up unmerged.

Owns: the rounds, the tree, the output tables. Does not own: generation, resume, prices per row
(`pipelines.run`), reading the corpus, prompts and cutting (`summarize_chunks`), the estimate (`summarize_estimate`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace

from batchv4.errors import UserError
from batchv4.pipelines import summarize_chunks as sc
from batchv4.pipelines.run_config import RunConfig

V4_CONTEXT = 1_048_576          # the context assumed for a remote V4 without --max-model-len
USAGE = ("prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "api_cache_hit_tokens",
         "completion_tokens", "reasoning_tokens")


@dataclass(frozen=True)
class SummarizeConfig:
    run: RunConfig                   # input = the corpus, output = OUT, model, backend, engine sizing
    text_column: str = "text"
    id_column: str | None = None     # default: "id" when the corpus has it, else the row number
    instructions: str = sc.DEFAULT_INSTRUCTIONS
    max_summary_tokens: int = 256
    chunk_tokens: int | None = None  # default: the largest chunk that fits
    strategy: str = "hierarchical"
    corpus_summary: bool = False


def check(cfg: SummarizeConfig) -> None:
    if cfg.strategy not in ("hierarchical", "incremental"):
        raise UserError(f"--strategy must be hierarchical or incremental, got {cfg.strategy!r}")
    for name in ("max_summary_tokens", "chunk_tokens"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if not cfg.instructions.strip():
        raise UserError("--instructions is empty")


def context_len(run: RunConfig) -> int:
    if run.backend != "local":
        return run.max_model_len or V4_CONTEXT
    from batchv4.config import ModelConfig

    model_len = ModelConfig.load(run.model).max_position_embeddings
    if run.max_model_len is not None and run.max_model_len > model_len:
        raise UserError(f"--max-model-len {run.max_model_len} is longer than {run.model}'s context of {model_len} tokens")
    return run.max_model_len or model_len


def layout_of(cfg: SummarizeConfig):
    from batchv4.pipelines.frontend import model_tokenizer

    check(cfg)
    tok = model_tokenizer(cfg.run.tokenizer or cfg.run.model)
    layout = sc.Layout(tok, cfg.instructions, context_len(cfg.run), cfg.max_summary_tokens)
    layout.check(cfg.strategy)
    return layout


# ---- the tree ----------------------------------------------------------------------------------
def _node(doc: str, cid: str, level: int, rnd: str, span: tuple[int, int, int, int], user: str,
          children=()) -> dict:
    return {"document_id": doc, "chunk_id": cid, "level": level, "round": rnd, "parent_id": None,
            "char_start": span[0], "char_end": span[1], "token_start": span[2], "token_end": span[3],
            "children": list(children), "user": user}


def first_level(cfg: SummarizeConfig, layout, docs) -> tuple[list[dict], dict[str, list]]:
    """The level-1 nodes of every document, and for the incremental strategy each document's
    later chunks (run one round each)."""
    nodes, later = [], {}
    lens = layout.prompt_lens([text for _, text in docs])
    for (did, text), n in zip(docs, lens):
        if layout.fits(n) or not text:
            ntok = len(layout.tok.encode(text))
            nodes.append(_node(did, f"{did}#1.0", 1, "level-1", (0, len(text), 0, ntok), text))
            continue
        if cfg.strategy == "incremental":
            head, reserved = sc.running_text("", ""), cfg.max_summary_tokens + 2
        else:
            head, reserved = sc.CHUNK_HEADER, 0
        size = layout.budget(head, reserved)
        if cfg.chunk_tokens is not None:
            size = min(size, cfg.chunk_tokens)
        chunks = sc.cut_document(layout, text, head, size, reserved)
        inc = cfg.strategy == "incremental"
        made = [_node(did, f"{did}#1.{k}", 1, f"level-{k + 1}" if inc else "level-1",
                      (c.char_start, c.char_end, c.token_start, c.token_end), sc.CHUNK_HEADER + c.text)
                for k, c in enumerate(chunks)]
        if cfg.strategy == "incremental":
            nodes.append(made[0])
            later[did] = [(m, c.text) for m, c in zip(made[1:], chunks[1:])]
        else:
            nodes.extend(made)
    return nodes, later


def _merge_round(layout, frontier: list[dict], header: str, rnd: str, prefix: str) -> tuple[list[dict], list[dict]]:
    """One round of merges over an ordered frontier: (the next frontier, the new merge nodes)."""
    cap = sc.item_cap(layout, header)
    texts = [sc.truncate(layout.tok, f["summary"], cap) for f in frontier]
    nxt, made = [], []
    for k, g in enumerate(sc.merge_groups(layout, texts, header)):
        if len(g) == 1:
            nxt.append(frontier[g[0]])
            continue
        kids = [frontier[i] for i in g]
        level = max(c["level"] for c in kids) + 1
        span = (kids[0]["char_start"], kids[-1]["char_end"], kids[0]["token_start"], kids[-1]["token_end"])
        node = _node(kids[0]["document_id"], f"{prefix}#{rnd.rsplit('-', 1)[1]}.{k}", level, rnd, span,
                     sc.join_summaries(header, [texts[i] for i in g]), [c["chunk_id"] for c in kids])
        made.append(node)
        nxt.append(node)
    if not made:
        raise UserError(f"{prefix}: summaries cannot be merged within --max-model-len {layout.max_model_len}")
    return nxt, made


class _Shared:
    """One backend for every round (a checkpoint loads once; the instructions' cache may stay):
    attributes pass through, `close` waits for the job's end, and `stats()` counts from the
    start of the current round, so each round's summary.json reports its own engine work."""

    def __init__(self, backend) -> None:
        object.__setattr__(self, "_b", backend)
        object.__setattr__(self, "_base", {})

    def __getattr__(self, name):
        return getattr(self._b, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._b, name, value)

    def begin(self) -> None:
        object.__setattr__(self, "_base", dict(self._b.stats()))

    def stats(self) -> dict:
        now = dict(self._b.stats())
        for k, v in self._base.items():
            if not k.startswith("peak") and type(v) in (int, float) and type(now.get(k)) in (int, float):
                now[k] = now[k] - v
        return now

    def close(self) -> None:
        pass


class _Rounds:
    """Runs rounds through `run` (one backend, built when a round first has work) and keeps every
    node with its result."""

    def __init__(self, cfg: SummarizeConfig, out: str) -> None:
        self.cfg, self.out = cfg, out
        self.nodes: dict[str, dict] = {}
        self.rounds: list[dict] = []
        self.backend: _Shared | None = None

    def _factory(self, rc: RunConfig):
        import batchv4.pipelines.run as run_mod

        if self.backend is None:
            self.backend = _Shared(run_mod._default_llm(rc))
        self.backend.begin()
        return self.backend

    def close(self) -> None:
        close = getattr(self.backend._b, "close", None) if self.backend is not None else None
        if close is not None:
            close()

    def go(self, name: str, nodes: list[dict]) -> None:
        from batchv4.io.writers import iter_error_rows, iter_output_rows
        from batchv4.pipelines.run import run

        if not nodes:
            return
        path = os.path.join(self.out, "_inputs", f"{name}.jsonl")
        data = "".join(json.dumps({"id": n["chunk_id"], "messages": sc.messages(self.cfg.instructions, n["user"])},
                                  ensure_ascii=False) + "\n" for n in nodes)
        _write(path, data.encode())
        run_dir = os.path.join(self.out, "_levels", name)
        rc = replace(self.cfg.run, input=path, output=run_dir, fmt="jsonl", messages_column="messages",
                     prompt_column=None, template=None, system=None, id_column="id", keep_columns=(), n=1,
                     max_tokens=self.cfg.max_summary_tokens, limit=None, shard=None)
        s = run(rc, llm_factory=self._factory)
        want = {n["chunk_id"] for n in nodes}
        rows = {r["id"]: r for r in iter_output_rows(run_dir) if r["id"] in want}
        errors = {e["id"]: e["error"] for e in iter_error_rows(run_dir) if e["id"] in want}
        for n in nodes:
            r = rows.get(n["chunk_id"])
            if r is None:
                n.update({"summary": None, "error": errors.get(n["chunk_id"], "no output"), "cost_usd": None,
                          "finish_reason": None, **{k: 0 for k in USAGE}})
            else:
                n.update({"summary": (r["output"] or "").strip(), "error": None, "cost_usd": r["cost_usd"],
                          "finish_reason": r["finish_reason"], **{k: r[k] or 0 for k in USAGE}})
            self.nodes[n["chunk_id"]] = n
        t = s["this_run"]
        self.rounds.append({"round": name, "rows": len(nodes), "skipped_done": s["counts"]["skipped_done"],
                            "new_output_rows": s["counts"].get("new_output_rows", 0),
                            "prefill_tokens_computed": t["prefill_tokens_computed"],
                            "cached_prompt_tokens": t["cached_prompt_tokens"], "decode_tokens": t["decode_tokens"],
                            "wall_seconds": t["wall_seconds"], "cost_usd": s["totals"].get("cost_usd")})

    def failed(self, n: dict) -> bool:
        return n.get("error") is not None


def _link(kids: list[dict], parent: dict) -> None:
    for c in kids:
        c["parent_id"] = parent["chunk_id"]


def summarize(cfg: SummarizeConfig) -> dict:
    from batchv4.pipelines import summarize_tables as tables

    out = cfg.run.output.removeprefix("file://")
    if not out or "://" in out:
        raise UserError("summarize writes a local folder (-o PATH)")
    layout = layout_of(cfg)
    if cfg.run.overwrite:
        for sub in ("_levels", "_inputs"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    docs, bad = sc.read_corpus(cfg.run, cfg.text_column, cfg.id_column, exclude=out)
    if not docs and not bad:
        raise UserError(f"{cfg.run.input} holds no documents")
    first, later = first_level(cfg, layout, docs)
    R = _Rounds(cfg, out)
    try:
        return _levels(cfg, layout, out, docs, bad, first, later, R)
    finally:
        R.close()


def _levels(cfg, layout, out, docs, bad, first, later, R: _Rounds) -> dict:
    from batchv4.pipelines import summarize_tables as tables

    R.go("level-1", first)
    frontier = {d: [] for d, _ in docs}
    for n in first:
        frontier[n["document_id"]].append(n)
    failed = {n["document_id"] for n in first if R.failed(n)}
    level = 1
    while True:
        level += 1
        name = f"level-{level}"
        todo = []
        if cfg.strategy == "incremental":
            for did, rest in later.items():
                if did in failed or len(rest) < level - 1:
                    continue
                prev = frontier[did][-1]
                node, text = rest[level - 2]
                node["user"] = sc.running_text(sc.truncate(layout.tok, prev["summary"], cfg.max_summary_tokens), text)
                prev["parent_id"] = node["chunk_id"]
                frontier[did] = [node]
                todo.append(node)
        else:
            for did, f in frontier.items():
                if did in failed or len(f) < 2:
                    continue
                frontier[did], made = _merge_round(layout, f, sc.MERGE_HEADER, name, did)
                for m in made:
                    _link([R.nodes[c] for c in m["children"]], m)
                todo.extend(made)
        if not todo:
            break
        R.go(name, todo)
        failed |= {n["document_id"] for n in todo if R.failed(n)}
    doc_rows = tables.documents(docs, bad, frontier, failed, R.nodes, layout)
    corpus = None
    if cfg.corpus_summary:
        corpus = _corpus(cfg, layout, R, [frontier[d][0] for d, _ in docs if d not in failed and frontier[d]])
    result = tables.write_all(out, cfg, doc_rows, list(R.nodes.values()), corpus, R.rounds, layout)
    return result


def _corpus(cfg, layout, R: _Rounds, tops: list[dict]) -> dict:
    """The corpus tree: document summaries merged by the job's strategy (its nodes are kept apart
    from the documents' in corpus.json)."""
    start = set(R.nodes)
    if cfg.strategy == "incremental":
        top, k = _corpus_running(cfg, layout, R, tops)
    else:
        top, k = _corpus_levels(layout, R, tops, start)
    nodes = [R.nodes.pop(c) for c in list(R.nodes) if c not in start]
    return {"summary": top.get("summary") if top else None, "levels": k, "documents": len(tops),
            "nodes": nodes, "error": next((n["error"] for n in nodes if n.get("error")), None)}


def _corpus_running(cfg, layout, R: _Rounds, tops: list[dict]) -> tuple[dict | None, int]:
    """A running corpus summary: step 1 merges the first documents' summaries that fit, each later
    step rewrites the summary so far with the next ones; step k is round corpus-k, the parent of
    step k-1 and of the documents it read."""
    running, k, i = None, 0, 0
    while i < len(tops) and not (running is None and len(tops) == 1):
        k += 1
        if running is None:
            header = sc.CORPUS_HEADER
        else:
            header = sc.corpus_running_header(sc.truncate(layout.tok, running["summary"], cfg.max_summary_tokens))
        cap = sc.item_cap(layout, header)
        texts = [sc.truncate(layout.tok, t["summary"], cap) for t in tops[i:]]
        group = sc.merge_groups(layout, texts, header)[0]
        kids = ([running] if running is not None else []) + [tops[i + j] for j in group]
        node = _node(None, f"corpus#{k}.0", k, f"corpus-{k}", (None, None, None, None),
                     sc.join_summaries(header, [texts[j] for j in group]), [c["chunk_id"] for c in kids])
        if running is not None:
            running["parent_id"] = node["chunk_id"]
        R.go(f"corpus-{k}", [node])
        running, i = node, i + len(group)
        if R.failed(node):
            break
    return (running if running is not None else (tops[0] if tops else None)), k


def _corpus_levels(layout, R: _Rounds, tops: list[dict], start: set) -> tuple[dict | None, int]:
    frontier = [dict(t, level=0) for t in tops]
    k = 0
    while len(frontier) > 1:
        k += 1
        frontier, made = _merge_round(layout, frontier, sc.CORPUS_HEADER, f"corpus-{k}", "corpus")
        for m in made:
            m["document_id"] = None
            m["char_start"] = m["char_end"] = m["token_start"] = m["token_end"] = None
            for c in m["children"]:
                if c in R.nodes and c not in start:
                    R.nodes[c]["parent_id"] = m["chunk_id"]
        R.go(f"corpus-{k}", made)
        if any(R.failed(m) for m in made):
            break
    return (frontier[0] if frontier else None), k


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
