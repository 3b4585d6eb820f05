"""Token sampling: one step's logits for a batch of rows -> one token (and its logprobs) per row.

Owns: penalties, temperature, top-k / top-p / min-p filtering, greedy and seeded random choice,
and the logprobs returned with each token.
Does not own: stop conditions and text (detokenizer.py), which rows are in the batch and their
output ids (the scheduler passes them in `RowState`), or running the model.

Order of operations (vLLM's): repetition penalty over prompt + output tokens, frequency and
presence penalties over output tokens; greedy rows then take the argmax (ties -> lower token id);
random rows divide by the temperature and filter by top-k, then top-p, then min-p (the order of
vLLM v0 and HF; vLLM v1 applies min-p before top-k/top-p, which differs only when top-p and min-p
are both set). Top-k keeps every token tied with the k-th largest logit. Top-p keeps the smallest
set of most likely tokens (ties -> lower id first) whose probability reaches `top_p`.

Randomness: each row draws one uniform u from its own key (seed, request_id, sample_index, step),
where seed is the request's `seed` or the sampler's `default_seed`, and picks the token by inverse
CDF over the filtered probabilities in token-id order. So a row's token does not depend on the
other rows of the batch or their order, and a rerun reproduces it. u is taken straight from a
blake2b digest of the key rather than from a torch or numpy generator, whose streams may change
between versions and devices.

Logprobs are vLLM's default "raw" logprobs: log_softmax of the model's logits before penalties,
temperature and filtering; they describe the model, not the sampling rule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchv4.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowState:
    """One row of the batch: a sample of a request about to receive its token number `step`."""

    params: SamplingParams
    request_id: str
    sample_index: int
    step: int  # tokens generated so far by this sample
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    thinking: bool = False


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None  # raw logprob of token_id (None unless the row asked for logprobs)
    top_logprobs: dict[int, float] | None  # top params.logprobs tokens + token_id, best first
    error: str | None = None  # set (token_id -1) when the row's logits were not finite


def sampling_uniform(seed: int, request_id: str, sample_index: int, step: int) -> float:
    """The uniform in [0, 1) that a row with this key samples with."""
    key = json.dumps([seed, request_id, sample_index, step]).encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"batchv4.sample").digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Penalized logits [B, V] fp32; `logits` itself is returned untouched when no row has any."""
    todo = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not todo:
        return logits
    out = logits.clone()
    vocab = logits.shape[1]
    for i in todo:
        p, row = rows[i].params, out[i]
        output_ids = _ids_tensor(rows[i].output_token_ids, vocab, rows[i].request_id, logits.device)
        if p.repetition_penalty != 1.0:
            prompt_ids = _ids_tensor(rows[i].prompt_token_ids, vocab, rows[i].request_id, logits.device)
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[prompt_ids] = True
            seen[output_ids] = True
            scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(seen, scaled, row)
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and output_ids.numel():
            counts = torch.bincount(output_ids, minlength=vocab).to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        out[i] = row
    return out


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p: [R, V] fp32 logits -> [R, V] fp32, -inf = removed.

    Every row must have a finite maximum and a temperature above the greedy threshold.
    """
    vocab = logits.shape[1]
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    x = logits / temps[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    use_k = any(k < vocab for k in top_k)
    use_p = any(p != float("inf") for p in top_p)
    if use_k and not use_p:
        # Top-k alone needs only the k-th largest value, not a full sort.
        k_max = max(k for k in top_k if k < vocab)
        kth_index = torch.tensor([k - 1 if k < vocab else 0 for k in top_k], device=dev)[:, None]
        kth = torch.topk(x, k_max, dim=-1).values.gather(1, kth_index)
        off = torch.tensor([k == vocab for k in top_k], device=dev)[:, None]
        x = x.masked_fill((x < kth) & ~off, float("-inf"))
    elif use_p:
        # Stable descending sort: among equal logits the lower token id comes first.
        sorted_x, sorted_ids = torch.sort(x, dim=-1, descending=True, stable=True)
        keep = torch.ones_like(sorted_x, dtype=torch.bool)
        if use_k:
            kth = sorted_x.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
            keep &= sorted_x >= kth
        if use_p:
            probs = torch.softmax(sorted_x.double().masked_fill(~keep, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # The first token always stays: its mass_before is 0 < top_p.
            keep &= mass_before < torch.tensor(top_p, dtype=torch.float64, device=dev)[:, None]
        keep_by_id = torch.empty_like(keep).scatter_(1, sorted_ids, keep)
        x = x.masked_fill(~keep_by_id, float("-inf"))
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = torch.softmax(x.double(), dim=-1)
        floor = torch.tensor(min_p, dtype=torch.float64, device=dev)[:, None] * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row the first token whose cumulative probability exceeds u * total.

    probs [R, V] fp64 (unnormalized is fine), u [R] fp64 in [0, 1) -> token ids [R] int64.
    A token of zero probability is never chosen.
    """
    cdf = probs.cumsum(dim=-1)
    target = u * cdf[:, -1]
    idx = torch.searchsorted(cdf, target[:, None].contiguous(), right=True).squeeze(1)
    # u * total can round up to total; fall back to the last token with probability.
    vocab = probs.shape[1]
    last_positive = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.where(idx >= vocab, last_positive, idx)


