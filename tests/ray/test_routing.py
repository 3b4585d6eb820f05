"""Routing of prefix groups to replicas (pure functions, no Ray) and the executor's option checks."""

import pytest

from batchv4.errors import UserError
from batchv4.pipelines.routing import Router, round_robin_blocks, route
from batchv4.pipelines.run_config import RunConfig, check_executor


def test_route_deals_whole_groups_to_the_least_loaded_replica():
    assert route([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    assert route([100, 1, 1, 1, 50], 2) == [0, 1, 1, 1, 1]
    assert route([5, 7], 4) == [0, 1]
    loads = [0, 0, 0]
    for t, r in zip(sizes := [9, 3, 8, 1, 1, 7, 2, 6], route(sizes, 3)):
        loads[r] += t
    assert max(loads) - min(loads) <= max(sizes)
    with pytest.raises(ValueError):
        Router(0)


def test_round_robin_blocks():
    assert round_robin_blocks(7, 2, 2) == [0, 0, 1, 1, 0, 0, 1]


def test_executor_options_are_checked_and_a_missing_extra_is_one_line(monkeypatch):
    with pytest.raises(UserError, match="--replicas and --address need --executor ray"):
        check_executor(RunConfig(input="in.jsonl", output="x", replicas=2))
    with pytest.raises(UserError, match="--executor must be local or ray"):
        check_executor(RunConfig(input="in.jsonl", output="x", executor="spark"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'batchv4\[ray\]'"):
        check_executor(RunConfig(input="in.jsonl", output="x", executor="ray", replicas=2))


def test_the_local_executor_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys; from batchv4.cli import cli; from batchv4.pipelines import run, run_cmd, routing; "
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_split_group_cuts_big_groups_at_cheap_branch_points():
    from batchv4.pipelines.routing import split_group

    # one group of 10 rows: a 100-token shared prefix, each row 40 tokens of its own
    resume, work = [0] + [100] * 9, [140] + [40] * 9
    assert split_group(resume, work, 20) == [(0, 10, 0)]              # smaller than two pieces: whole
    pieces = split_group(resume, work, 3, max_recompute=0.5)
    # 3 rows at least, and a cut only once the piece's work is twice the prefix it makes the next compute again
    assert [p[:2] for p in pieces] == [(0, 3), (3, 8), (8, 10)]
    assert [p[2] for p in pieces] == [0, 100, 100]
    # a cheaper rule makes longer pieces
    assert split_group(resume, work, 3, max_recompute=0.25) == [(0, 8, 0), (8, 10, 100)]
    # the cut waits for a branch point: rows 3-5 share 500 tokens, row 6 only the 100-token root
    resume2, work2 = [0, 100, 100, 100, 500, 500, 100, 100, 100], [140, 40, 40, 440, 40, 40, 40, 40, 40]
    cut = split_group(resume2, work2, 4, max_recompute=0.25)
    assert cut == [(0, 6, 0), (6, 9, 100)]
    # every row is in exactly one piece, in order
    for rows in (1, 2, 5, 9):
        ps = split_group(resume2, work2, rows)
        assert [i for a, b, _ in ps for i in range(a, b)] == list(range(9))
