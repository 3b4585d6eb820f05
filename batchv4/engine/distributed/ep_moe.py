"""The expert exchange: how a rank's tokens reach the ranks that hold their routed experts and how
the results come back (`batchv4.model.moe.ExpertExchange`, which a sharded MoE calls).

Per MoE layer and step, with T tokens on this rank and top-k routing (weights and ids computed
locally by the replicated gate):
1. header: one all-gather of [code, layer, rows for rank 0..N-1] from every rank, so each rank
   knows what it will receive, and a rank with no work can tell which layer to join;
2. dispatch: one all-to-all of packed rows (hidden state, k weights, k expert ids) — a token goes
   once to each rank that holds at least one of its experts, not to every rank;
3. each rank runs its local experts over what it received (other ranks' slots contribute 0);
4. combine: the reverse all-to-all of the fp32 partial sums; each token adds its partial sums.

A rank whose step needs no forward (no sequences, or fewer forwards than another rank) calls
`finish_step()`: it sends "done" headers and, while some rank is still inside a layer, joins that
layer with 0 tokens, so the collectives always match. Partial sums travel in fp32 (the reference
accumulates experts in fp32).

Owns: the exchange and its byte counters. Does not own: routing or expert math (`moe.py`), the
process group (`group.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from batchv4.model.moe import ExpertExchange, MoE, expert_range

_LAYER, _DONE = 1, 0


class AllToAllExchange(ExpertExchange):
    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.moes: dict[int, MoE] = {}
        self.bounds: torch.Tensor | None = None     # [N-1] first expert id of ranks 1..N-1
        self.bytes_sent = 0          # to other ranks: dispatch + combine
        self.token_layers = 0        # this rank's tokens x MoE layers exchanged
        self.activation_bytes = 0    # hidden-state bytes of those tokens (the floor's unit)

    def attach(self, model: nn.Module) -> int:
        """Give every sharded MoE of `model` this exchange, keyed by its order in the module tree
        (the same on every rank). Returns how many."""
        for key, moe in enumerate(m for m in model.modules() if isinstance(m, MoE) and m.sharded):
            moe.exchange, moe.layer_key = self, key
            self.moes[key] = moe
        if self.moes:
            n = next(iter(self.moes.values())).experts.n_routed
            self.bounds = torch.tensor([expert_range(n, (r, self.world))[0] for r in range(1, self.world)],
                                       device=self.device)
        return len(self.moes)

    # ---- the collectives ------------------------------------------------------------------------
    def _header(self, code: int, key: int, counts: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        mine = torch.cat([torch.tensor([code, key], device=self.device), counts.to(self.device)])
        out = torch.empty(self.world * mine.numel(), dtype=torch.int64, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, mine)
        return out.view(self.world, -1).cpu()             # [N, 2 + N]

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, k] fp32, ids [T, k] global -> [T, D] fp32 (every rank's experts)."""
        T = x.shape[0]
        owner = torch.bucketize(ids, self.bounds, right=True)                      # [T, k] rank
        dest = torch.zeros(T, self.world, dtype=torch.bool, device=x.device)
        dest[torch.arange(T, device=x.device)[:, None], owner] = True            # [T, N]
        counts = dest.sum(0)
        hdr = self._header(_LAYER, moe.layer_key, counts)
        self._check(hdr, moe.layer_key)
        tok = torch.cat([dest[:, j].nonzero().flatten() for j in range(self.world)])   # [S] by destination
        back = self._exchange(moe, hdr, x[tok], weights[tok], ids[tok])               # [S, D] fp32
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, back)
        self.token_layers += T
        self.activation_bytes += T * x.shape[1] * x.element_size()
        return out

    def finish_step(self) -> None:
        """Take part in every layer another rank is still in, with 0 tokens, until all are done."""
        if not self.moes:
            return
        zeros = torch.zeros(self.world, dtype=torch.int64)
        while True:
            hdr = self._header(_DONE, -1, zeros)
            working = hdr[:, 0] == _LAYER
            if not bool(working.any()):
                return
            key = int(hdr[working.nonzero()[0, 0], 1])
            self._check(hdr, key)
            moe = self.moes[key]
            D, k = moe.experts.w2.shape[1], moe.gate.topk
            dtype = moe.gate.weight.dtype
            self._exchange(moe, hdr, torch.empty(0, D, dtype=dtype, device=self.device),
                           torch.empty(0, k, device=self.device), torch.empty(0, k, dtype=torch.int64,
                                                                              device=self.device))

    def _check(self, hdr: torch.Tensor, key: int) -> None:
        working = hdr[:, 0] == _LAYER
        keys = hdr[working, 1].tolist()
        if any(k != key for k in keys):
            raise RuntimeError(f"ranks out of step in the expert exchange: MoE layers {hdr[:, 1].tolist()}")

    def _exchange(self, moe: MoE, hdr: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
        """Rows sorted by destination (xs [S, D], ws/ids [S, k]) -> their partial sums [S, D] fp32."""
        import torch.distributed as dist

        send = hdr[self.rank, 2:].tolist()
        recv = hdr[:, 2 + self.rank].tolist()
        S, D = xs.shape
        k = ws.shape[1]
        xb = D * xs.element_size()
        rows = torch.cat([xs.contiguous().view(torch.uint8).reshape(S, xb),
                          ws.float().contiguous().view(torch.uint8).reshape(S, 4 * k),
                          ids.to(torch.int32).contiguous().view(torch.uint8).reshape(S, 4 * k)], dim=1)
        got = torch.empty(sum(recv), rows.shape[1], dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(got, rows, recv, send)
        R = got.shape[0]
        xr = got[:, :xb].contiguous().view(xs.dtype).reshape(R, D)
        wr = got[:, xb:xb + 4 * k].contiguous().view(torch.float32).reshape(R, k)
        idr = got[:, xb + 4 * k:].contiguous().view(torch.int32).reshape(R, k).long()
        y = moe.local_routed(xr, wr, idr)                                          # [R, D] fp32
        back = torch.empty(S, D, dtype=torch.float32, device=self.device)
        dist.all_to_all_single(back, y.contiguous(), send, recv)
        others = sum(n for j, n in enumerate(send) if j != self.rank)
        self.bytes_sent += others * rows.shape[1] + \
            sum(n for j, n in enumerate(recv) if j != self.rank) * D * 4
        return back
