"""A minimal test-side cache allocator for the packed forward: one slot per sequence, pages handed
out sequentially. (The engine's real block pool is tested in tests/engine.)"""

from __future__ import annotations

import torch

from batchv4.model.forward_batch import CachePools, ForwardBatch


class Harness:
    def __init__(self, model, num_slots: int = 8, num_pages: int = 64, page_size: int = 4):
        self.model = model
        self.device = model.embed.weight.device   # pools and batches live where the model does
        self.layout = model.cache_layout(page_size=page_size)
        self.pools = CachePools.allocate(self.layout, num_slots, {r: num_pages for r in self.layout.ratios},
                                         device=self.device)
        self.next_page = {r: 0 for r in self.layout.ratios}
        self.tables: dict[int, dict[int, list[int]]] = {}   # seq -> ratio -> pages
        self.length: dict[int, int] = {}                     # seq -> tokens in cache

    def _ensure_pages(self, seq: int, n_tokens: int) -> None:
        t = self.tables.setdefault(seq, {r: [] for r in self.layout.ratios})
        for r in self.layout.ratios:
            while len(t[r]) < self.layout.pages_for(r, n_tokens):
                t[r].append(self.next_page[r])
                self.next_page[r] += 1

    def step(self, chunks: list[tuple[int, list[int]]], saves=(), restores=()) -> torch.Tensor:
        """chunks: (seq id = slot, new tokens). Returns logits of each chunk's last token [B, V].
        `restores` (snapshot slot, running slot) are copied before the forward and `saves`
        (running slot, snapshot slot) after it, as the engine's runner does."""
        seqs, tables = [], {r: [] for r in self.layout.ratios}
        for seq, toks in chunks:
            p0 = self.length.get(seq, 0)
            self._ensure_pages(seq, p0 + len(toks))
            seqs.append((toks, p0, seq))
            for r in self.layout.ratios:
                tables[r].append(self.tables[seq][r])
            self.length[seq] = p0 + len(toks)
        for src, dst in restores:
            self.pools.copy_slot(src, dst)
        fb = ForwardBatch.build(seqs, tables, device=self.device)
        logits = self.model(fb, self.pools)
        for src, dst in saves:
            self.pools.copy_slot(src, dst)
        return logits

    def fork(self, src: int, dst: int, snap_slot: int) -> None:
        """Give sequence dst the state of src at its current length via a snapshot slot (full pages
        shared by reference, the partial last page copied)."""
        self.pools.copy_slot(src, snap_slot)
        self.pools.copy_slot(snap_slot, dst)
        n = self.length[src]
        self.length[dst] = n
        self.tables[dst] = {}
        for r in self.layout.ratios:
            pages = list(self.tables[src][r])
            if (n // r) % self.layout.page_size and pages:
                new = self.next_page[r]
                self.next_page[r] += 1
                self.pools.copy_page(r, pages[-1], new)
                pages[-1] = new
            self.tables[dst][r] = pages
