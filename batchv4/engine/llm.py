"""`LLM`: the engine's public facade in vLLM's vocabulary (generate, chat, generate_stream, stats).

Owns: building the engine (the model: a preset with seeded weights or a checkpoint directory; the
cache sized from the memory budget; scheduler, runner, sampler), planning a prompt list with
`batchv4.packing`, and the step loop `schedule() -> execute() -> update()`. It implements the
backend protocol (`batchv4.engine.backend`). Does not own: the network (`batchv4.model`),
bookkeeping (`cache_manager`, `scheduler`), tensors and sampling (`runner`, `sampler`), or the
shape of outputs (`outputs`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from batchv4.config import PRESET_NAMES, ModelConfig
from batchv4.engine.cache_manager import CacheManager
from batchv4.engine.detokenizer import IncrementalDetokenizer
from batchv4.engine.outputs import RequestOutput, request_output
from batchv4.engine.runner import ModelRunner, NoMathRunner, size_cache
from batchv4.engine.sampler import Sampler
from batchv4.engine.sampling_params import SamplingParams
from batchv4.engine.scheduler import EngineRequest, FinishedRequest, Scheduler
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


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is CUDA when a device is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    def __new__(cls, *args, data_parallel_size: int = 1, **kwargs):
        # vLLM's spelling: LLM(..., data_parallel_size=N) is a rank group of N engines
        if cls is LLM and data_parallel_size != 1:
            from batchv4.engine.distributed.launcher import RankGroup

            return super().__new__(RankGroup)
        return super().__new__(cls)

    def __init__(self, model: str = "tiny", dtype: str | torch.dtype = "auto", device: str = "auto",
                 kv_cache_memory: int | str = "512MiB", max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, max_snapshots: int = 64, seed: int = 0, page_size: int = 8,
                 max_model_len: int | None = None, layers: list[int] | None = None,
                 use_kernels: bool | None = None, dry_run: bool = False, kv_cache_dtype: str = "auto",
                 data_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 expert_shard: tuple[int, int] | None = None, quantized_weights: str = "auto") -> None:
        """`page_size` is in compressed entries per page (8 = 32 tokens of a CSA layer): small pages
        keep short sequences' partly filled pages small (see benchmarks/RESULTS.md, cache memory).
        `dry_run` builds the model on the meta device and runs the scheduler and cache manager
        with a runner that does no math (bookkeeping at real geometries on any machine).
        `kv_cache_dtype="fp8"` stores compressed entries as FP8 (584 B each for V4 in bf16) and
        indexer keys as FP4 (68 B), and runs the reference's FP8/FP4 activation simulation, whose
        values those formats hold exactly; "auto" keeps them in the model's dtype. FP8 runs on the
        torch attention path (the Triton attention kernels read the native layout).
        `data_parallel_size=N` (N > 1) makes this a `RankGroup` of N ranks
        (`batchv4.engine.distributed`), with `enable_expert_parallel` sharding the routed experts
        over them. `expert_shard=(rank, world)` builds (and loads) only that rank's block of routed
        experts; the rank group passes it, and the engine then needs an expert exchange.
        `quantized_weights`: "resident" keeps a checkpoint's FP8 and FP4 weights in their quantized
        form with their scales (what the FP8 GEMM and fused MoE kernels read; the torch path
        dequantizes one weight at a time as it runs), "dequantize" converts them to `dtype` at load
        (more memory, no per-step conversion), "auto" (default) is resident where the kernels run
        (CUDA) and dequantized elsewhere."""
        if quantized_weights not in ("auto", "resident", "dequantize"):
            raise UserError(f"quantized_weights must be 'auto', 'resident' or 'dequantize', got {quantized_weights!r}")
        if kv_cache_dtype not in ("auto", "fp8"):
            raise UserError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
        from batchv4.model.model import Transformer

        if max_num_batched_tokens < 1:
            raise UserError("max_num_batched_tokens must be >= 1")
        if max_num_seqs < 1:
            raise UserError("max_num_seqs must be >= 1")
        self.device = resolve_device(device)
        self.cfg = ModelConfig.load(model)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.seed = seed
        fp8 = kv_cache_dtype == "fp8"
        kernels = False
        if not dry_run:
            kernels = self.device.type == "cuda" and not fp8 if use_kernels is None else use_kernels
            if kernels and fp8:
                raise UserError("kv_cache_dtype='fp8' runs without the Triton attention kernels: "
                                 "pass use_kernels=False")
        build = dict(use_kernels=kernels, activation_sim=fp8 and not dry_run, expert_shard=expert_shard)
        if dry_run:
            with torch.device("meta"):
                self.model = Transformer(self.cfg, layers, **build)
        elif model in PRESET_NAMES:
            self.model = Transformer.random(self.cfg, seed, layers, dtype=self.dtype, device=self.device, **build)
        else:
            from batchv4.model.checkpoint import load_checkpoint

            with torch.device("meta"):
                self.model = Transformer(self.cfg, layers, **build)
            self.load_report = load_checkpoint(self.model, model, layers=layers, dtype=self.dtype,
                                               device=str(self.device), expert_shard=expert_shard,
                                               keep_quantized=quantized_weights == "resident" or
                                               (quantized_weights == "auto" and kernels))
        self.model.eval()
        from batchv4.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model if os.path.isdir(model) else None)
        self.layout = self.model.cache_layout(self.dtype, page_size, kv_format="fp8" if fp8 else "native")
        slots, pages = size_cache(self.layout, parse_bytes(kv_cache_memory), max_num_seqs, max_snapshots)
        self.cache = CacheManager(self.layout.ratios, page_size, pages, slots)
        self.sampler = Sampler(seed)
        self.runner = NoMathRunner(self.cfg.vocab_size, self.sampler) if dry_run else \
            ModelRunner(self.model, self.layout, slots, pages, self.device, self.sampler)
        self.max_model_len = max_model_len or self.cfg.max_position_embeddings
        eos = self.tokenizer.eos_id
        from batchv4.structured.processor import StructuredProcessor

        # grammar masks and thinking budgets: applied by the runner, advanced by the scheduler's update
        self.structured = StructuredProcessor(self.tokenizer, self.cfg.vocab_size)
        self.runner.logits_processors.append(self.structured)
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens, max_num_seqs, self.max_model_len,
                                   make_detok=lambda params: IncrementalDetokenizer(self.tokenizer, params, eos),
                                   observers=[self.structured])
        self._stats = EngineStats(page_bytes_per_token=self.layout.bytes_per_token(),
                                  bytes_per_snapshot=self.layout.bytes_per_snapshot())
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
        """Pre-packed requests (caller-supplied ids and plan hints) -> outputs as they finish. A
        consumer that stops early (or raises) leaves no sequence, page or snapshot held."""
        it = iter(requests)
        exhausted = False
        lookahead = 2 * self.scheduler.max_num_seqs
        try:
            while True:
                while not exhausted and len(self.scheduler.waiting) < lookahead:
                    try:
                        req = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    err = self.check_request(req)
                    if err:
                        yield RequestOutput.error(req.request_id, list(req.prompt_token_ids), err, n=req.params.n)
                        continue
                    self.scheduler.add_request(req)
                if not self.scheduler.has_work():
                    if exhausted:
                        break
                    continue
                yield from self.step()
        finally:
            # a stream is one plan: its snapshots mean nothing to the next one; a stream that
            # stopped early also leaves its unfinished requests
            self.scheduler.abort_all()
            self.runner.kept_logits.clear()

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> execute -> update; the requests it finished."""
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        finished = self.scheduler.update(plan, result)
        self._stats.steps += 1
        self._track_peaks()
        return [self._output(fr) for fr in finished]

    def _output(self, fr: FinishedRequest) -> RequestOutput:
        req = fr.request
        first = fr.seqs[0] if fr.seqs else None
        cached = first.num_cached if first is not None else 0
        return request_output(req.request_id, req.prompt_token_ids, fr.seqs, req.thinking,
                              self.tokenizer.think_end_id, cached, fr.error, n=req.params.n)

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

    def check_request(self, req: EngineRequest) -> str | None:
        """Why the engine cannot take `req` (token ids outside the vocabulary, an empty prompt), or None."""
        V = self.cfg.vocab_size
        bad = [t for t in req.prompt_token_ids if not 0 <= t < V]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary (0..{V - 1})"
        if not req.prompt_token_ids:
            return "empty prompt"
        p = req.params.structured_outputs
        if p is not None:
            from batchv4.structured.grammars import GrammarError, compiler_for

            try:
                compiler_for(self.tokenizer, self.cfg.vocab_size).grammar(p)
            except GrammarError as e:
                return f"cannot compile the {p.kind} constraint: {e}"
        return None

    def _track_peaks(self) -> None:
        s = self._stats
        s.peak_pages = max(s.peak_pages, sum(p.num_used for p in self.cache.pages.values()))
        s.peak_slots = max(s.peak_slots, self.cache.slots.num_used)
        n = len(self.cache.snapshots)
        s.peak_snapshots = max(s.peak_snapshots, n)
        snap_bytes = n * self.layout.bytes_per_snapshot()
        s.peak_snapshot_bytes = max(s.peak_snapshot_bytes, snap_bytes)

