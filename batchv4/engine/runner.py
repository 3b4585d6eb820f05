"""The model runner: executes a scheduler `StepPlan` and returns a plain `StepResult`.

Owns: the pools' tensors (allocated once from the layout and the budget), every pool copy the
engine makes (restores, forks, snapshot saves: this is the one place), the packed `ForwardBatch`,
the logits kept for snapshots whose prompt may end there, the logits processors (per-step hooks,
e.g. grammar masks), and sampling. It reads sequences but changes no bookkeeping: tokens, stops,
snapshot records and frees are `Scheduler.update()`'s. Does not own: which pages/slots are used
(CacheManager), scheduling, or the sampling rules (Sampler).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from batchv4.engine.sampler import RowState, Sampler
from batchv4.engine.step import LogitsProcessor, Sampled, StepPlan, StepResult
from batchv4.model.forward_batch import CacheLayout, CachePools, ForwardBatch


def size_cache(layout: CacheLayout, budget_bytes: int, max_num_seqs: int, max_snapshots: int
               ) -> tuple[int, dict[int, int]]:
    """Split a memory budget into slots (running sequences + snapshots) and pages per ratio, with
    pages per ratio proportional to how fast each ratio fills them."""
    per_slot = layout.bytes_per_slot()
    slots = max(1, min(max_num_seqs + max_snapshots, int(budget_bytes * 0.5) // max(per_slot, 1)))
    left = budget_bytes - slots * per_slot
    if not layout.ratios:
        return slots, {}
    # capacity of C tokens costs sum_r ceil(C / (r*P)) * bytes_per_page(r)
    per_token = sum(layout.bytes_per_page(r) / (r * layout.page_size) for r in layout.ratios)
    cap = max(0, int(left / per_token))
    pages = {r: max(1, cap // (r * layout.page_size)) for r in layout.ratios}
    return slots, pages


class ModelRunner:
    def __init__(self, model, layout: CacheLayout, num_slots: int, num_pages: dict[int, int],
                 device: torch.device, sampler: Sampler,
                 logits_processors: Sequence[LogitsProcessor] = ()) -> None:
        self.model = model
        self.layout = layout
        self.device = device
        self.sampler = sampler
        self.logits_processors = list(logits_processors)
        self.pools = self._allocate(num_slots, num_pages)
        self.kept_logits: dict[object, torch.Tensor] = {}    # snapshot key -> logits [V] at its last position
        self.forward_seconds = 0.0

    def _allocate(self, num_slots: int, num_pages: dict[int, int]):
        return CachePools.allocate(self.layout, num_slots, num_pages, self.device)

    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for key in plan.dropped:
            self.kept_logits.pop(key, None)
        for proc in self.logits_processors:      # e.g. grammar masks, filled beside the forward
            prepare = getattr(proc, "prepare", None)
            if prepare is not None:
                prepare(plan)
        self._copy(plan.copies_before)
        logits = self._forward(plan, result) if plan.chunks else None
        self._copy(plan.copies_after)
        # logits rows: one per chunk that needs them, in chunk order
        rows: list[tuple[object, torch.Tensor]] = []
        row = 0
        for ch in plan.chunks:
            if not ch.needs_logits:
                continue
            if ch.save_key is not None:
                self.kept_logits[ch.save_key] = logits[row]
                result.saved[ch.save_key] = True
            if ch.sample:
                rows.append((ch, logits[row]))
            row += 1
        for r in plan.ready:
            rows.append((r, self.kept_logits[r.key]))
        if rows:
            self._sample(rows, logits, result)
        return result

    def _copy(self, copies: list[tuple]) -> None:
        for c in copies:
            if c[0] == "slot":
                self.pools.copy_slot(c[1], c[2])
            else:
                self.pools.copy_page(c[1], c[2], c[3])

    def _forward(self, plan: StepPlan, result: StepResult) -> torch.Tensor:
        seqs, tables = [], {r: [] for r in self.layout.ratios}
        for ch in plan.chunks:
            seqs.append((ch.seq.tokens[ch.start:ch.start + ch.num_tokens], ch.start, ch.slot))
            for r in self.layout.ratios:
                tables[r].append(ch.pages[r])
        fb = ForwardBatch.build(seqs, tables, [ch.needs_logits for ch in plan.chunks], device=self.device)
        t0 = time.perf_counter()
        logits = self.model(fb, self.pools)
        if logits.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.forward_seconds += dt
        result.forward_seconds = dt
        return logits

    def _sample(self, entries: list[tuple[object, torch.Tensor]], step_logits, result: StepResult) -> None:
        """One row per sample to draw (a chunk or ready sequence with num_samples > 1 draws all its
        request's first tokens from the same logits), logits processors applied, then the sampler;
        a row whose logits are not finite fails its request alone."""
        rows, tensors, owners = [], [], []
        for e, lg in entries:
            seq = e.seq
            for k in range(e.num_samples):
                index = seq.sample_index if e.num_samples == 1 else k
                rows.append(RowState(seq.request.params, seq.request.request_id, index, seq.num_generated,
                                     seq.tokens[:seq.num_prompt], seq.tokens[seq.num_prompt:],
                                     seq.request.thinking))
                tensors.append(lg)
                owners.append((seq.seq_id, index))
        logits = _stack_rows(tensors, step_logits)
        for proc in self.logits_processors:
            logits = proc(rows, logits)
        for (seq_id, index), res in zip(owners, self.sampler.sample(logits, rows, row_errors=True)):
            if res.error is not None:
                result.errors[seq_id] = res.error
                continue
            result.sampled.setdefault(seq_id, []).append(Sampled(res.token_id, index, res.top_logprobs))


def _stack_rows(rows: list[torch.Tensor], step_logits: torch.Tensor | None) -> torch.Tensor:
    """Logit rows [V] -> [B, V] fp32. When they are all the rows of this step's logits, in order
    (the usual decode step), that tensor is used as it is instead of copying B x V floats."""
    if (step_logits is not None and step_logits.dim() == 2 and step_logits.shape[0] == len(rows)
            and all(r.data_ptr() == step_logits[i].data_ptr() for i, r in enumerate(rows))):
        return step_logits.float()
    return torch.stack([r.float() for r in rows])


class _NoPools:
    def copy_slot(self, src: int, dst: int) -> None:
        pass

    def copy_page(self, ratio: int, src: int, dst: int) -> None:
        pass


class NoMathRunner(ModelRunner):
    """Stands in for ModelRunner when only the bookkeeping is measured (real geometries on a CPU):
    every chunk that needs logits gets uniform logits, nothing is computed or allocated."""

    def __init__(self, vocab_size: int, sampler: Sampler) -> None:
        self.vocab_size = vocab_size
        self.sampler = sampler
        self.logits_processors = []
        self.pools = _NoPools()
        self.kept_logits = {}
        self.forward_seconds = 0.0

    def _forward(self, plan: StepPlan, result: StepResult) -> torch.Tensor:
        return torch.zeros(sum(1 for ch in plan.chunks if ch.needs_logits), self.vocab_size)
