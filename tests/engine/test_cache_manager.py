"""Exact bookkeeping of the cache manager: page ids, reference counts, snapshot lifetimes, eviction
order, and that everything returns to the pools."""

import pytest

from batchv4.engine.cache_manager import CacheManager, IdPool, NoSpace


def make(pages=8, slots=4):
    # ratios 4 and 16, 2 entries per page: a page covers 8 tokens at ratio 4, 32 at ratio 16
    return CacheManager((4, 16), 2, {4: pages, 16: pages}, slots)


def test_idpool_lowest_first_and_refcounts():
    p = IdPool(3)
    assert [p.alloc(), p.alloc()] == [0, 1]
    p.incref(0)
    p.decref(0)
    assert list(p.refs) == [1, 1, 0]
    p.decref(0)
    assert p.alloc() == 0 and p.alloc() == 2
    with pytest.raises(NoSpace):
        p.alloc()
    with pytest.raises(ValueError):
        IdPool(1).decref(0)


def test_idpool_of_millions_lists_only_returned_ids():
    """A pool of 20M small pages holds 4 bytes per id, not a Python list of every free id; the
    lowest free id still comes first, whether it was returned or never handed out."""
    import tracemalloc

    tracemalloc.start()
    p = IdPool(20_000_000)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert size < 100 * 2**20
    assert [p.alloc() for _ in range(4)] == [0, 1, 2, 3] and p.num_used == 4
    p.decref(2)
    p.decref(0)
    assert p.num_free == 20_000_000 - 2
    assert [p.alloc(), p.alloc(), p.alloc()] == [0, 2, 4]
    assert p.num_used == 5 and list(p.refs[:6]) == [1, 1, 1, 1, 1, 0]


def test_pages_follow_entries():
    cm = make()
    slot = cm.new_seq("a")
    assert slot == 0
    cm.ensure("a", 7)            # 1 entry at ratio 4 -> 1 page; 0 entries at 16
    assert cm.seqs["a"].pages == {4: [0], 16: []}
    cm.ensure("a", 17)           # 4 entries -> 2 pages; 1 entry at 16 -> 1 page
    assert cm.seqs["a"].pages == {4: [0, 1], 16: [0]}
    cm.free_seq("a")
    assert cm.pages[4].num_used == 0 and cm.pages[16].num_used == 0 and cm.slots.num_used == 0


def test_snapshot_shares_full_pages_and_copies_the_partial_one():
    cm = make()
    cm.new_seq("a")
    cm.ensure("a", 20)                       # ratio 4: 5 entries -> pages [0,1,2]; ratio 16: 1 -> [0]
    src, snap_slot = cm.save("a", key=7, pos=20, uses=2)
    assert (src, snap_slot) == (0, 1)
    assert list(cm.pages[4].refs[:3]) == [2, 2, 2] and cm.pages[16].refs[0] == 2
    cm.snapshots[7].ready = True
    s, d, copies = cm.restore(7, "b")
    assert (s, d) == (1, 2)
    # 5 entries at ratio 4 -> page 2 is partial (1 of 2 entries): copied into new page 3
    # 1 entry at ratio 16 -> page 0 partial: copied into new page 1
    assert copies == [(4, 2, 3), (16, 0, 1)]
    assert cm.seqs["b"].pages == {4: [0, 1, 3], 16: [1]}
    assert list(cm.pages[4].refs[:4]) == [3, 3, 2, 1]
    assert cm.snapshots[7].uses_left == 1
    cm.free_seq("a")
    cm.free_seq("b")
    assert list(cm.pages[4].refs[:4]) == [1, 1, 1, 0]
    assert cm.release_unneeded() == 0            # one use left: kept
    cm.restore(7, "c")
    cm.free_seq("c")
    assert cm.release_unneeded() == 1
    assert cm.pages[4].num_used == 0 and cm.pages[16].num_used == 0 and cm.slots.num_used == 0


def test_eviction_order_unneeded_first_then_lru():
    cm = make(pages=16, slots=4)
    cm.new_seq("a")
    cm.ensure("a", 8)
    for key, uses in [("x", 1), ("y", 0), ("z", 1)]:
        cm.save("a", key, 8, uses)
    assert cm.slots.num_free == 0
    cm.snapshots["x"].last_used = 1
    cm.snapshots["z"].last_used = 5
    cm.free_seq("a")
    cm.new_seq("b")                      # takes a's slot
    cm.new_seq("c")                      # must evict: 'y' (plan no longer needs it) goes first
    assert set(cm.snapshots) == {"x", "z"} and cm.evictions == 1
    cm.new_seq("d")                      # then the least recently used: 'x'
    assert set(cm.snapshots) == {"z"} and cm.evictions == 2
    cm.snapshots["z"].pinned = 1
    with pytest.raises(NoSpace):         # nothing evictable left
        cm.new_seq("e")


def test_fits_alone():
    cm = make(pages=2)
    assert cm.fits_alone(16) and not cm.fits_alone(17 + 16)


def test_failed_restore_holds_nothing():
    cm = CacheManager((4,), 2, {4: 3}, 4)
    cm.new_seq("a")
    cm.ensure("a", 20)                       # 5 entries -> pages 0,1,2 (the last partial)
    cm.save("a", "k", 20, 1)
    cm.snapshots["k"].ready = True
    with pytest.raises(NoSpace):             # the partial page's copy needs a 4th page
        cm.restore("k", "b")
    assert "b" not in cm.seqs and cm.slots.num_used == 2 and list(cm.pages[4].refs) == [2, 2, 2]
