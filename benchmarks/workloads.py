"""Reusable workload generators for the engine benchmarks (token-id prompts, seeded).

(a) long-document questions: documents of 1-3k tokens, 8 questions each;
(b) dataset generation: one ~1k-token system prompt with few-shot examples, many short requests;
(c) unique prompts of mixed lengths.
"""

from __future__ import annotations

import random


def _toks(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def doc_questions(n_docs: int = 3, questions: int = 8, doc_len=(1000, 3000), q_len=(8, 40),
                  vocab: int = 129280, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_docs):
        doc = _toks(rng, rng.randint(*doc_len), vocab)
        out += [doc + _toks(rng, rng.randint(*q_len), vocab) for _ in range(questions)]
    return out


def dataset_generation(n: int = 48, system_len: int = 1000, req_len=(5, 30), vocab: int = 129280,
                       seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    system = _toks(rng, system_len, vocab)
    return [system + _toks(rng, rng.randint(*req_len), vocab) for _ in range(n)]


def unique_prompts(n: int = 32, lengths=(16, 1500), vocab: int = 129280, seed: int = 2) -> list[list[int]]:
    rng = random.Random(seed)
    return [_toks(rng, int(rng.triangular(lengths[0], lengths[1], lengths[0] * 4)), vocab) for _ in range(n)]


def shuffled(prompts: list[list[int]], seed: int = 3) -> list[list[int]]:
    """The input's own order in a real file is not grouped; benchmarks shuffle to show it."""
    p = list(prompts)
    random.Random(seed).shuffle(p)
    return p


def tree_tokens(prompts: list[list[int]]) -> int:
    """Distinct non-empty prefixes: the least possible prefill work."""
    seen = set()
    for p in prompts:
        h = 0
        for t in p:
            h = hash((h, t))
            seen.add(h)
    return len(seen)
