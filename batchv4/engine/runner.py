"""The model runner: turns a scheduler `StepPlan` into one packed `ForwardBatch`, runs the model over
the cache pools, and hands back the logits rows each sequence needs.

Owns: the pools' tensors (allocated once from the layout and the budget) and the batch assembly.
Does not own: which pages/slots are used (CacheManager), scheduling or sampling.
"""

from __future__ import annotations

import time

import torch

from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.scheduler import StepPlan
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
                 device: torch.device) -> None:
        self.model = model
        self.layout = layout
        self.device = device
        self.pools = CachePools.allocate(layout, num_slots, num_pages, device)
        self.forward_seconds = 0.0

    def execute(self, plan: StepPlan, cache: CacheManager) -> dict[int, torch.Tensor]:
        """Run the step; returns seq_id -> logits [V] fp32 for chunks that need them."""
        out = self._execute(plan, cache)
        for ch in plan.chunks:
            if ch.save is not None and ch.save.key in cache.snapshots:
                cache.snapshots[ch.save.key].ready = True
        return out

    def _execute(self, plan: StepPlan, cache: CacheManager) -> dict[int, torch.Tensor]:
        if not plan.chunks:
            for src, dst in plan.restores:
                self.pools.copy_slot(src, dst)
            for r, s, d in plan.page_copies:
                self.pools.copy_page(r, s, d)
            for src, dst in plan.saves:
                self.pools.copy_slot(src, dst)
            return {}
        seqs, tables = [], {r: [] for r in self.layout.ratios}
        for ch in plan.chunks:
            sc = cache.seqs[ch.seq.seq_id]
            seqs.append((ch.seq.tokens[ch.start:ch.start + ch.num_tokens], ch.start, sc.slot))
            for r in self.layout.ratios:
                tables[r].append(sc.pages[r])
        fb = ForwardBatch.build(seqs, tables, [ch.needs_logits for ch in plan.chunks], device=self.device,
                                restores=plan.restores, saves=plan.saves, page_copies=plan.page_copies)
        t0 = time.perf_counter()
        logits = self.model(fb, self.pools)
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - t0
        out, row = {}, 0
        for ch in plan.chunks:
            if ch.needs_logits:
                out[ch.seq.seq_id] = logits[row]
                if ch.save is not None and ch.save.key in cache.snapshots:
                    cache.snapshots[ch.save.key].logits = logits[row]
                row += 1
        return out


class _NoPools:
    def copy_slot(self, src: int, dst: int) -> None:
        pass

    def copy_page(self, ratio: int, src: int, dst: int) -> None:
        pass


class NoMathRunner:
    """Stands in for ModelRunner when only the bookkeeping is measured (real geometries on a CPU):
    every chunk that needs logits gets uniform logits, nothing is computed or allocated."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pools = _NoPools()
        self.forward_seconds = 0.0

    def execute(self, plan: StepPlan, cache: CacheManager) -> dict[int, torch.Tensor]:
        out = {}
        for ch in plan.chunks:
            if ch.needs_logits:
                out[ch.seq.seq_id] = torch.zeros(self.vocab_size)
                if ch.save is not None and ch.save.key in cache.snapshots:
                    cache.snapshots[ch.save.key].logits = out[ch.seq.seq_id]
            if ch.save is not None and ch.save.key in cache.snapshots:
                cache.snapshots[ch.save.key].ready = True
        return out
