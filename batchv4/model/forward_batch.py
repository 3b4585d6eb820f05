"""The contract between the engine and the model: `CacheLayout`, `CachePools` and `ForwardBatch`.

The model defines these types and the engine fills them, so the model never imports the engine.
Owns: the shapes, dtypes and byte sizes of every cache pool, and slot/page copy primitives. Does not
own: which pages or slots a sequence gets (the engine's block pool decides), nor any math.

Cache state per layer and sequence (DESIGN.md section 4):
- window ring of the last W raw kv vectors: a *slot* of `window[l]` (position p at row p % W);
- compressor pending state as running softmax accumulators (max, sum, weighted sum per channel):
  a slot of `state[l]` (CSA keeps two: the entry being built and the next one, because CSA windows
  overlap) and, for CSA, `istate[l]` for the indexer's compressor;
- compressed entries (append-only) in *pages* of `page_size` entries: `comp[l]`, and for CSA the
  indexer keys `ikey[l]` (same page table as the CSA entries).
Slots hold everything that is per-sequence and fixed-size; a snapshot is simply a slot that is not
running (save = copy a running slot into a free slot, restore = the reverse). Pages are shared by
reference; only a partly filled last page must be copied before two sequences append to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchv4.config import ModelConfig
from batchv4.model import quant

_ELT = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class CacheLayout:
    """`kv_format`: "native" keeps window rings, compressed entries and indexer keys in `dtype`;
    "fp8" is the production layout: ring rows and entries packed as FP8 + RoPE dims in `dtype` +
    ue8m0 scales (584 B for V4 in bf16), indexer keys as FP4 (68 B). Unpacking gives exactly what the activation
    simulation (`Transformer(..., activation_sim=True)`) computes, so "fp8" is used with it on."""

    cfg: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    page_size: int = 64          # compressed entries per page
    with_mtp: bool = False       # the MTP block's window ring, when MTP drafting is used
    kv_format: str = "native"    # "native" | "fp8"

    def __post_init__(self) -> None:
        if self.kv_format not in ("native", "fp8"):
            raise ValueError(f"kv_format must be 'native' or 'fp8', got {self.kv_format!r}")

    @property
    def ratios(self) -> tuple[int, ...]:
        """Distinct compression ratios, each with its own page table."""
        return tuple(sorted({r for r in self.cfg.compress_ratios if r}))

    def layers_of_ratio(self, ratio: int) -> list[int]:
        """The main layers (CSA or HCA) whose entries page with this ratio's page table."""
        return [i for i, r in enumerate(self.cfg.compress_ratios) if r == ratio]

    def pages_for(self, ratio: int, num_tokens: int) -> int:
        return -(-(num_tokens // ratio) // self.page_size)

    # ---- bytes ------------------------------------------------------------------------------------
    def entry_bytes(self) -> int:
        """Bytes of one compressed entry in a page."""
        c = self.cfg
        if self.kv_format == "fp8":
            return quant.kv_entry_nbytes(c.head_dim, c.rope_head_dim, self.dtype)
        return c.head_dim * _ELT[self.dtype]

    def ikey_bytes(self) -> int:
        """Bytes of one indexer key in a page."""
        c = self.cfg
        if self.kv_format == "fp8":
            return quant.fp4_row_nbytes(c.index_head_dim)
        return c.index_head_dim * _ELT[self.dtype]

    def bytes_per_page(self, ratio: int) -> int:
        """One page of this ratio in every layer that uses it: its entries, plus the indexer keys
        of the CSA layers among them."""
        c = self.cfg
        per_entry = sum(self.entry_bytes() + (self.ikey_bytes() if c.layer_kind(i) == "csa" else 0)
                        for i in self.layers_of_ratio(ratio))
        return self.page_size * per_entry

    def bytes_per_token(self) -> float:
        """Paged bytes per cached token in this layout."""
        return sum(self.bytes_per_page(r) / (self.page_size * r) for r in self.ratios)

    def bytes_per_slot(self) -> int:
        c = self.cfg
        n_win = c.n_layers + (1 if self.with_mtp else 0)
        total = n_win * c.window_size * self.entry_bytes()
        for i in range(c.n_layers):
            kind = c.layer_kind(i)
            if kind == "csa":
                total += 2 * 3 * c.head_dim * 4 + 2 * 3 * c.index_head_dim * 4
            elif kind == "hca":
                total += 3 * c.head_dim * 4
        return total

    bytes_per_snapshot = bytes_per_slot


@dataclass
class CachePools:
    """The tensors of every pool, allocated from a layout. Indexed by main-layer index."""

    layout: CacheLayout
    num_slots: int
    num_pages: dict[int, int]
    window: list[torch.Tensor]                  # [num_slots, W, Dh] per layer (+ MTP at index n_layers);
                                                # fp8: [num_slots, W, entry bytes] uint8
    comp: dict[int, torch.Tensor]               # layer -> [num_pages[ratio], P, Dh] (fp8: P, entry bytes)
    ikey: dict[int, torch.Tensor]               # CSA layer -> [num_pages[4], P, Di] (fp8: P, ikey bytes)
    state: dict[int, torch.Tensor]              # layer -> [num_slots, c, 3, Dh] fp32 (c = 2 CSA, 1 HCA)
    istate: dict[int, torch.Tensor]             # CSA layer -> [num_slots, 2, 3, Di] fp32

    @classmethod
    def allocate(cls, layout: CacheLayout, num_slots: int, num_pages: dict[int, int],
                 device: torch.device | str = "cpu") -> "CachePools":
        c = layout.cfg
        P, W = layout.page_size, c.window_size
        dt = layout.dtype
        n_win = c.n_layers + (1 if layout.with_mtp else 0)
        if layout.kv_format == "fp8":
            window = [torch.zeros(num_slots, W, layout.entry_bytes(), dtype=torch.uint8, device=device)
                      for _ in range(n_win)]
        else:
            window = [torch.zeros(num_slots, W, c.head_dim, dtype=dt, device=device) for _ in range(n_win)]
        comp, ikey, state, istate = {}, {}, {}, {}
        for i in range(c.n_layers):
            kind = c.layer_kind(i)
            if kind == "window":
                continue
            r = c.compress_ratios[i]
            packed = layout.kv_format == "fp8"
            comp[i] = torch.zeros(num_pages.get(r, 0), P, layout.entry_bytes() if packed else c.head_dim,
                                  dtype=torch.uint8 if packed else dt, device=device)
            nc = 2 if kind == "csa" else 1
            state[i] = empty_accumulator(num_slots, nc, c.head_dim, device)
            if kind == "csa":
                ikey[i] = torch.zeros(num_pages.get(r, 0), P, layout.ikey_bytes() if packed else c.index_head_dim,
                                      dtype=torch.uint8 if packed else dt, device=device)
                istate[i] = empty_accumulator(num_slots, 2, c.index_head_dim, device)
        return cls(layout, num_slots, dict(num_pages), window, comp, ikey, state, istate)

    # ---- compressed entries and indexer keys, in either format -------------------------------------
    def read_entries(self, layer: int, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Entries at (pages, offs) of `layer` -> [..., head_dim] in the layout's dtype."""
        t = self.comp[layer][pages, offs]
        if self.layout.kv_format == "fp8":
            c = self.layout.cfg
            return quant.unpack_kv_entries(t, c.head_dim, c.rope_head_dim, self.layout.dtype)
        return t

    def write_entries(self, layer: int, pages: torch.Tensor, offs: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(self.layout.dtype)
        if self.layout.kv_format == "fp8":
            values = quant.pack_kv_entries(values, self.layout.cfg.rope_head_dim)
        self.comp[layer][pages, offs] = values

    def read_window(self, layer: int, slots, rows=None) -> torch.Tensor:
        """Window ring rows of `layer` (all W when `rows` is None) -> [..., head_dim] in the layout's
        dtype. The fp8 format packs them like compressed entries."""
        t = self.window[layer][slots] if rows is None else self.window[layer][slots, rows]
        if self.layout.kv_format == "fp8":
            c = self.layout.cfg
            return quant.unpack_kv_entries(t, c.head_dim, c.rope_head_dim, self.layout.dtype)
        return t

    def write_window(self, layer: int, slots, rows, values: torch.Tensor) -> None:
        values = values.to(self.layout.dtype)
        if self.layout.kv_format == "fp8":
            values = quant.pack_kv_entries(values, self.layout.cfg.rope_head_dim)
        self.window[layer][slots, rows] = values

    def read_ikeys(self, layer: int, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Indexer keys at (pages, offs) of CSA `layer` -> [..., index_head_dim] in the layout's dtype."""
        t = self.ikey[layer][pages, offs]
        if self.layout.kv_format == "fp8":
            return quant.unpack_fp4_rows(t, self.layout.cfg.index_head_dim).to(self.layout.dtype)
        return t

    def write_ikeys(self, layer: int, pages: torch.Tensor, offs: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(self.layout.dtype)
        if self.layout.kv_format == "fp8":
            values = quant.pack_fp4_rows(values)
        self.ikey[layer][pages, offs] = values

    def reset_slot(self, slot: int) -> None:
        """A fresh sequence: empty pending state (the window is never read before it is written)."""
        for t in list(self.state.values()) + list(self.istate.values()):
            t[slot, :, 0] = float("-inf")
            t[slot, :, 1:] = 0

    def copy_slot(self, src: int, dst: int) -> None:
        """Snapshot save (running -> free slot) or restore (snapshot -> running slot)."""
        for t in self.window:
            t[dst].copy_(t[src])
        for t in list(self.state.values()) + list(self.istate.values()):
            t[dst].copy_(t[src])

    def copy_page(self, ratio: int, src: int, dst: int) -> None:
        """Copy-on-write of a partly filled page before a second sequence appends to it."""
        for i, t in self.comp.items():
            if self.layout.cfg.compress_ratios[i] == ratio:
                t[dst].copy_(t[src])
        for i, t in self.ikey.items():
            if self.layout.cfg.compress_ratios[i] == ratio:
                t[dst].copy_(t[src])

    def nbytes(self) -> dict[str, int]:
        slots = sum(t.numel() * t.element_size() for t in self.window)
        slots += sum(t.numel() * t.element_size() for t in list(self.state.values()) + list(self.istate.values()))
        pages = sum(t.numel() * t.element_size() for t in list(self.comp.values()) + list(self.ikey.values()))
        return {"slots": slots, "pages": pages}


def empty_accumulator(n: int, c: int, d: int, device) -> torch.Tensor:
    """[n, c, 3, d] fp32 running-softmax accumulators: row 0 max (-inf), row 1 sum, row 2 weighted sum."""
    t = torch.zeros(n, c, 3, d, dtype=torch.float32, device=device)
    t[:, :, 0] = float("-inf")
    return t


@dataclass(frozen=True)
class DecodeRows:
    """Single-token sequences of a ForwardBatch: their indexes (list and [B] tensor), token rows,
    slots and positions ([B] int64 each)."""

    seqs: list[int]
    index: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor


@dataclass
class ForwardBatch:
    """Many sequences' new tokens, concatenated without padding.

    Sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1]; its tokens sit at consecutive absolute
    positions starting at start_pos[b] (the number of tokens already in its cache). Pool copies
    (snapshot restores and saves, forks) are not part of it: the engine's runner makes them
    before and after the forward, in one place.
    """

    token_ids: torch.Tensor                     # [T] int64
    positions: torch.Tensor                     # [T] int64 absolute positions
    cu_seqlens: list[int]                       # B+1 offsets into the T tokens
    start_pos: list[int]                        # [B] first new position of each sequence
    slots: list[int]                            # [B] window / pending-state slot of each sequence
    page_tables: dict[int, torch.Tensor]        # ratio -> [B, max_pages] int64 page ids (-1 unused)
    logits_indices: torch.Tensor                # [L] int64 rows of the T tokens that need logits
    _decode: "DecodeRows | None | bool" = field(default=False, init=False, repr=False, compare=False)

    def decode_rows(self) -> "DecodeRows | None":
        """The sequences with exactly one new token (decode steps), when there are at least two,
        as index tensors; None otherwise. Built once per batch and shared by every layer."""
        if self._decode is False:
            seqs = [b for b in range(self.num_seqs) if self.cu_seqlens[b + 1] - self.cu_seqlens[b] == 1]
            if len(seqs) < 2:
                self._decode = None
            else:
                dev = self.positions.device
                rows = torch.tensor([self.cu_seqlens[b] for b in seqs], device=dev)
                self._decode = DecodeRows(seqs, torch.tensor(seqs, device=dev), rows,
                                          torch.tensor([self.slots[b] for b in seqs], device=dev),
                                          self.positions[rows])
        return self._decode

    @property
    def num_seqs(self) -> int:
        return len(self.start_pos)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, int]], page_tables: dict[int, list[list[int]]],
              logits_for: list[bool] | None = None, device: torch.device | str = "cpu") -> "ForwardBatch":
        """Convenience builder. seqs: (new token ids, start position, slot) per sequence;
        page_tables[ratio][b] = page ids of sequence b; logits_for[b]: logits of b's last token."""
        ids, pos, cu = [], [], [0]
        for toks, p0, _ in seqs:
            ids.extend(toks)
            pos.extend(range(p0, p0 + len(toks)))
            cu.append(len(ids))
        if logits_for is None:
            logits_for = [True] * len(seqs)
        li = [cu[b + 1] - 1 for b in range(len(seqs)) if logits_for[b] and cu[b + 1] > cu[b]]
        tables = {}
        for r, rows in page_tables.items():
            width = max([len(x) for x in rows] + [1])
            t = torch.full((len(seqs), width), -1, dtype=torch.int64)
            for b, row in enumerate(rows):
                if row:
                    t[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
            tables[r] = t.to(device)
        return cls(
            token_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            cu_seqlens=cu, start_pos=[p for _, p, _ in seqs], slots=[s for _, _, s in seqs],
            page_tables=tables, logits_indices=torch.tensor(li, dtype=torch.int64, device=device),
        )
