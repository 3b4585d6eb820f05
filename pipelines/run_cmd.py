"""`batchv4 run`: the Click front of the run pipeline (options only; the job is `pipelines.run`)."""

from __future__ import annotations

import json

import click


def _shard(ctx, param, value):
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("use I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{value}: need 0 <= I < N")
    return (i, n)


@click.command(context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@click.option("-o", "--output", "output", required=True, help="Output folder (local path or fsspec URL).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "openai"]), default=None,
              help="Input format (default: detected from the content).")
@click.option("--model", default="tiny", help="Preset name or checkpoint directory.")
@click.option("--prompt-column", default=None, help="Column holding the user prompt (default: 'prompt').")
@click.option("--messages-column", default=None, help="Column holding chat messages [{role, content}].")
@click.option("--template", default=None, help="Prompt template with {column} placeholders.")
@click.option("--system", default=None, help="System prompt put before every conversation.")
@click.option("--id-column", default=None, help="Column with row ids (default: custom_id or the row number).")
@click.option("--keep-columns", default="", help="Comma-separated input columns copied to the output.")
@click.option("--thinking/--no-thinking", default=False, help="V4 thinking mode (reasoning column).")
@click.option("--max-tokens", default=256, type=int, help="Tokens generated per row at most.")
@click.option("--temperature", default=0.0, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, type=float)
@click.option("--seed", default=0, type=int, help="Sampling seed (per row: seed, row id, sample, step).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("-n", "n", default=1, type=int, help="Samples per row; each is its own output row.")
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--max-batched-tokens", default=2048, type=int, help="Token budget per engine step.")
@click.option("--device", default="cpu", help="cpu or cuda.")
@click.option("--price", default="deepseek-v4-flash", help="Price card for cost_usd.")
@click.option("--prices", "prices_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON/TOML file of private price cards (token prices, gpu_hour_usd).")
@click.option("--limit", default=None, type=int, help="Process only the first N input rows.")
@click.option("--shard", default=None, callback=_shard, help="I/N: the I-th of N slices, cut by prefix group.")
@click.option("--resume/--overwrite", default=True, help="Continue a previous run in OUTPUT, or replace it.")
@click.option("--quiet", is_flag=True, help="No progress bars or table.")
def run(input_url, output, fmt, model, prompt_column, messages_column, template, system, id_column, keep_columns,
        thinking, max_tokens, temperature, top_p, seed, stop, n, kv_cache_memory, max_batched_tokens, device,
        price, prices_file, limit, shard, resume, quiet):
    """Generate an output for every row of INPUT (Parquet, JSONL or OpenAI batch JSONL) into OUTPUT."""
    from batchv4.pipelines.run import RunConfig, run as run_job

    if not (prompt_column or messages_column or template):
        prompt_column = None
    cfg = RunConfig(input=input_url, output=output, fmt=fmt, model=model, prompt_column=prompt_column,
                    messages_column=messages_column, template=template, system=system, id_column=id_column,
                    keep_columns=tuple(c.strip() for c in keep_columns.split(",") if c.strip()),
                    thinking=thinking, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop=tuple(stop), n=n, kv_cache_memory=kv_cache_memory, max_batched_tokens=max_batched_tokens,
                    price=price, prices_file=prices_file, limit=limit, shard=shard, overwrite=not resume,
                    quiet=quiet, device=device)
    summary = run_job(cfg)
    if not quiet:
        from batchv4.pipelines.report_cmd import render

        click.echo(render(summary))
