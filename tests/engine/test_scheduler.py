"""The scheduler's step plans and updates, pinned exactly on small cases (pure Python, no model):
`schedule()` is driven with hand-made `StepResult`s through `update()`, as the runner would answer."""

from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, SavePlan, Scheduler, Sequence
from batchv4.engine.step import Sampled, StepResult

SP = SamplingParams(max_tokens=4, temperature=0)


def make(budget=16, pages=32, slots=8, max_seqs=8):
    cm = CacheManager((4,), 4, {4: pages}, slots)
    return cm, Scheduler(cm, budget, max_seqs, max_model_len=10_000)


def seq(i, n, **kw):
    req = EngineRequest(str(i), list(range(3, 3 + n)), SP, **kw)
    return Sequence(i, req, 0, list(req.prompt_token_ids), n)


def chunks(plan):
    return [(c.seq.seq_id, c.start, c.num_tokens, c.needs_logits) for c in plan.chunks]


def tokens(**by_seq):
    """A StepResult sampling token `t` for each seq id given as s<id>=t (sample 0)."""
    return StepResult(sampled={int(k[1:]): [Sampled(t, 0)] for k, t in by_seq.items()})


def test_budget_is_shared_and_chunks_stop_at_save_points():
    cm, sch = make(budget=16)
    a = seq(1, 30, saves=(SavePlan("k", 10, 1),))
    b = seq(2, 8, resume_key="k", resume_pos=10)   # waits for a's snapshot
    sch.add(a)
    sch.add(b)
    p = sch.schedule()
    assert chunks(p) == [(1, 0, 10, True)] and not p.chunks[0].sample and p.chunks[0].save_key == "k"
    assert p.copies_after == [("slot", 0, 1)]      # a's slot 0 copied into snapshot slot 1 after the forward
    assert p.keep_logits == ["k"] and list(sch.waiting) == [b]   # b keeps plan order until the snapshot exists
    assert not cm.has("k")
    assert sch.update(p, StepResult(saved={"k": True})) == []
    assert cm.has("k") and cm.snapshot_has_logits("k")
    p = sch.schedule()
    assert chunks(p) == [(1, 10, 16, False)]
    assert p.copies_before == [] and list(sch.waiting) == [b]   # no budget left for b this step


def test_restore_then_prefill_the_rest():
    cm, sch = make(budget=64)
    a = seq(1, 30, saves=(SavePlan("k", 10, 1),))
    sch.add(a)
    sch.update(sch.schedule(), StepResult(saved={"k": True}))
    b = Sequence(2, EngineRequest("2", a.tokens[:10] + [99, 98, 97], SP, resume_key="k", resume_pos=10), 0,
                 a.tokens[:10] + [99, 98, 97], 13)
    sch.add(b)
    p = sch.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in p.chunks] == [(1, 10, 20), (2, 10, 3)]
    # snapshot slot 1 -> b's new slot 2; 10 tokens = 2 entries of 4: page 0 is partial -> copied
    assert p.copies_before == [("slot", 1, 2), ("page", 4, 0, cm.view(2)[1][4][0])]
    assert p.chunks[1].slot == 2 and p.chunks[1].pages == {4: cm.view(2)[1][4]}
    assert b.num_cached == 10 and sch.cached_tokens == 10
    assert cm.snapshots["k"].uses_left == 0


def test_a_prompt_that_ends_at_a_snapshot_samples_from_its_kept_logits():
    cm, sch = make(budget=64)
    a = seq(1, 12, saves=(SavePlan("k", 12, 1),))
    sch.add_request(a.request)
    p = sch.schedule()
    sch.update(p, StepResult(sampled={p.chunks[0].seq.seq_id: [Sampled(50, 0)]}, saved={"k": True}))
    b = sch.add_request(EngineRequest("b", list(a.tokens[:12]), SP, resume_key="k", resume_pos=12))
    p = sch.schedule()
    assert [(r.seq.seq_id, r.key) for r in p.ready] == [(b.seq_id, "k")]
    assert [c.seq.seq_id for c in p.chunks] == [p.chunks[0].seq.seq_id] and b.num_computed == 12
    sch.update(p, StepResult(sampled={b.seq_id: [Sampled(60, 0)]}))
    assert b.tokens[12:] == [60]
    # without kept logits the same prompt is a miss: computed from scratch
    cm2, sch2 = make(budget=64)
    sch2.add_request(a.request)
    sch2.update(sch2.schedule(), StepResult(saved={"k": False}))
    c = sch2.add_request(EngineRequest("c", list(a.tokens[:12]), SP, resume_key="k", resume_pos=12))
    p = sch2.schedule()
    assert p.ready == [] and (c.seq_id, 0, 12) in [(x.seq.seq_id, x.start, x.num_tokens) for x in p.chunks]


