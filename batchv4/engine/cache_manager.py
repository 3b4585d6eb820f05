"""KV-cache bookkeeping: page pools (one per compression ratio) with reference counts, the slot pool
(windows and pending state of running sequences and of snapshots), per-sequence page tables, and
the prefix cache of snapshots saved at the plan's branch points.

Owns: which page and slot ids a sequence or snapshot holds, reference counts, eviction order (what
the plan no longer needs first, then least recently used; never anything in use). Does not own:
tensors (the model's `CachePools` holds them; this module only names the copies to make) or
scheduling. Plain Python, tested with exact ids.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field


class NoSpace(Exception):
    """No free page or slot (the scheduler preempts or waits)."""


class IdPool:
    """Ids 0..n-1 with reference counts; the lowest free id is handed out first.

    Memory is 4 bytes per id plus the ids returned so far: ids never handed out are not listed
    (every id >= `_fresh` is free), so a pool of tens of millions of small pages costs no Python
    objects per page."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._fresh = 0                     # ids >= _fresh were never handed out
        self._returned: list[int] = []      # heap of freed ids, all < _fresh
        self.refs = array("I")
        self.refs.frombytes(bytes(4 * n))

    def alloc(self) -> int:
        if self._returned:
            i = heapq.heappop(self._returned)
        elif self._fresh < self.n:
            i = self._fresh
            self._fresh += 1
        else:
            raise NoSpace
        self.refs[i] = 1
        return i

    def incref(self, i: int) -> None:
        if self.refs[i] <= 0:
            raise ValueError(f"id {i} is not allocated")
        self.refs[i] += 1

    def decref(self, i: int) -> None:
        if self.refs[i] <= 0:
            raise ValueError(f"id {i} is not allocated")
        self.refs[i] -= 1
        if self.refs[i] == 0:
            heapq.heappush(self._returned, i)

    @property
    def num_free(self) -> int:
        return self.n - self._fresh + len(self._returned)

    @property
    def num_used(self) -> int:
        return self._fresh - len(self._returned)


@dataclass
class Snapshot:
    key: object
    slot: int
    pos: int                              # tokens covered
    pages: dict[int, list[int]]           # ratio -> page ids (one reference each)
    uses_left: int                        # restores the plan still expects
    last_used: int
    has_logits: bool = False              # the runner keeps the logits at pos-1 (prompts ending there)
    pinned: int = 0                       # restores in flight this step
    ready: bool = False                   # filled by an executed step


@dataclass
class SeqCache:
    slot: int
    pages: dict[int, list[int]] = field(default_factory=dict)


