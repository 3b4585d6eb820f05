"""The baseline packing is measured against: vLLM-style automatic prefix caching in input order.

Owns `naive_lru_prefill`. Does not own planning; nothing in the plan depends on it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence

from batchv4.packing.keys import as_token_array, check_token_range
from batchv4.packing.types import PackInput


def naive_lru_prefill(
    items_in_input_order: Iterable[PackInput | Sequence[int]],
    block_size: int = 16,
    capacity_blocks: int = 1 << 20,
) -> int:
    """Prompt tokens prefilled by a block-hash LRU prefix cache that runs the prompts in input order.

    Modelled on vLLM's automatic prefix caching, one request at a time: a full block of
    `block_size` tokens is keyed by its tokens and its whole prefix; a request reuses the longest
    run of cached blocks from its start; the last partial block is never cached; and a prompt
    that is entirely cached still recomputes its last token, which at block granularity means
    the hit is capped at whole blocks within len - 1 tokens (vLLM's max_cache_hit_length). After
    a request, its full blocks are most recently used, the first block most of all (vLLM frees a
    request's blocks in reverse, so deeper blocks are evicted first); then the least recently
    used blocks beyond `capacity_blocks` are evicted. Items are PackInputs or token id sequences.
    """
    for name, value in (("block_size", block_size), ("capacity_blocks", capacity_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cache: OrderedDict[bytes, None] = OrderedDict()
    width = 4 * block_size
    total = 0
    for ordinal, item in enumerate(items_in_input_order):
        token_ids = item.token_ids if isinstance(item, PackInput) else item
        try:
            tokens = as_token_array(token_ids)
            check_token_range(tokens)
        except ValueError as exc:
            raise ValueError(f"row {ordinal}: {exc}") from None
        length = len(tokens)
        full = length // block_size
        data = tokens[:full * block_size].astype("<u4").tobytes()
        hashes = []
        parent = b""
        for block in range(full):
            parent = hashlib.blake2b(parent + data[block * width:(block + 1) * width], digest_size=16).digest()
            hashes.append(parent)
        limit = (length - 1) // block_size if length else 0
        hit = 0
        while hit < limit and hashes[hit] in cache:
            hit += 1
        total += length - hit * block_size
        for digest in reversed(hashes):
            cache[digest] = None
            cache.move_to_end(digest)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return total
