"""`LLM`: the engine's public facade in vLLM's vocabulary (generate, chat, generate_stream, stats).

Owns: building the model (a preset with seeded weights, or a checkpoint directory), sizing the
cache from the memory budget, planning a prompt list with `batchv4.packing`, and the step loop
(schedule -> run -> sample -> finish). Does not own: the network (`batchv4.model`), bookkeeping
(`cache_manager`, `scheduler`), or sampling rules (`sampler`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from batchv4.config import PRESET_NAMES, ModelConfig
from batchv4.engine.cache_manager import CacheManager, NoSpace
from batchv4.engine.detokenizer import IncrementalDetokenizer
from batchv4.engine.outputs import CompletionOutput, RequestOutput
from batchv4.engine.runner import ModelRunner, NoMathRunner, size_cache
from batchv4.engine.sampler import RowState, Sampler
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, Scheduler, Sequence
from batchv4.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16}


def parse_bytes(v: int | str) -> int:
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", str(v), re.I)
    if not m:
        raise UserError(f"kv_cache_memory: cannot read {v!r} as a size (e.g. 512MiB, 8GiB)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(m.group(1)) * mult)


@dataclass
class EngineStats:
    prefill_tokens: int = 0          # prompt tokens actually computed, recomputes included
    decode_tokens: int = 0
    cached_prompt_tokens: int = 0    # served from snapshots
    preemptions: int = 0
    snapshot_evictions: int = 0
    steps: int = 0
    forward_seconds: float = 0.0
    peak_pages: int = 0
    peak_slots: int = 0
    peak_snapshots: int = 0
    peak_snapshot_bytes: int = 0
    page_bytes_per_token: float = 0.0
    bytes_per_snapshot: int = 0


class LLM:
    def __init__(self, model: str = "tiny", dtype: str | torch.dtype = "auto", device: str = "cpu",
                 kv_cache_memory: int | str = "512MiB", max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, max_snapshots: int = 64, seed: int = 0, page_size: int = 8,
                 max_model_len: int | None = None, layers: list[int] | None = None,
                 use_kernels: bool | None = None, dry_run: bool = False, kv_cache_dtype: str = "auto") -> None:
        """`page_size` is in compressed entries per page (8 = 32 tokens of a CSA layer): small pages
        keep short sequences' partly filled pages small (see benchmarks/RESULTS.md, cache memory).
        `dry_run` builds the model on the meta device and runs the scheduler and cache manager
        with a runner that does no math (bookkeeping at real geometries on any machine).
        `kv_cache_dtype="fp8"` stores compressed entries as FP8 (584 B each for V4 in bf16) and
        indexer keys as FP4 (68 B), and runs the reference's FP8/FP4 activation simulation, whose
        values those formats hold exactly; "auto" keeps them in the model's dtype. FP8 runs on the
        torch attention path (the Triton attention kernels read the native layout)."""
        if kv_cache_dtype not in ("auto", "fp8"):
            raise UserError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
        from batchv4.model.model import Transformer

        if max_num_batched_tokens < 1:
            raise UserError("max_num_batched_tokens must be >= 1")
        if max_num_seqs < 1:
            raise UserError("max_num_seqs must be >= 1")
        self.device = torch.device(device)
        self.cfg = ModelConfig.load(model)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.seed = seed
        if dry_run:
            with torch.device("meta"):
                self.model = Transformer(self.cfg, layers)
        elif model in PRESET_NAMES:
            self.model = Transformer(self.cfg, layers).init_random(seed).to(self.device, self.dtype)
        else:
            from batchv4.model.checkpoint import load_checkpoint

            with torch.device("meta"):
                self.model = Transformer(self.cfg, layers)
            load_checkpoint(self.model, model, layers=layers, dtype=self.dtype, device=str(self.device))
        self.model.eval()
        fp8 = kv_cache_dtype == "fp8"
        if not dry_run:
            kernels = self.device.type == "cuda" and not fp8 if use_kernels is None else use_kernels
            if kernels and fp8:
                raise UserError("kv_cache_dtype='fp8' runs without the Triton attention kernels: "
                                 "pass use_kernels=False")
            self.model.set_kernels(kernels)
            self.model.set_activation_sim(fp8)
        from batchv4.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model if os.path.isdir(model) else None)
        self.layout = self.model.cache_layout(self.dtype, page_size, kv_format="fp8" if fp8 else "native")
        slots, pages = size_cache(self.layout, parse_bytes(kv_cache_memory), max_num_seqs, max_snapshots)
        self.cache = CacheManager(self.layout.ratios, page_size, pages, slots)
        self.runner = NoMathRunner(self.cfg.vocab_size) if dry_run else \
            ModelRunner(self.model, self.layout, slots, pages, self.device)
        self.max_model_len = max_model_len or self.cfg.max_position_embeddings
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens, max_num_seqs, self.max_model_len)
        self.sampler = Sampler(seed)
        self._stats = EngineStats(page_bytes_per_token=self.layout.bytes_per_token(),
                                  bytes_per_snapshot=self.layout.bytes_per_snapshot())
        self._next_seq = 0
        self._plans = 0

    # ---- public API -------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_plan: bool = True) -> list[RequestOutput]:
        """Prompts (strings or {"prompt_token_ids": [...]}) -> one RequestOutput each, in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        ids = [self._prompt_ids(p) for p in prompts]
        return self._run_list(ids, sampling_params, [False] * len(ids), use_plan)

    def chat(self, conversations, sampling_params=None, thinking: bool = False,
             use_plan: bool = True) -> list[RequestOutput]:
        """Conversations (lists of {"role", "content"}) with the V4 chat encoding."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = self.tokenizer.chat_token_ids(list(conversations), thinking)
        return self._run_list(ids, sampling_params, [thinking] * len(ids), use_plan)

    def generate_stream(self, requests: Iterable[EngineRequest]) -> Iterator[RequestOutput]:
        """Pre-packed requests (caller-supplied ids and plan hints) -> outputs as they finish."""
        it = iter(requests)
        pending: dict[str, list[Sequence]] = {}
        exhausted = False
        lookahead = 2 * self.scheduler.max_num_seqs
        while True:
            while not exhausted and len(self.scheduler.waiting) < lookahead:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[req.request_id] = []
                err = self._check_request(req)
                if err:
                    yield RequestOutput.error(req.request_id, list(req.prompt_token_ids), err, n=req.params.n)
                    del pending[req.request_id]
                    continue
                seq = self._new_seq(req, 0)
                pending[req.request_id].append(seq)
                self.scheduler.add(seq)
            if not self.scheduler.has_work():
                if exhausted:
                    break
                continue
            yield from self._step(pending)
        # a stream is one plan: its snapshots mean nothing to the next one
        self.cache.drop_all_snapshots()

    def stats(self) -> dict:
        s = self._stats
        s.prefill_tokens = self.scheduler.prefill_tokens
        s.decode_tokens = self.scheduler.decode_tokens
        s.cached_prompt_tokens = self.scheduler.cached_tokens
        s.preemptions = self.scheduler.preemptions
        s.snapshot_evictions = self.cache.evictions
        s.forward_seconds = self.runner.forward_seconds
        d = dict(s.__dict__)
        d["pages_in_use"] = {r: p.num_used for r, p in self.cache.pages.items()}
        d["snapshots_held"] = len(self.cache.snapshots)
        return d

    # ---- internals --------------------------------------------------------------------------------
    def _prompt_ids(self, p) -> list[int]:
        if isinstance(p, str):
            return self.tokenizer.encode(p)
        if isinstance(p, dict) and "prompt_token_ids" in p:
            return [int(t) for t in p["prompt_token_ids"]]
        if isinstance(p, dict) and "prompt" in p:
            return self.tokenizer.encode(p["prompt"])
        raise UserError("a prompt is a string or a dict with 'prompt_token_ids'")

    def _run_list(self, ids: list[list[int]], params, thinking: list[bool], use_plan: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(ids)
        if len(plist) != len(ids):
            raise UserError("sampling_params: one per prompt, or a single one for all")
        reqs = list(self.plan_requests([str(i) for i in range(len(ids))], ids, plist, thinking, use_plan))
        out = {o.request_id: o for o in self.generate_stream(reqs)}
        return [out[str(i)] for i in range(len(ids))]

    def plan_requests(self, keys: list[str], ids: list[list[int]], params: list[SamplingParams],
                      thinking: list[bool], use_plan: bool = True) -> Iterator[EngineRequest]:
        """EngineRequests in the packing plan's order (or input order without a plan)."""
        by_key = {k: i for i, k in enumerate(keys)}
        if not use_plan:
            for i, k in enumerate(keys):
                yield EngineRequest(k, ids[i], params[i], thinking=thinking[i])
            return
        from batchv4.packing import PackInput, plan

        ok = [i for i, t in enumerate(ids) if t]
        for i, t in enumerate(ids):
            if not t:
                yield EngineRequest(keys[i], [], params[i], thinking=thinking[i])
        self._plans += 1
        tag = self._plans
        for pr in plan(PackInput(keys[i], ids[i]) for i in ok):
            i = by_key[pr.key]
            yield EngineRequest.from_plan(pr, params[i], thinking[i], namespace=tag)

    def _check_request(self, req: EngineRequest) -> str | None:
        V = self.cfg.vocab_size
        bad = [t for t in req.prompt_token_ids if not 0 <= t < V]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary (0..{V - 1})"
        if not req.prompt_token_ids:
            return "empty prompt"
        return None

    def _new_seq(self, req: EngineRequest, sample_index: int) -> Sequence:
        self._next_seq += 1
        seq = Sequence(self._next_seq, req, sample_index, list(req.prompt_token_ids), len(req.prompt_token_ids))
        seq.detok = IncrementalDetokenizer(self.tokenizer, req.params, self.tokenizer.eos_id)
        return seq

    def _step(self, pending: dict[str, list[Sequence]]) -> Iterator[RequestOutput]:
        sch = self.scheduler
        plan = sch.schedule()
        self._stats.steps += 1
        for seq, msg in plan.errors:
            rid = seq.request.request_id
            pending.pop(rid, None)
            yield RequestOutput.error(rid, seq.tokens[:seq.num_prompt], msg, n=seq.request.params.n)
        logits = self.runner.execute(plan, self.cache)
        for seq, lg in plan.ready:
            logits[seq.seq_id] = lg
        self._track_peaks()
        todo = [s for s in [c.seq for c in plan.chunks] + [s for s, _ in plan.ready]
                if s.seq_id in logits and s.num_computed == len(s.tokens)]
        if not todo:
            return
        forks = []
        for s in todo:
            p = s.request.params
            if p.n > 1 and s.sample_index == 0 and s.num_generated == 0:
                forks.append(s)
        rows = [RowState(s.request.params, s.request.request_id, s.sample_index, s.num_generated,
                         s.tokens[:s.num_prompt], s.tokens[s.num_prompt:]) for s in todo]
        stacked = _stack_rows([logits[s.seq_id] for s in todo])
        results = self.sampler.sample(stacked, rows)
        for s, res in zip(todo, results):
            self._append(s, res)
        for s in forks:
            self._fork_samples(s, logits[s.seq_id], pending)
        done = []
        for s in todo:
            if s.finish_reason is not None:
                sch.finish(s)
                done.append(s)
        for s in done + forks:
            out = self._maybe_output(s, pending)
            if out is not None:
                yield out

    def _append(self, s: Sequence, res) -> None:
        s.tokens.append(res.token_id)
        if s.request.params.logprobs is not None:
            s.out_logprobs.append(res.top_logprobs)
        stop = s.detok.append(res.token_id)
        if stop is not None:
            s.finish_reason, s.stop_reason = stop.finish_reason, stop.stop_reason

    def _fork_samples(self, s: Sequence, lg: torch.Tensor, pending) -> None:
        """n > 1: samples 1..n-1 share the prompt's cache of sample 0 and sample from its logits."""
        req = s.request
        for k in range(1, req.params.n):
            child = self._new_seq(req, k)
            child.forked_from = s.seq_id
            pending[req.request_id].append(child)
            try:
                src, dst, copies = self.cache.fork(s.seq_id, child.seq_id, s.num_prompt)
            except NoSpace:
                self.scheduler.add(child)          # no room to share: it recomputes its prompt
                continue
            self.runner.pools.copy_slot(src, dst)
            for r, a, b in copies:
                self.runner.pools.copy_page(r, a, b)
            child.num_computed = child.num_cached = s.num_prompt
            child.num_cached = s.num_cached
            child.status = "running"
            self.scheduler.running.append(child)
            res = self.sampler.sample(lg[None].float(), [RowState(req.params, req.request_id, k, 0,
                                                                  child.tokens[:child.num_prompt], [])])[0]
            self._append(child, res)
            if child.finish_reason is not None:
                self.scheduler.finish(child)

    def _maybe_output(self, s: Sequence, pending) -> RequestOutput | None:
        rid = s.request.request_id
        seqs = pending.get(rid)
        if seqs is None or len(seqs) < s.request.params.n or any(x.finish_reason is None for x in seqs):
            return None
        del pending[rid]
        outs = []
        for x in sorted(seqs, key=lambda q: q.sample_index):
            text, reasoning, n_reason = x.detok.text, None, 0
            if x.request.thinking:
                from batchv4.tokenizer import count_reasoning_tokens, split_reasoning

                reasoning, text = split_reasoning(text, True)
                n_reason = count_reasoning_tokens(x.tokens[x.num_prompt:], self.tokenizer.think_end_id)
            outs.append(CompletionOutput(
                index=x.sample_index, text=text, token_ids=x.tokens[x.num_prompt:], finish_reason=x.finish_reason,
                error=None, reasoning_text=reasoning, num_reasoning_tokens=n_reason,
                logprobs=x.out_logprobs if x.request.params.logprobs is not None else None,
                cumulative_logprob=None, stop_reason=x.stop_reason))
        first = min(seqs, key=lambda q: q.sample_index)
        return RequestOutput(request_id=rid, prompt_token_ids=first.tokens[:first.num_prompt],
                             num_cached_tokens=first.num_cached, outputs=outs)

    def _track_peaks(self) -> None:
        s = self._stats
        s.peak_pages = max(s.peak_pages, sum(p.num_used for p in self.cache.pages.values()))
        s.peak_slots = max(s.peak_slots, self.cache.slots.num_used)
        n = len(self.cache.snapshots)
        s.peak_snapshots = max(s.peak_snapshots, n)
        snap_bytes = n * self.layout.bytes_per_snapshot()
        s.peak_snapshot_bytes = max(s.peak_snapshot_bytes, snap_bytes)


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Logit rows [V] -> [B, V] fp32. When they are, in order, all the rows of one contiguous
    tensor (the usual decode step: every sequence's logits from one forward), that tensor is
    used as it is instead of copying B x V floats."""
    base = rows[0]._base
    if (base is not None and base.dim() == 2 and base.shape[0] == len(rows) and base.is_contiguous()
            and all(r._base is base and r.storage_offset() == base.storage_offset() + i * base.shape[1]
                    for i, r in enumerate(rows))):
        return base.float()
    return torch.stack(rows).float()
