"""Duplicate removal for generated datasets: exact (a hash of the normalized text) and near
(MinHash over word 3-grams with LSH, `datasketch`), within a batch of rows and against references
from earlier nights.

Normalization: Unicode NFKC, lower case, whitespace collapsed. Rows are decided in the order given
(the caller sorts them, so the result is deterministic): a row whose normalized text was seen is an
exact duplicate of the first one; else a row whose estimated Jaccard similarity to a kept or
reference row is at least `threshold` is a near duplicate of the most similar one; else it is
kept. Signatures are plain arrays of uint64 (`MinHash.hashvalues`), stored as Parquet by the
caller and rebuilt from there: never pickled.

Owns: normalization, shingles, signatures, the decisions. Does not own: which text is compared, or
files (`pipelines.generate`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NUM_PERM = 128
SEED = 1
SCHEME = "affine32"     # datasketch's hashing scheme: stored signatures say which they came from
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:32]


def shingles(text: str, k: int = 3) -> list[bytes]:
    words = normalize(text).split(" ")
    if len(words) < k:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + k]).encode("utf-8") for i in range(len(words) - k + 1)]


def signature(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME)
    m.update_batch(shingles(text))
    return m.hashvalues.astype(np.uint64)


@dataclass(frozen=True)
class Decision:
    key: object
    kind: str | None            # None (kept), "exact" or "near"
    duplicate_of: object = None
    similarity: float | None = None


class Deduper:
    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM) -> None:
        try:
            from datasketch import MinHashLSH
        except ImportError:
            from batchv4.errors import UserError

            raise UserError("near-duplicate removal needs datasketch: pip install 'batchv4[generate]' "
                            "(or --no-dedup)") from None

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm = threshold, num_perm
        # the index finds candidates below the threshold too (LSH misses pairs near it otherwise);
        # each candidate is then checked against the threshold by its estimated similarity
        self.lsh = MinHashLSH(threshold=max(0.1, 0.6 * threshold), num_perm=num_perm)
        self.exact: dict[str, object] = {}
        self.sigs: dict[object, np.ndarray] = {}

    def add_reference(self, key: object, exact_hash: str, hashvalues: Sequence[int]) -> None:
        """A row kept on an earlier night (its stored hash and signature)."""
        self.exact.setdefault(exact_hash, key)
        self._insert(key, np.asarray(hashvalues, dtype=np.uint64))

    def _insert(self, key: object, sig: np.ndarray) -> None:
        from datasketch import MinHash

        if key in self.sigs:
            return
        self.sigs[key] = sig
        self.lsh.insert(key, MinHash(num_perm=self.num_perm, seed=SEED, hashvalues=sig, scheme=SCHEME))

    def decide(self, key: object, text: str) -> tuple[Decision, str, np.ndarray]:
        """The decision for one row, and its hash and signature (kept rows join the index)."""
        from datasketch import MinHash

        h = text_hash(text)
        sig = signature(text, self.num_perm)
        if h in self.exact:
            return Decision(key, "exact", self.exact[h], 1.0), h, sig
        best, best_sim = None, -1.0
        for cand in self.lsh.query(MinHash(num_perm=self.num_perm, seed=SEED, hashvalues=sig, scheme=SCHEME)):
            sim = float(np.mean(self.sigs[cand] == sig))
            if sim > best_sim or (sim == best_sim and str(cand) < str(best)):
                best, best_sim = cand, sim
        if best is not None and best_sim >= self.threshold:
            return Decision(key, "near", best, best_sim), h, sig
        self.exact[h] = key
        self._insert(key, sig)
        return Decision(key, None), h, sig


def dedup(items: Iterable[tuple[object, str]], threshold: float = 0.8, deduper: Deduper | None = None
          ) -> list[tuple[Decision, str, np.ndarray]]:
    d = deduper or Deduper(threshold)
    return [d.decide(k, t) for k, t in items]
