"""The configuration of a `run` job: its options, the checks that need no input, and its fingerprint.

Owns: `RunConfig` (the row options of `batchv4.pipelines.frontend.RowOptions` plus output, engine
and cost options), `check_options` (everything that can fail before the input is opened) and the
fingerprint that decides whether an output folder may be resumed. Does not own: reading rows, the
folder itself (`batchv4.io.outdir`) or the job's flow (`pipelines.run`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from batchv4.errors import UserError
from batchv4.pipelines.frontend import PLAIN_TEMPERATURE, RowOptions


@dataclass(frozen=True)
class RunConfig(RowOptions):
    output: str = ""
    kv_cache_memory: str = "512MiB"
    kv_cache_dtype: str = "auto"
    max_batched_tokens: int = 2048
    max_num_seqs: int = 64
    price: str = "deepseek-v4-flash"
    prices_file: str | None = None
    overwrite: bool = False
    quiet: bool = False
    part_rows: int = 512
    device: str = "auto"
    # several ranks (batchv4.engine.distributed): attention data-parallel, experts expert-parallel
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # --backend openai: a remote OpenAI-compatible API (see batchv4.remote)
    base_urls: tuple[str, ...] = ()
    api_key_env: str | None = None     # the NAME of the environment variable holding the key
    provider: str = "auto"
    concurrency: int = 16
    max_retries: int = 8
    request_timeout: float = 600.0
    rpm: int | None = None
    tpm: int | None = None
    max_cost_usd: float | None = None
    when: str = "now"
    # --executor ray (pipelines.ray_executor): engine replicas as Ray actors, prefix-affine
    executor: str = "local"
    ray_address: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 0.5
    gpus_per_replica: float = 0.0

    def fingerprint(self) -> str:
        """What decides a row's output columns: model, prompt building, thinking, sampling, the
        context limit, sharding, kept columns, the price card, an fp8 cache (it runs the
        activation simulation), and a remote backend with its endpoints. Not: the input's
        location, `--limit`, engine sizing, part size, pacing or the API key."""
        keys = ("model", "fmt", "prompt_column", "messages_column", "template", "system", "id_column",
                "keep_columns", "thinking", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "shard",
                "max_model_len", "price")
        # the fp8 cache runs the activation simulation: other numbers, so another configuration
        extra = {"kv_cache_dtype": self.kv_cache_dtype} if self.kv_cache_dtype != "auto" else {}
        d = {k: getattr(self, k) for k in keys} | extra
        d["stop"], d["keep_columns"] = list(self.stop), list(self.keep_columns)
        d["shard"] = list(self.shard) if self.shard else None
        for k in ("json_schema", "regex", "choice", "max_thinking_tokens"):     # only when set: earlier
            v = getattr(self, k)                                                # fingerprints stay
            if v not in (None, ()):
                d[k] = list(v) if isinstance(v, tuple) else v
        if self.backend != "local":     # earlier (local) fingerprints stay as they were
            from batchv4.io.urls import redact_url

            d["backend"] = self.backend
            d["base_urls"] = [redact_url(u) for u in self.base_urls]
        if d["temperature"] is None and self.fmt != "openai":
            # the default of prompt and messages rows, spelled as earlier versions recorded it
            d["temperature"] = PLAIN_TEMPERATURE
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        """The configuration as recorded in the manifest and summary (URLs redacted)."""
        from batchv4.io.urls import redact_url

        d = asdict(self)
        d.pop("storage_options")
        d["input"], d["output"] = redact_url(self.input), redact_url(self.output)
        return d


def check_options(cfg: RunConfig) -> None:
    """Everything that can be checked without reading the input (UserError naming the option)."""
    from batchv4.config import ModelConfig

    if not cfg.output:
        raise UserError("an output folder is required (-o OUT)")
    for name in ("n", "max_tokens", "part_rows", "max_batched_tokens", "max_num_seqs", "read_batch_rows",
                 "data_parallel_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    check_executor(cfg)
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {cfg.max_model_len}")
    if cfg.kv_cache_dtype not in ("auto", "fp8"):
        raise UserError(f"--kv-cache-dtype must be auto or fp8, got {cfg.kv_cache_dtype!r}")
    if cfg.limit is not None and cfg.limit < 0:
        raise UserError(f"--limit must be >= 0, got {cfg.limit}")
    if cfg.backend == "local":
        from batchv4.engine.llm import parse_bytes

        if cfg.base_urls:
            raise UserError("--base-url needs --backend openai")
        mc = ModelConfig.load(cfg.model)
        if cfg.enable_expert_parallel and cfg.data_parallel_size > mc.n_routed_experts:
            raise UserError(f"--data-parallel-size {cfg.data_parallel_size} with --enable-expert-parallel: "
                            f"the model has only {mc.n_routed_experts} routed experts")
        parse_bytes(cfg.kv_cache_memory)
        check_device(cfg.device)
        return
    if cfg.backend != "openai":
        raise UserError(f"--backend must be local or openai, got {cfg.backend!r}")
    if cfg.data_parallel_size != 1 or cfg.enable_expert_parallel:
        raise UserError("--data-parallel-size and --enable-expert-parallel are options of the local backend")
    from batchv4.remote.client import check_base_url, provider_of

    if not cfg.base_urls:
        raise UserError("--backend openai needs --base-url URL (e.g. https://api.deepseek.com/v1)")
    for u in cfg.base_urls:
        check_base_url(u)
        provider_of(u, cfg.provider)
    api_key(cfg)
    for name in ("concurrency", "rpm", "tpm"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if cfg.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {cfg.max_retries}")
    if cfg.max_cost_usd is not None and not cfg.max_cost_usd > 0:
        raise UserError(f"--max-cost-usd must be > 0, got {cfg.max_cost_usd}")
    if cfg.when not in ("now", "off-peak"):
        raise UserError(f"--when must be now or off-peak, got {cfg.when!r}")
    if cfg.tokenizer is not None and not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise UserError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json in that folder")


def check_executor(cfg: RunConfig) -> None:
    """The executor options (`--executor ray` needs the `batchv4[ray]` extra; Ray is not imported)."""
    if cfg.executor == "local":
        if cfg.replicas != 1 or cfg.ray_address:
            raise UserError("--replicas and --address need --executor ray")
        return
    if cfg.executor != "ray":
        raise UserError(f"--executor must be local or ray, got {cfg.executor!r}")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("--executor ray needs Ray: pip install 'batchv4[ray]'")
    if isinstance(cfg.replicas, bool) or not isinstance(cfg.replicas, int) or cfg.replicas < 1:
        raise UserError(f"--replicas must be an integer >= 1, got {cfg.replicas!r}")
    if not cfg.cpus_per_replica > 0:
        raise UserError(f"--cpus-per-replica must be > 0, got {cfg.cpus_per_replica}")
    if not cfg.gpus_per_replica >= 0:
        raise UserError(f"--gpus-per-replica must be >= 0, got {cfg.gpus_per_replica}")
    if cfg.gpus_per_replica > 1 and cfg.gpus_per_replica != int(cfg.gpus_per_replica):
        raise UserError(f"--gpus-per-replica above 1 must be a whole number, got {cfg.gpus_per_replica}")
    if cfg.backend != "local":
        raise UserError("--executor ray runs batchv4's own engine (--backend local)")
    if cfg.data_parallel_size != 1:
        raise UserError("with --executor ray a replica's GPUs are --gpus-per-replica, not --data-parallel-size")


def api_key(cfg: RunConfig) -> str | None:
    """The API key from the environment variable `--api-key-env` names (None without the option:
    no Authorization header is sent)."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise UserError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set or empty")
    return key.strip()


def check_device(device: str) -> None:
    """A device torch knows and this machine has; UserError otherwise."""
    if device in ("cpu", "auto"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device torch knows (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: batchv4 runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
