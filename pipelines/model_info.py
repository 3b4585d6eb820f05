"""`batchv4 model-info NAME_OR_PATH`: parameter counts, checkpoint size and KV-cache bytes of a
DeepSeek-V4 model, as a table or as JSON.

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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_info(name_or_path: str, context: int, as_json: bool) -> None:
    """Parameters, active parameters, checkpoint tensors and KV-cache bytes of a model
    (a preset name, a checkpoint directory, or a config file)."""
    try:
        cfg = ModelConfig.load(name_or_path)
    except ConfigError as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    from batchv4.model.info import model_info as compute  # imports torch

    info = compute(cfg, context=context, path=name_or_path)
    for diff in info.cross_check[:5]:
        click.echo(f"warning: model and checkpoint inventory disagree: {diff}", err=True)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=1))
    else:
        click.echo(_table(info))
