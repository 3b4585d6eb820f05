"""`Scheduler.abort`: one request dropped between steps (its client went away), pinned exactly on
small cases (pure Python, no model), with hand-made `StepResult`s as the runner would answer."""

from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, SavePlan, Scheduler
from batchv4.engine.step import Sampled, StepResult

SP = SamplingParams(max_tokens=4, temperature=0)


class Recorder:
    def __init__(self):
        self.finished = []

    def on_token(self, seq, token_id):
        pass

    def on_reset(self, seq):
        pass

    def on_finish(self, seq):
        self.finished.append(seq.seq_id)


def make(budget=64, pages=32, slots=8, max_seqs=8):
    cm = CacheManager((4,), 4, {4: pages}, slots)
    rec = Recorder()
    return cm, Scheduler(cm, budget, max_seqs, max_model_len=10_000, observers=[rec]), rec


def held(cm):
    return cm.slots.num_used, cm.pages[4].num_used


def test_unknown_or_finished_requests_are_not_aborted():
    cm, sch, _ = make()
    assert sch.abort("nope") is False
    s = sch.add_request(EngineRequest("r", [3, 4, 5], SamplingParams(max_tokens=1, temperature=0)))
    done = sch.update(sch.schedule(), StepResult(sampled={s.seq_id: [Sampled(9, 0)]}))
    assert [d.request.request_id for d in done] == ["r"]
    assert sch.abort("r") is False


def test_abort_a_waiting_request():
    cm, sch, rec = make()
    a = sch.add_request(EngineRequest("a", [3, 4, 5], SP))
    b = sch.add_request(EngineRequest("b", [6, 7, 8], SP))
    assert sch.abort("a") is True
    assert list(sch.waiting) == [b] and list(sch.requests) == ["b"]
    assert a.status == "finished" and rec.finished == [a.seq_id] and held(cm) == (0, 0)
    p = sch.schedule()
    assert [c.seq.seq_id for c in p.chunks] == [b.seq_id]


def test_abort_a_running_request_frees_its_pages_and_slot_and_keeps_its_snapshots():
    cm, sch, rec = make()
    a = sch.add_request(EngineRequest("a", list(range(3, 43)), SP, saves=(SavePlan("k", 20, 0),)))
    b = sch.add_request(EngineRequest("b", [6, 7, 8], SP))
    sch.update(sch.schedule(), StepResult(sampled={b.seq_id: [Sampled(9, 0)]}, saved={"k": False}))
    assert a.status == "running" and a.num_computed == 20 and cm.has("k")
    # slots: a, b and the snapshot; pages: a's 2 (20 tokens = 5 entries), shared with the snapshot
    assert held(cm) == (3, 2) and cm.view(a.seq_id)[1] == cm.snapshots["k"].pages == {4: [0, 1]}
    assert sch.abort("a") is True
    assert a.seq_id not in cm.seqs and sch.running == [b] and rec.finished == [a.seq_id]
    assert held(cm) == (2, 2) and cm.has("k")       # b's slot; the snapshot's slot and pages
    # the rest goes on as if a had never been there
    p = sch.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in p.chunks] == [(b.seq_id, 3, 1)]


def test_abort_drops_the_copies_of_forks_not_made_yet():
    cm, sch, _ = make()
    other = sch.add_request(EngineRequest("o", list(range(3, 9)), SamplingParams(n=2, max_tokens=3, temperature=0)))
    s = sch.add_request(EngineRequest("r", list(range(3, 9)), SamplingParams(n=3, max_tokens=3, temperature=0)))
    p = sch.schedule()
    sch.update(p, StepResult(sampled={other.seq_id: [Sampled(10, 0), Sampled(11, 1)],
                                      s.seq_id: [Sampled(10, 0), Sampled(11, 1), Sampled(12, 2)]}))
    o_kid = sch.requests["o"][1]
    assert len(sch._fork_copies) == 6          # a slot and a (partial) page copy per fork
    assert sch.abort("r") is True
    # only the other request's fork copy is left
    assert sch._fork_copies == [("slot", cm.view(other.seq_id)[0], cm.view(o_kid.seq_id)[0]),
                                ("page", 4, cm.view(other.seq_id)[1][4][0], cm.view(o_kid.seq_id)[1][4][0])]
    assert held(cm) == (2, 2) and list(sch.requests) == ["o"]
    assert s.status == "finished" and s.seq_id not in cm.seqs
    p = sch.schedule()
    assert [c.seq.seq_id for c in p.chunks] == [other.seq_id, o_kid.seq_id]


def test_abort_before_a_planned_restore_releases_the_planned_use():
    cm, sch, _ = make(budget=16, max_seqs=2)
    sch.add_request(EngineRequest("a", list(range(3, 15)), SP, saves=(SavePlan("k", 8, 2),)))
    sch.update(sch.schedule(), StepResult(saved={"k": False}))
    assert cm.snapshots["k"].uses_left == 2
    b = sch.add_request(EngineRequest("b", list(range(3, 11)) + [99], SP, resume_key="k", resume_pos=8))
    c = sch.add_request(EngineRequest("c", list(range(3, 11)) + [98], SP, resume_key="k", resume_pos=8))
    sch.update(sch.schedule(), StepResult())
    # b restored (a use taken); c waits for a free place, its restore still planned
    assert b.num_cached == 8 and c.status == "waiting" and cm.snapshots["k"].uses_left == 1
    assert sch.abort("b") is True and cm.snapshots["k"].uses_left == 1   # b's restore was made
    assert sch.abort("c") is True and cm.snapshots["k"].uses_left == 0   # c's never will be
    assert not sch.waiting
    assert sch.abort("a") is True
    assert held(cm) == (1, 1) and not sch.has_work()                  # only the snapshot is left
