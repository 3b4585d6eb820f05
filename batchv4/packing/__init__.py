"""Packing: group prompts that share prefixes, order them depth-first, name the snapshot points.

Pure Python and numpy; never imports torch. See planner.py for the flow and tree.py for the
ordering and snapshot rules.
"""

from batchv4.packing.keys import grouping_key, shard_of
from batchv4.packing.lru import naive_lru_prefill
from batchv4.packing.planner import plan, plan_counts, plan_with_stats
from batchv4.packing.types import PackConfig, PackInput, PlannedRequest, PlanStats, SavePoint

__all__ = [
    "PackConfig",
    "PackInput",
    "PlanStats",
    "PlannedRequest",
    "SavePoint",
    "grouping_key",
    "naive_lru_prefill",
    "plan",
    "plan_counts",
    "plan_with_stats",
    "shard_of",
]