class Sampler:
    """Samples one token per row; see the module docstring for the rules.

    `max_rows_per_chunk` bounds the memory of random sampling (a few [rows, V] fp64 buffers);
    results do not depend on it.
    """

    def __init__(self, default_seed: int, max_rows_per_chunk: int = 64) -> None:
        if isinstance(default_seed, bool) or not isinstance(default_seed, int):
            raise ValueError(f"default_seed must be an integer, got {default_seed!r}")
        if max_rows_per_chunk < 1:
            raise ValueError(f"max_rows_per_chunk must be >= 1, got {max_rows_per_chunk}")
        self.default_seed = default_seed
        self.max_rows_per_chunk = max_rows_per_chunk

    def processed_logits(self, logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
        """[B, V] fp32: what each row samples from (greedy rows: after penalties only)."""
        logits = _check_logits(logits, rows)
        x = apply_penalties(logits, rows)
        rand = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if rand:
            x = x.clone() if x is logits else x
            x[rand] = filter_logits(x[rand], [rows[i].params for i in rand])
        return x

    def sample(self, logits: torch.Tensor, rows: Sequence[RowState], row_errors: bool = False) -> list[SampleResult]:
        """logits [B, V] fp32 (row i belongs to rows[i]) -> one SampleResult per row. Logits with
        NaN or +inf (or only -inf) raise ValueError, or with `row_errors` fail only their row: its
        result has `error` set, and the other rows are sampled as if it were not there."""
        logits, best, bad = _check_logits(logits, rows, with_argmax=True, row_errors=row_errors)
        if bad:
            logits = logits.clone()
            logits[bad] = 0.0                 # any finite row: its result is replaced below
            best[bad] = 0
        penalized = apply_penalties(logits, rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
        rand = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if greedy:
            # the first maximal index, i.e. the lower token id on ties (torch.max and argmax agree)
            tokens[greedy] = best[greedy] if penalized is logits else penalized[greedy].argmax(dim=-1)
        for start in range(0, len(rand), self.max_rows_per_chunk):
            chunk = rand[start : start + self.max_rows_per_chunk]
            filtered = filter_logits(penalized[chunk], [rows[i].params for i in chunk])
            probs = torch.softmax(filtered.double(), dim=-1)
            u = torch.tensor([self._uniform(rows[i]) for i in chunk], dtype=torch.float64, device=logits.device)
            tokens[chunk] = inverse_cdf(probs, u)
        token_list = tokens.tolist()
        results = [SampleResult(t, None, None) for t in token_list]
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            log_norm = torch.logsumexp(logits[want], dim=-1)  # [W]
            chosen = (logits[want].gather(1, tokens[want][:, None]).squeeze(1) - log_norm).tolist()
            for j, i in enumerate(want):
                top = _top_logprobs(logits[i], log_norm[j], rows[i].params.logprobs)
                top.setdefault(token_list[i], chosen[j])
                results[i] = SampleResult(token_list[i], chosen[j], top)
        for i in bad:
            results[i] = SampleResult(-1, None, None, "the model's logits were not finite (NaN or inf)")
        return results

    def _uniform(self, row: RowState) -> float:
        seed = row.params.seed if row.params.seed is not None else self.default_seed
        return sampling_uniform(seed, row.request_id, row.sample_index, row.step)


def _check_logits(logits: torch.Tensor, rows: Sequence[RowState], with_argmax: bool = False,
                  row_errors: bool = False):
    """logits as fp32, after checking shape and values; with `with_argmax`, also each row's first
    maximal index (one pass does both) and, with `row_errors`, the rows that are not finite
    instead of an error."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape [batch, vocab]")
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits have {logits.shape[0]} rows but {len(rows)} row states were given")
    logits = logits.float()
    # max propagates NaN, so one reduction catches NaN, +inf and all -inf rows.
    top = logits.max(dim=-1)
    bad = (~torch.isfinite(top.values)).nonzero().flatten().tolist()
    if bad and not row_errors:
        ids = ", ".join(rows[i].request_id for i in bad[:5])
        raise ValueError(f"logits contain NaN or +inf, or only -inf, for requests {ids}")
    if with_argmax:
        return logits, top.indices, bad
    return logits


def _ids_tensor(ids: Sequence[int], vocab: int, request_id: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"request {request_id}: token ids must be in [0, {vocab}), got one out of range")
    return t


def _top_logprobs(row: torch.Tensor, log_norm: torch.Tensor, k: int) -> dict[int, float]:
    """The k best tokens of one row [V] with raw logprobs, best first; ties -> lower id."""
    if k == 0:
        return {}
    k = min(k, row.shape[0])
    kth = torch.topk(row, k).values[-1]
    above = (row > kth).nonzero().flatten()
    tied = (row == kth).nonzero().flatten()[: k - above.numel()]
    ids = torch.cat([above, tied]).sort().values
    values = row[ids] - log_norm
    order = torch.sort(values, descending=True, stable=True).indices
    return dict(zip(ids[order].tolist(), values[order].tolist()))
