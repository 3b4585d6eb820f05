"""Several ranks: attention data-parallel (each rank an ordinary engine with its own sequences and
cache), routed experts expert-parallel (each rank holds 1/N of them; tokens travel to the ranks that
hold their experts and back).

- `group.py`     the process group (gloo on CPU, NCCL on CUDA, plus a gloo group for control
                 messages), timeouts, teardown.
- `ep_moe.py`    the expert exchange a sharded `batchv4.model.moe.MoE` calls (all-to-all dispatch
                 and combine), and the empty participation of a rank that has no tokens this step.
- `worker.py`    one rank's lockstep step and the worker process (ranks 1..N-1).
- `launcher.py`  `RankGroup`: rank 0 in the caller's process, the backend the pipelines drive;
                 it starts the other ranks, deals prefix groups to ranks balanced by tokens,
                 and turns a rank's failure into an error instead of a hang.

Owns: everything that knows there is more than one rank. Does not own: the engine step
(`batchv4.engine.llm`), the model (`batchv4.model`), or the pipelines.
"""