class CacheManager:
    def __init__(self, ratios: tuple[int, ...], page_size: int, num_pages: dict[int, int], num_slots: int) -> None:
        self.ratios = tuple(ratios)
        self.page_size = page_size
        self.pages = {r: IdPool(num_pages[r]) for r in self.ratios}
        self.slots = IdPool(num_slots)
        self.seqs: dict[object, SeqCache] = {}
        self.snapshots: dict[object, Snapshot] = {}
        self.tick = 0
        self.evictions = 0
        self._dropped: list[object] = []   # snapshot keys dropped since `drain_dropped`

    # ---- sizes ------------------------------------------------------------------------------------
    def pages_needed(self, ratio: int, num_tokens: int) -> int:
        return -(-(num_tokens // ratio) // self.page_size)

    def can_admit(self, num_tokens: int, shared_tokens: int = 0, promised: dict[int, int] | None = None) -> bool:
        """Free pages (counting those only unneeded snapshots hold, less the pages `promised` to
        running sequences' future growth) for a sequence of num_tokens whose first shared_tokens
        come from a snapshot (full pages shared, the partial one copied)."""
        unneeded = [s for s in self.snapshots.values() if s.uses_left == 0 and not s.pinned]
        for r in self.ratios:
            shared_full = (shared_tokens // r) // self.page_size
            need = self.pages_needed(r, num_tokens) - shared_full
            spare = self.pages[r].num_free + sum(
                1 for s in unneeded for p in s.pages[r] if self.pages[r].refs[p] == 1)
            if need > spare - (promised or {}).get(r, 0):
                return False
        return self.slots.num_free > 0 or bool(unneeded)

    def fits_alone(self, num_tokens: int) -> bool:
        return all(self.pages_needed(r, num_tokens) <= self.pages[r].n for r in self.ratios) \
            and self.slots.n >= 1

    # ---- sequences --------------------------------------------------------------------------------
    def new_seq(self, seq_id: object, evict_needed: bool = True) -> int:
        slot = self._alloc_slot(evict_needed)
        self.seqs[seq_id] = SeqCache(slot, {r: [] for r in self.ratios})
        return slot

    def ensure(self, seq_id: object, num_tokens: int, evict_needed: bool = True) -> None:
        """Pages for every compressed entry of the first num_tokens tokens (raises NoSpace; pages
        allocated before the failure stay with the sequence). Snapshots the plan still needs are
        evicted only with evict_needed."""
        sc = self.seqs[seq_id]
        for r in self.ratios:
            while len(sc.pages[r]) < self.pages_needed(r, num_tokens):
                sc.pages[r].append(self._alloc_page(r, evict_needed))

    def free_seq(self, seq_id: object) -> None:
        sc = self.seqs.pop(seq_id)
        self.slots.decref(sc.slot)
        for r, ids in sc.pages.items():
            for p in ids:
                self.pages[r].decref(p)

    def view(self, seq_id: object) -> tuple[int, dict[int, list[int]]]:
        """(slot, ratio -> page ids) of a sequence, for the runner's page tables (read-only)."""
        sc = self.seqs[seq_id]
        return sc.slot, sc.pages

    def free_seq_if_held(self, seq_id: object) -> None:
        if seq_id in self.seqs:
            self.free_seq(seq_id)

    def fork(self, src: object, dst: object, num_tokens: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """dst becomes a copy of src's first num_tokens tokens: (src slot, dst slot, page copies)."""
        sc = self.seqs[src]
        slot = self.new_seq(dst, evict_needed=False)
        try:
            copies = self._share_pages(sc.pages, num_tokens, self.seqs[dst].pages, False)
        except NoSpace:
            self.free_seq(dst)  # roll back: nothing half-held
            raise
        return sc.slot, slot, copies

    # ---- snapshots --------------------------------------------------------------------------------
    def save(self, seq_id: object, key: object, pos: int, uses: int) -> tuple[int, int]:
        """Snapshot seq_id at pos (its cache must hold exactly pos tokens after this step):
        returns (running slot, snapshot slot) for the copy."""
        if key in self.snapshots:
            self._drop(key)
        sc = self.seqs[seq_id]
        slot = self._alloc_slot(evict_needed=False)
        pages = {}
        for r in self.ratios:
            ids = sc.pages[r][: self.pages_needed(r, pos)]
            for p in ids:
                self.pages[r].incref(p)
            pages[r] = list(ids)
        self.tick += 1
        self.snapshots[key] = Snapshot(key, slot, pos, pages, uses, self.tick)
        return sc.slot, slot

    def restore(self, key: object, seq_id: object, evict_needed: bool = True
                ) -> tuple[int, int, list[tuple[int, int, int]]]:
        """A new sequence resumes from snapshot `key`: (snapshot slot, new slot, page copies)."""
        snap = self.snapshots[key]
        snap.pinned += 1
        try:
            slot = self.new_seq(seq_id, evict_needed)
            try:
                copies = self._share_pages(snap.pages, snap.pos, self.seqs[seq_id].pages, evict_needed)
            except NoSpace:
                self.free_seq(seq_id)  # roll back: nothing half-held
                raise
        finally:
            snap.pinned -= 1
        snap.uses_left = max(0, snap.uses_left - 1)
        self.tick += 1
        snap.last_used = self.tick
        return snap.slot, slot, copies

    def has(self, key: object) -> bool:
        """A snapshot that exists and was filled by an executed step."""
        s = self.snapshots.get(key)
        return s is not None and s.ready

    def exists(self, key: object) -> bool:
        """A snapshot registered for saving (ready or not yet filled)."""
        return key in self.snapshots

    def mark_ready(self, key: object, has_logits: bool) -> None:
        """An executed step filled snapshot `key` (and kept its last logits, or not)."""
        s = self.snapshots.get(key)
        if s is not None:
            s.ready, s.has_logits = True, has_logits

    def snapshot_pos(self, key: object) -> int | None:
        """Tokens covered by a ready snapshot; None if there is none."""
        return self.snapshots[key].pos if self.has(key) else None

    def snapshot_has_logits(self, key: object) -> bool:
        return self.has(key) and self.snapshots[key].has_logits

    def give_back_use(self, key: object) -> None:
        """A restore from `key` was undone (its sequence was preempted): it will be restored again."""
        if key in self.snapshots:
            self.snapshots[key].uses_left += 1

    def drop_use(self, key: object) -> None:
        """A restore the plan counted will never happen (its request was aborted)."""
        s = self.snapshots.get(key)
        if s is not None:
            s.uses_left = max(0, s.uses_left - 1)

    def pages_held(self, seq_id: object, ratio: int) -> int:
        sc = self.seqs.get(seq_id)
        return len(sc.pages[ratio]) if sc is not None else 0

    def drain_dropped(self) -> list[object]:
        """Keys of the snapshots dropped (evicted, released, replaced) since the last call, so the
        runner can free what it keeps for them."""
        out, self._dropped = self._dropped, []
        return out

    def clear(self) -> None:
        """Free every sequence and snapshot (a stream that stopped early)."""
        for seq_id in list(self.seqs):
            self.free_seq(seq_id)
        for key in list(self.snapshots):
            self._drop(key)

    def release_unneeded(self) -> int:
        """Drop every snapshot the plan no longer needs; returns how many."""
        keys = [k for k, s in self.snapshots.items() if s.uses_left == 0 and not s.pinned]
        for k in keys:
            self._drop(k)
        return len(keys)

    def drop_all_snapshots(self) -> None:
        for k in [k for k, s in self.snapshots.items() if not s.pinned]:
            self._drop(k)

    # ---- internals --------------------------------------------------------------------------------
    def _share_pages(self, src_pages: dict[int, list[int]], num_tokens: int,
                     dst_pages: dict[int, list[int]], evict_needed: bool = True) -> list[tuple[int, int, int]]:
        copies = []
        for r in self.ratios:
            n = self.pages_needed(r, num_tokens)
            ids = src_pages[r][:n]
            partial = (num_tokens // r) % self.page_size != 0
            for p in ids[:-1] if partial else ids:
                self.pages[r].incref(p)
                dst_pages[r].append(p)
            if partial and ids:
                new = self._alloc_page(r, evict_needed)
                dst_pages[r].append(new)
                copies.append((r, ids[-1], new))
        return copies

    def _alloc_slot(self, evict_needed: bool = True) -> int:
        while True:
            try:
                return self.slots.alloc()
            except NoSpace:
                if not self._evict_one(evict_needed):
                    raise

    def _alloc_page(self, r: int, evict_needed: bool = True) -> int:
        while True:
            try:
                return self.pages[r].alloc()
            except NoSpace:
                if not self._evict_one(evict_needed):
                    raise

    def _evict_one(self, evict_needed: bool = True) -> bool:
        cands = [s for s in self.snapshots.values() if not s.pinned and (evict_needed or s.uses_left == 0)]
        if not cands:
            return False
        victim = min(cands, key=lambda s: (s.uses_left > 0, s.last_used))
        self._drop(victim.key)
        self.evictions += 1
        return True

    def _drop(self, key: object) -> None:
        snap = self.snapshots.pop(key)
        self._dropped.append(key)
        self.slots.decref(snap.slot)
        for r, ids in snap.pages.items():
            for p in ids:
                self.pages[r].decref(p)
