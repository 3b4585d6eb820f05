"""Token-id validation and the grouping key: a stable hash of a prompt's first tokens.

Owns the canonical token encoding (little-endian uint32), `grouping_key`, and the two independent
reductions of it: `shard_of` (which rank plans a row) and `bucket_of` (which spill bucket holds it).
Does not own the prefix tree or any I/O.
"""

from __future__ import annotations

import array
import hashlib
from typing import Sequence

import numpy as np

from batchv4.packing.types import DEFAULT_KEY_TOKENS, MAX_TOKEN_ID

_DIGEST_BYTES = 8
_PERSON = b"bv4pack1"  # domain separation: these hashes never collide by design with other uses
_FAST_U32 = array.array("I").itemsize == 4


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def as_token_array(token_ids: Sequence[int], where: str | None = None) -> np.ndarray:
    """The token ids as a 1-D integer array (no copy when already one); dtype checked, not range.

    Lists, tuples and ranges come back as uint32, range-checked on the way (the common input, and
    3x faster than np.asarray). Other inputs' range is checked in bulk by `check_token_range`.
    """
    if _FAST_U32 and type(token_ids) in (list, tuple, range):
        try:
            # copied: a view would keep the array.array and two buffer objects alive per row, all
            # tracked by the cyclic GC, whose full passes over a window's rows then cost more
            # than the copy (the planner holds a window's rows until it is planned)
            return np.frombuffer(array.array("I", token_ids), dtype=np.uint32).copy()
        except (OverflowError, TypeError):
            pass  # the numpy path below gives the precise error
    try:
        arr = np.asarray(token_ids)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"{_prefix(where)}token ids must be integers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{_prefix(where)}token ids must be a flat sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return np.zeros(0, dtype=np.uint32)
        raise ValueError(f"{_prefix(where)}token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
        # uint64 would promote to float64 next to int64 rows; every valid id fits int64.
        check_token_range(arr, where)
        arr = arr.astype(np.int64)
    return arr


def check_token_range(flat: np.ndarray, where: str | None = None) -> None:
    """Raise ValueError unless every id in `flat` fits in [0, 2**32)."""
    if flat.size == 0:
        return
    if flat.dtype.kind == "i" and int(flat.min()) < 0:
        raise ValueError(f"{_prefix(where)}token ids must be non-negative, found {int(flat.min())}")
    if int(flat.max()) > MAX_TOKEN_ID:
        raise ValueError(f"{_prefix(where)}token ids must be below 2**32, found {int(flat.max())}")


def key_of_array(arr: np.ndarray, key_tokens: int) -> int:
    """grouping_key for an array already accepted by as_token_array (no checks)."""
    head = arr[:key_tokens]
    data = head.tobytes() if head.dtype == np.dtype("<u4") else head.astype("<u4").tobytes()
    digest = hashlib.blake2b(data, digest_size=_DIGEST_BYTES, person=_PERSON).digest()
    return int.from_bytes(digest, "little")


def _checked_array(token_ids: Sequence[int], key_tokens: int) -> np.ndarray:
    if isinstance(key_tokens, bool) or not isinstance(key_tokens, int) or key_tokens < 1:
        raise ValueError(f"key_tokens must be a positive integer, got {key_tokens!r}")
    arr = as_token_array(token_ids)
    check_token_range(arr[:key_tokens])
    return arr


def grouping_key(token_ids: Sequence[int], key_tokens: int = DEFAULT_KEY_TOKENS) -> int:
    """Stable 64-bit blake2b hash of the first `key_tokens` tokens (all of a shorter prompt).

    The same on every machine and Python run (unlike `hash()`); prompts that share their first
    key_tokens tokens always get the same key.
    """
    return key_of_array(_checked_array(token_ids, key_tokens), key_tokens)


def bucket_of_key(key: int, n_buckets: int) -> int:
    """Spill bucket of a grouping key: the high 32 bits, scaled (independent of shard_of)."""
    return ((key >> 32) * n_buckets) >> 32


def shard_of_key(key: int, n_shards: int) -> int:
    """Shard of a grouping key: the low 32 bits, scaled."""
    return ((key & 0xFFFFFFFF) * n_shards) >> 32


def shard_of(token_ids: Sequence[int], n_shards: int, key_tokens: int = DEFAULT_KEY_TOKENS) -> int:
    """Deterministic shard in [0, n_shards) by grouping key, so shared prefixes stay in one shard.

    Uses other bits of the key than the spill buckets do, so a shard still spreads over buckets.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 1 <= n_shards <= 2**32:
        raise ValueError(f"n_shards must be an integer in [1, 2**32], got {n_shards!r}")
    return shard_of_key(grouping_key(token_ids, key_tokens), n_shards)
