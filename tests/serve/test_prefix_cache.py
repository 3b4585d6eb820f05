"""The server's snapshot policy (pure Python, no model): candidate positions, content keys, plans
against a real CacheManager, and re-planning a waiting request whose snapshot will not come."""

from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, SavePlan, Scheduler
from batchv4.engine.step import StepResult
from batchv4.serve.prefix_cache import PrefixPolicy, plan, prefix_keys, unblock_waiting

BOS, U, A, E, T = 0, 1, 2, 3, 4          # begin, <User>, <Assistant>, end of sentence, </think>
POLICY = PrefixPolicy(unit=64, before_ids=frozenset({U}), after_ids=frozenset({A, E}))
SP = SamplingParams(max_tokens=2, temperature=0)


def chat_ids(*turns, system=()):
    """BOS system (<User> user <Assistant> </think> answer EOS)* ... <User> last <Assistant> </think>."""
    ids = [BOS, *system]
    for i, t in enumerate(turns):
        ids += [U, *t, A, T]
        if i < len(turns) - 1:
            ids += [7, 7, E]
    return ids


def test_message_ends_and_units():
    ids = chat_ids(range(100, 120), system=range(1000, 1100))          # 124 tokens
    assert len(ids) == 124 and ids[101] == U and ids[122] == A
    # the system prompt's end (before <User>), 64, and the prompt's end; the boundary after
    # <Assistant> is one token before the end: the end wins
    assert POLICY.positions(ids) == [64, 101, 124]
    # thinking mode leaves the end out: the boundary after <Assistant> serves
    assert POLICY.positions(ids, include_end=False) == [64, 101, 123]
    # a unit multiple close to a message end gives way to it
    near = chat_ids(range(100, 120), system=range(1000, 1060))         # system ends at 61
    assert POLICY.positions(near) == [61, near.index(A) + 2]
    # the end of a system prompt stays however close the prompt's end is
    short_q = chat_ids([100, 101], system=range(1000, 1100))
    assert POLICY.positions(short_q) == [64, 101, 106]
    # very short prefixes are not worth a snapshot
    assert POLICY.positions(chat_ids([50, 51])) == []


def test_long_prompts_are_thinned_to_nested_multiples():
    doc = list(range(10, 5010))
    short, long = chat_ids(doc[:3000]), chat_ids(doc)
    ps, pl = POLICY.positions(short), POLICY.positions(long)
    assert len(ps) <= POLICY.max_candidates and len(pl) <= POLICY.max_candidates
    assert ps[-1] == len(short) and pl[-1] == len(long)
    units_s, units_l = [p for p in ps if p % 64 == 0], [p for p in pl if p % 64 == 0]
    assert units_s == list(range(256, 3001, 256)) and units_l == list(range(512, 5001, 512))
    # the longer prompt's multiples that the shorter one reaches are among the shorter one's
    assert {p for p in units_l if p <= len(short)} <= set(units_s)


def test_keys_are_those_of_the_prefix_alone():
    a = [5, 6, 7, 8, 9, 10]
    b = [5, 6, 7, 8, 99, 100, 101]
    ka, kb = prefix_keys(a, [2, 4, 5]), prefix_keys(b, [2, 4, 5])
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    assert prefix_keys(a, [4]) == [ka[1]]


def test_plan_resumes_from_the_longest_ready_candidate_and_saves_the_rest():
    cm = CacheManager((4,), 4, {4: 64}, 16)
    ids = chat_ids(range(100, 120), system=range(1000, 1100))
    cands = POLICY.candidates(ids)
    key = dict(zip(cands.positions, cands.keys))
    assert plan(cm, cands) == (None, 0, tuple(SavePlan(k, p, 0) for p, k in zip(cands.positions, cands.keys)))
    sch = Scheduler(cm, 256, 8, 10_000)
    sch.add_request(EngineRequest("a", ids, SP, saves=(SavePlan(key[64], 64, 0), SavePlan(key[101], 101, 0))))
    p = sch.schedule()
    assert p.chunks[0].save_key == key[64]
    assert plan(cm, cands)[:2] == (None, 0)        # registered, not ready: no resume, and no second save
    assert [s.pos for s in plan(cm, cands)[2]] == [101, 124]
    sch.update(p, StepResult(saved={key[64]: False}))
    sch.update(sch.schedule(), StepResult(saved={key[101]: False}))
    other = chat_ids(range(200, 230), system=range(1000, 1100))        # same system prompt
    resume_key, resume_pos, saves = plan(cm, POLICY.candidates(other))
    assert (resume_key, resume_pos) == (key[101], 101) and [s.pos for s in saves] == [len(other)]
    # a snapshot at the prompt's very end is used only if it kept its logits
    cm2 = CacheManager((4,), 4, {4: 64}, 16)
    sch2 = Scheduler(cm2, 256, 8, 10_000)
    sch2.add_request(EngineRequest("b", ids, SP, saves=(SavePlan(key[124], 124, 0),)))
    sch2.update(sch2.schedule(), StepResult(saved={key[124]: False}))
    assert plan(cm2, cands)[:2] == (None, 0)


def test_a_waiting_request_whose_snapshot_will_not_come_is_replanned():
    cm = CacheManager((4,), 4, {4: 64}, 16)
    sch = Scheduler(cm, 256, 8, 10_000)
    ids = chat_ids(range(100, 120), system=range(1000, 1100))
    cands = POLICY.candidates(ids)
    k101 = cands.keys[cands.positions.index(101)]
    # b was planned to resume from a snapshot since evicted; d, queued behind it, would save it
    b = sch.add_request(EngineRequest("b", ids, SP, resume_key=k101, resume_pos=101))
    d = sch.add_request(EngineRequest("d", ids[:110], SP, saves=(SavePlan(k101, 101, 0),)))
    assert sch.schedule().chunks == [] and list(sch.waiting) == [b, d]      # stuck for good
    assert unblock_waiting(sch, {"b": cands}) == 1
    assert b.request.resume_key is None and [s.pos for s in b.saves] == list(cands.positions)
    p = sch.schedule()
    assert [c.seq.request.request_id for c in p.chunks] == ["b", "d"]
    # a request waiting for a snapshot that a running sequence is about to save keeps waiting
    c = sch.add_request(EngineRequest("c", ids, SP, resume_key=cands.keys[-1], resume_pos=124))
    assert unblock_waiting(sch, {"c": cands}) == 0 and c.request.resume_key == cands.keys[-1]
