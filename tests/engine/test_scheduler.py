"""The scheduler's step plans, pinned exactly on small cases (pure Python, no model)."""

from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, SavePlan, Scheduler, Sequence

SP = SamplingParams(max_tokens=4, temperature=0)


def make(budget=16, pages=32, slots=8, max_seqs=8):
    cm = CacheManager((4,), 4, {4: pages}, slots)
    return cm, Scheduler(cm, budget, max_seqs, max_model_len=10_000)


def seq(i, n, **kw):
    req = EngineRequest(str(i), list(range(3, 3 + n)), SP, **kw)
    return Sequence(i, req, 0, list(req.prompt_token_ids), n)


def finish_step(cm, plan):
    for ch in plan.chunks:
        if ch.save is not None and ch.save.key in cm.snapshots:
            cm.snapshots[ch.save.key].ready = True


def test_budget_is_shared_and_chunks_stop_at_save_points():
    cm, sch = make(budget=16)
    a = seq(1, 30, saves=(SavePlan("k", 10, 1),))
    b = seq(2, 8, resume_key="k", resume_pos=10)   # waits for a's snapshot
    sch.add(a)
    sch.add(b)
    p = sch.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.needs_logits) for c in p.chunks] == [(1, 0, 10, True)]
    assert p.saves == [(0, 1)]                      # a's slot 0 copied into snapshot slot 1
    assert list(sch.waiting) == [b]                 # b keeps plan order until the snapshot exists
    finish_step(cm, p)
    p = sch.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in p.chunks] == [(1, 10, 16)]
    assert p.restores == [] and list(sch.waiting) == [b]   # no budget left for b this step


def test_restore_then_prefill_the_rest():
    cm, sch = make(budget=64)
    a = seq(1, 30, saves=(SavePlan("k", 10, 1),))
    sch.add(a)
    p = sch.schedule()
    finish_step(cm, p)
    b = Sequence(2, EngineRequest("2", a.tokens[:10] + [99, 98, 97], SP, resume_key="k", resume_pos=10), 0,
                 a.tokens[:10] + [99, 98, 97], 13)
    sch.add(b)
    p = sch.schedule()
    got = [(c.seq.seq_id, c.start, c.num_tokens) for c in p.chunks]
    assert got == [(1, 10, 20), (2, 10, 3)]
    assert p.restores == [(1, 2)]                   # snapshot slot 1 -> b's new slot 2
    # 10 tokens = 2 full entries of 4 tokens... page 0 holds entries 0..1 of 4: partial -> copied
    assert p.page_copies == [(4, 0, cm.seqs[2].pages[4][0])]
    assert b.num_cached == 10 and sch.cached_tokens == 10
    assert cm.snapshots["k"].uses_left == 0


def test_admission_waits_for_pages_promised_to_running_sequences():
    cm, sch = make(budget=64, pages=3)
    a, b = seq(1, 20), seq(2, 20)            # 20 + 4 tokens: 6 entries -> 2 pages each
    sch.add(a)
    sch.add(b)
    p = sch.schedule()
    assert [c.seq.seq_id for c in p.chunks] == [1] and list(sch.waiting) == [b]
    assert sch.preemptions == 0 and cm.seqs[1].pages[4] == [0, 1]


def test_preemption_by_recompute_when_pages_run_out():
    cm, sch = make(budget=64, pages=4)
    a, b = seq(1, 12), seq(2, 12)            # 12 + 4 tokens: 4 entries -> 1 page each
    sch.add(a)
    sch.add(b)
    sch.schedule()
    assert cm.seqs[1].pages[4] == [0] and cm.seqs[2].pages[4] == [1]
    cm.new_seq("other")                     # someone else takes the remaining pages
    cm.ensure("other", 32)
    a.tokens += [7] * 8                     # a grows to 20 tokens: 5 entries need a second page
    p = sch.schedule()
    # no free page: the most recently admitted other sequence (b) is preempted, a continues
    assert sch.preemptions == 1 and list(sch.waiting) == [b] and b.num_computed == 0
    assert [c.seq.seq_id for c in p.chunks] == [1]
    assert cm.seqs[1].pages[4] == [0, 1] and 2 not in cm.seqs


def test_errors_for_requests_that_cannot_run():
    cm, sch = make(pages=2)
    sch.add(seq(1, 0))
    big = seq(2, 40)                          # 40 + 4 tokens need 3 pages of 16 tokens: never fits
    sch.add(big)
    sch.add(seq(3, 5))
    p = sch.schedule()
    assert [(s.seq_id, m.split(" ")[0]) for s, m in p.errors] == [(1, "empty"), (2, "prompt")]
    assert "budget" in p.errors[1][1]
    assert [c.seq.seq_id for c in p.chunks] == [3]
