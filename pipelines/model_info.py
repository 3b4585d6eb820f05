"""`batchv4 model-info NAME_OR_PATH`: parameter counts, checkpoint size and KV-cache bytes of a
DeepSeek-V4 model, as a table or as JSON; with `--gpus N --gpu-memory SIZE`, the capacity plan of N
GPUs (experts expert-parallel, the rest replicated): weights per GPU, reserves, the cache left, and
the tokens and sequences it holds. A model that does not fit is a result, not an error (exit 0;
JSON has a top-level boolean `fits`).

Owns: option parsing and formatting. Does not own: the arithmetic (`batchv4.model.info`).
"""

from __future__ import annotations

import json

import click

from batchv4.config import ConfigError, ModelConfig


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f} B"


def _bytes(n: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:,.2f} {unit}"
    return f"{n:,.0f} B"


def _table(info) -> str:
    lay = info.layers
    rows = [
        f"{info.name}: {sum(lay[k] for k in ('window', 'csa', 'hca'))} layers "
        f"({lay['window']} window-only, {lay['csa']} CSA, {lay['hca']} HCA), MTP blocks: {lay['mtp']}",
        "",
        f"{'':28}{'main':>16}{'MTP':>16}",
        f"{'parameters':28}{_b(info.main.params):>16}{_b(info.mtp.params):>16}",
        f"{'active per token':28}{_b(info.main.active_params):>16}{_b(info.mtp.active_params):>16}",
        f"{'checkpoint tensors':28}{info.main.tensors:>16,}{info.mtp.tensors:>16,}",
        f"{'checkpoint size':28}{_bytes(info.main.checkpoint_bytes):>16}{_bytes(info.mtp.checkpoint_bytes):>16}",
    ]
    if info.on_disk:
        rows.append(f"{'on disk (all shards)':28}{info.on_disk['tensors']:>16,}{_bytes(info.on_disk['bytes']):>16}")
    kv = info.kv
    rows += [
        "",
        f"KV cache, production layout ({kv.entry_bytes} B per compressed entry, "
        f"{kv.indexer_key_bytes} B per FP4 indexer key):",
        f"  {'per token':40}{kv.bytes_per_token:>14,.1f} B",
        f"  {f'at {kv.context:,} tokens':40}{_bytes(kv.total_bytes):>16}",
        f"  {'window per sequence':40}{_bytes(kv.window_bytes):>16}",
        f"  {'compressor pending per sequence (fp32)':40}{_bytes(kv.pending_bytes):>16}",
    ]
    return "\n".join(rows)


@click.command("model-info")
@click.argument("name_or_path")
@click.option("--context", type=click.IntRange(min=0), default=1 << 20, show_default=True,
              help="Context length (tokens) for the KV-cache total.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Plan for this many GPUs (one rank each, experts sharded).  [default: no plan]")
@click.option("--gpu-memory", default="141GiB", show_default=True,
              help="Memory per GPU for the plan (binary units: 141GiB; or a byte count).")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="Cache layout for the plan: auto = bf16 entries; fp8 = the production layout.")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens per step the activation reserve is sized for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_info(name_or_path: str, context: int, gpus: int | None, gpu_memory: str, kv_cache_dtype: str,
               max_batched_tokens: int, as_json: bool) -> None:
    """Parameters, active parameters, checkpoint tensors and KV-cache bytes of a model
    (a preset name, a checkpoint directory, or a config file); with --gpus, whether it fits."""
    try:
        cfg = ModelConfig.load(name_or_path)
    except ConfigError as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    from batchv4.engine.llm import parse_bytes
    from batchv4.errors import UserError
    from batchv4.model.info import capacity_plan, model_info as compute  # imports torch

    info = compute(cfg, context=context, path=name_or_path)
    for diff in info.cross_check[:5]:
        click.echo(f"warning: model and checkpoint inventory disagree: {diff}", err=True)
    plan = None
    if gpus is not None:
        try:
            plan = capacity_plan(cfg, gpus, parse_bytes(gpu_memory), context, kv_cache_dtype, max_batched_tokens)
        except (UserError, ValueError) as e:
            raise click.ClickException(f"--gpu-memory/--gpus: {e}") from None
    if as_json:
        d = info.to_dict()
        if plan is not None:
            d["capacity"] = plan.to_dict()
            d["fits"] = plan.fits
        click.echo(json.dumps(d, indent=1))
    else:
        click.echo(_table(info))
        if plan is not None:
            click.echo("\n" + _plan_table(plan))


def _plan_table(p) -> str:
    rows = [
        f"On {p.gpus} GPU(s) of {_bytes(p.gpu_memory)}: routed experts expert-parallel, the rest replicated "
        f"(cache {'fp8' if p.kv_cache_dtype == 'fp8' else 'bf16'}, {p.max_batched_tokens:,} tokens per step)",
        f"  {'weights per GPU (fullest)':40}{_bytes(max(p.rank_weight_bytes)):>16}",
        f"  {'  of which replicated':40}{_bytes(p.replicated_bytes):>16}",
        f"  {'  of which its routed experts':40}{_bytes(max(p.expert_bytes_per_rank)):>16}",
        f"  {'activation reserve':40}{_bytes(p.activation_bytes):>16}",
        f"  {'workspace reserve':40}{_bytes(p.workspace_bytes):>16}",
    ]
    if not p.fits and p.cache_budget_bytes <= 0:
        rows.append(f"  {'cache budget left':40}{'none':>16}")
    else:
        rows += [
            f"  {'cache budget left':40}{_bytes(p.cache_budget_bytes):>16}",
            f"  {'cached tokens per GPU':40}{p.cached_tokens_per_gpu:>16,}",
            f"  {f'sequences of {p.context:,} tokens per GPU':40}{p.sequences_per_gpu:>16,}",
            f"  {f'sequences of {p.context:,} tokens, all GPUs':40}{p.sequences_per_gpu * p.gpus:>16,}",
        ]
    rows.append("  DOES NOT FIT" + p.reason[len("does not fit"):] if not p.fits else "  fits")
    return "\n".join(rows)