def test_update_appends_stops_and_frees():
    cm, sch = make(budget=64)
    s = sch.add_request(EngineRequest("r", [3, 4, 5, 6, 7], SamplingParams(max_tokens=2, temperature=0)))
    p = sch.schedule()
    assert chunks(p) == [(s.seq_id, 0, 5, True)] and p.chunks[0].sample
    assert sch.update(p, tokens(**{f"s{s.seq_id}": 9})) == []
    assert s.tokens == [3, 4, 5, 6, 7, 9] and s.status == "running"
    p = sch.schedule()
    assert chunks(p) == [(s.seq_id, 5, 1, True)]
    done = sch.update(p, tokens(**{f"s{s.seq_id}": 8}))
    assert [(d.request.request_id, [x.tokens[5:] for x in d.seqs], d.error) for d in done] == [("r", [[9, 8]], None)]
    assert s.finish_reason == "length" and s.seq_id not in cm.seqs and not sch.has_work()
    assert cm.slots.num_used == 0 and cm.pages[4].num_used == 0


def test_n_samples_fork_in_update_and_copy_before_the_next_forward():
    cm, sch = make(budget=64)
    s = sch.add_request(EngineRequest("r", list(range(3, 9)), SamplingParams(n=3, max_tokens=2, temperature=0)))
    p = sch.schedule()
    assert p.chunks[0].num_samples == 3
    done = sch.update(p, StepResult(sampled={s.seq_id: [Sampled(10, 0), Sampled(11, 1), Sampled(12, 2)]}))
    assert done == []
    kids = sch.requests["r"][1:]
    assert [(k.sample_index, k.tokens[6:], k.num_computed, k.forked_from) for k in kids] == [
        (1, [11], 6, s.seq_id), (2, [12], 6, s.seq_id)]
    # 6 tokens = 1 entry of 4 in a partly filled page: each fork gets the slot copied and the page copied
    p = sch.schedule()
    slots = [cm.view(k.seq_id)[0] for k in kids]
    pages = [cm.view(k.seq_id)[1][4][0] for k in kids]
    assert p.copies_before == [("slot", 0, slots[0]), ("page", 4, 0, pages[0]),
                               ("slot", 0, slots[1]), ("page", 4, 0, pages[1])]
    assert [c.seq.seq_id for c in p.chunks] == [s.seq_id] + [k.seq_id for k in kids]
    done = sch.update(p, StepResult(sampled={x.seq.seq_id: [Sampled(20 + i, x.seq.sample_index)]
                                             for i, x in enumerate(p.chunks)}))
    assert [[x.tokens[6:] for x in d.seqs] for d in done] == [[[10, 20], [11, 21], [12, 22]]]
    assert cm.slots.num_used == 0 and cm.pages[4].num_used == 0


def test_a_failed_row_fails_its_request_alone():
    cm, sch = make(budget=64)
    a = sch.add_request(EngineRequest("a", [3, 4, 5], SP))
    b = sch.add_request(EngineRequest("b", [6, 7, 8], SP))
    p = sch.schedule()
    done = sch.update(p, StepResult(sampled={b.seq_id: [Sampled(9, 0)]}, errors={a.seq_id: "not finite"}))
    assert [(d.request.request_id, d.error) for d in done] == [("a", "not finite")]
    assert a.seq_id not in cm.seqs and b.tokens[3:] == [9] and list(sch.requests) == ["b"]


def test_abort_all_frees_everything():
    cm, sch = make(budget=8)
    a = seq(1, 30, saves=(SavePlan("k", 8, 1),))
    sch.add(a)
    sch.add(seq(2, 5))
    sch.update(sch.schedule(), StepResult(saved={"k": True}))
    assert cm.slots.num_used == 2 and cm.has("k")
    sch.abort_all()
    assert not sch.has_work() and cm.slots.num_used == 0 and cm.pages[4].num_used == 0 and not cm.snapshots


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
    sch.update(sch.schedule(), StepResult())
    assert cm.seqs[1].pages[4] == [0] and cm.seqs[2].pages[4] == [1]
    cm.new_seq("other")                     # someone else takes the remaining pages
    cm.ensure("other", 32)
    for t in range(8):                      # a grows to 20 tokens: 5 entries need a second page
        sch._append(a, Sampled(7, 0))
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
