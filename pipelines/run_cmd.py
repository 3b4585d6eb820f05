"""`batchv4 run`: the Click front of the run pipeline (options only; the job is `pipelines.run`).

Also owns `SectionedCommand`, the `--help` layout with options under headings, which `estimate`
reuses, and the `--shard I/N` parser.
"""

from __future__ import annotations

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


class SectionedCommand(click.Command):
    """A command whose `--help` lists its options under headings: `sections` is a sequence of
    (heading, option names); options in no section come last under "Other options"."""

    def __init__(self, *args, sections=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sections = tuple(sections)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        for title, names in self.sections:
            rows = [records.pop(n) for n in names if records.get(n)]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [r for r in records.values() if r]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


RUN_SECTIONS = (
    ("Input and output", ("output", "fmt", "limit", "shard", "resume", "part_rows")),
    ("Prompts", ("prompt_column", "messages_column", "template", "system", "id_column", "keep_columns", "thinking")),
    ("Sampling", ("max_tokens", "temperature", "top_p", "seed", "stop", "n")),
    ("Model and engine", ("model", "device", "kv_cache_memory", "kv_cache_dtype", "max_batched_tokens",
                          "max_num_seqs", "max_model_len")),
    ("Cost", ("price", "prices_file")),
)


@click.command(cls=SectionedCommand, sections=RUN_SECTIONS, context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@click.option("-o", "--output", "output", required=True, help="Output folder (local path or fsspec URL).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "openai"]), default=None,
              help="Input format.  [default: detected from the content]")
@click.option("--model", default="tiny", help="Preset name or checkpoint directory.")
@click.option("--prompt-column", default=None,
              help="Column holding the user prompt.  [default: 'messages' if present, else 'prompt']")
@click.option("--messages-column", default=None, help="Column holding chat messages [{role, content}].")
@click.option("--template", default=None, help="Prompt template with {column} placeholders ({{ }} for braces).")
@click.option("--system", default=None, help="System prompt put before every conversation.")
@click.option("--id-column", default=None,
              help="Column with row ids.  [default: 'id' if present, custom_id for OpenAI batch, else the row number]")
@click.option("--keep-columns", default="", show_default=False,
              help="Comma-separated input columns copied to the output.  [default: none]")
@click.option("--thinking/--no-thinking", default=False, help="V4 thinking mode (fills the reasoning column).")
@click.option("--max-tokens", default=256, type=int, help="Tokens generated per row at most.")
@click.option("--temperature", default=0.0, type=float, help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", default=1.0, type=float, help="Nucleus sampling: keep the smallest token set with this mass.")
@click.option("--seed", default=0, type=int, help="Sampling seed (per row: seed, row id, sample, step).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).  [default: none]")
@click.option("-n", "n", default=1, type=int, help="Samples per row; each is its own output row (sample_index).")
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--kv-cache-dtype", default="auto", type=click.Choice(["auto", "fp8"]),
              help="auto: the model's dtype; fp8: V4's production cache (FP8 entries, FP4 indexer keys) "
                   "with the FP8/FP4 activation simulation.")
@click.option("--max-batched-tokens", default=2048, type=int, help="Token budget per engine step.")
@click.option("--max-num-seqs", default=64, type=int, help="Sequences running at once.")
@click.option("--max-model-len", default=None, type=int,
              help="Context limit: prompt + max tokens; longer rows become error rows.  [default: the model's]")
@click.option("--device", default="cpu", help="cpu or cuda.")
@click.option("--price", default="deepseek-v4-flash", help="Price card for cost_usd.")
@click.option("--prices", "prices_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON/TOML file of private price cards (token prices, gpu_hour_usd).")
@click.option("--limit", default=None, type=int, help="Process only the first N input rows.  [default: all]")
@click.option("--shard", default=None, callback=_shard,
              help="I/N: the I-th of N slices, cut by prefix group.  [default: all rows]")
@click.option("--resume/--overwrite", default=True, help="Continue a previous run in OUTPUT, or replace it.")
@click.option("--part-rows", default=512, type=int, help="Output rows per Parquet part.")
@click.option("--quiet", is_flag=True, help="No progress bars or table.")
def run(input_url, output, fmt, model, prompt_column, messages_column, template, system, id_column, keep_columns,
        thinking, max_tokens, temperature, top_p, seed, stop, n, kv_cache_memory, kv_cache_dtype, max_batched_tokens,
        max_num_seqs, max_model_len, device, price, prices_file, limit, shard, resume, part_rows, quiet):
    """Generate an output for every row of INPUT (Parquet, JSONL or OpenAI batch JSONL; a file, a
    folder, a glob or any fsspec URL) into the folder OUTPUT: Parquet parts with per-row tokens and
    cost, errors-*.parquet for rows that cannot run, summary.json."""
    from batchv4.pipelines.run import RunConfig, run as run_job

    cfg = RunConfig(input=input_url, output=output, fmt=fmt, model=model, prompt_column=prompt_column,
                    messages_column=messages_column, template=template, system=system, id_column=id_column,
                    keep_columns=tuple(c.strip() for c in keep_columns.split(",") if c.strip()),
                    thinking=thinking, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop=tuple(stop), n=n, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                    max_batched_tokens=max_batched_tokens,
                    max_num_seqs=max_num_seqs, max_model_len=max_model_len, price=price, prices_file=prices_file,
                    limit=limit, shard=shard, overwrite=not resume, quiet=quiet, part_rows=part_rows, device=device)
    summary = run_job(cfg)
    if not quiet:
        from batchv4.pipelines.report_cmd import render

        click.echo(render(summary))
