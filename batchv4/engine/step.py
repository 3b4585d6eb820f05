"""The engine step's contract: what `Scheduler.schedule()` hands the runner, what the runner hands
back, and the per-step hooks that later parts plug in.

One step is `plan = scheduler.schedule()` -> `result = runner.execute(plan)` ->
`finished = scheduler.update(plan, result)`. The plan is plain data (sequence references are
read-only for the runner); the result is plain data (sampled tokens, per-request errors, the
snapshots whose copies were made); only `update()` changes sequence state, the cache manager's
records and the requests' progress.

Owns: those types and the hook protocols. Does not own: any of the three parts.

Hooks:
- `LogitsProcessor` (runner, execute): changes the logits of the rows it is given before sampling,
  e.g. a grammar's token mask. It must not keep per-sequence state that `update()` does not
  advance: matchers advance (and roll back on preemption or snapshot restore) in
  `TokenObserver`s, called by the scheduler only.
- `TokenObserver` (scheduler, update): told of every token appended to a sequence and of every
  sequence that is reset (preempted to recompute) or finished.
- The snapshot policy (scheduler): which prefixes are saved; the plan's branch points by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of `seq` computed this step."""

    seq: Any                         # scheduler.Sequence (read-only here)
    start: int
    num_tokens: int
    needs_logits: bool               # the last position's logits: to sample from or to keep
    sample: bool                     # a token is sampled after this chunk (it ends the known tokens)
    save_key: object = None          # a snapshot of the sequence after this chunk
    num_samples: int = 1             # > 1: the prompt of a request with n > 1 ends here; samples
                                     # 1.. are sampled from the same logits and forked in update()
    slot: int = -1                   # the sequence's window/pending-state slot
    pages: dict | None = None        # ratio -> its page ids (the cache manager's, read-only)


@dataclass
class ReadySample:
    """A sequence whose whole prompt came from a snapshot that kept its last logits: it samples from
    them without computing anything."""

    seq: Any
    key: object
    num_samples: int = 1


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    ready: list[ReadySample] = field(default_factory=list)
    # pool copies, in order, before the forward: ("slot", src, dst) or ("page", ratio, src, dst);
    # restores and forks. After the forward: snapshot saves ("slot", running slot, snapshot slot).
    copies_before: list[tuple] = field(default_factory=list)
    copies_after: list[tuple] = field(default_factory=list)
    keep_logits: list[object] = field(default_factory=list)   # snapshot keys whose chunk's logits to keep
    dropped: list[object] = field(default_factory=list)       # snapshots gone since the last step
    errors: list[tuple[Any, str]] = field(default_factory=list)   # (sequence, message): cannot run

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.ready or self.copies_before or self.copies_after or self.errors
                    or self.dropped)


@dataclass
class Sampled:
    """One sampled token; `sample_index` differs from the sequence's own only for forked samples."""

    token_id: int
    sample_index: int
    top_logprobs: dict[int, float] | None = None


@dataclass
class StepResult:
    sampled: dict[int, list[Sampled]] = field(default_factory=dict)   # seq_id -> its token(s)
    errors: dict[int, str] = field(default_factory=dict)              # seq_id -> why its request fails
    saved: dict[object, bool] = field(default_factory=dict)            # snapshot key now filled -> logits kept
    forward_seconds: float = 0.0


class LogitsProcessor(Protocol):
    def __call__(self, rows: list, logits: Any) -> Any:
        """`rows`: the `sampler.RowState` of each logits row; `logits` [B, V] fp32 -> [B, V]."""


class TokenObserver(Protocol):
    def on_token(self, seq: Any, token_id: int) -> None: ...

    def on_reset(self, seq: Any) -> None: ...

    def on_finish(self, seq: Any) -> None: ...
