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
