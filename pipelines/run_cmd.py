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
    ("Structured outputs", ("json_schema", "regex", "choice", "max_thinking_tokens")),
    ("Model and engine", ("model", "device", "kv_cache_memory", "kv_cache_dtype", "max_batched_tokens",
                          "max_num_seqs", "max_model_len", "data_parallel_size", "enable_expert_parallel")),
    ("Remote backend (--backend openai)", ("backend", "base_urls", "api_key_env", "provider", "tokenizer",
                                           "concurrency", "max_retries", "request_timeout", "rpm", "tpm",
                                           "max_cost_usd", "when")),
    ("Cost", ("price", "prices_file")),
    ("Executor (--executor ray)", ("executor", "ray_address", "replicas", "cpus_per_replica", "gpus_per_replica")),
)

# the options that decide which rows run and how they are tokenized: `run` and `estimate` take them
# all, so an estimate counts exactly the rows its run would run
ROW_OPTIONS = (
    click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "openai"]), default=None,
                 help="Input format.  [default: detected per file from its content]"),
    click.option("--model", default="tiny",
                 help="Preset name or checkpoint directory (its tokenizer.json is used); with --backend openai "
                      "the provider's model name."),
    click.option("--backend", default="local", type=click.Choice(["local", "openai"]),
                 help="local: batchv4's engine; openai: an OpenAI-compatible API (DeepSeek, vLLM, SGLang, "
                      "batchv4 serve) at --base-url."),
    click.option("--tokenizer", default=None, type=click.Path(exists=True, file_okay=False),
                 help="Folder with the tokenizer.json that counts tokens.  [default: the model's, else V4's]"),
    click.option("--prompt-column", default=None,
                 help="Column holding the user prompt.  [default: each row's 'messages', else its 'prompt']"),
    click.option("--messages-column", default=None, help="Column holding chat messages [{role, content}]."),
    click.option("--template", default=None, help="Prompt template with {column} placeholders ({{ }} for braces)."),
    click.option("--system", default=None, help="System prompt put before every conversation."),
    click.option("--id-column", default=None,
                 help="Column with row ids.  [default: 'id' if present, custom_id for OpenAI batch, else the row number]"),
    click.option("--keep-columns", default="", show_default=False,
                 help="Comma-separated input columns copied to the output.  [default: none]"),
    click.option("--thinking/--no-thinking", default=False, help="V4 thinking mode (fills the reasoning column)."),
    click.option("--max-tokens", default=256, type=int, help="Tokens generated per row at most."),
    click.option("--temperature", default=None, type=float, show_default=False,
                 help="Sampling temperature; 0 = greedy.  [default: 0; OpenAI batch bodies: OpenAI's 1]"),
    click.option("--top-p", default=1.0, type=float, help="Nucleus sampling: keep the smallest token set with this mass."),
    click.option("--seed", default=0, type=int, help="Sampling seed (per row: seed, row id, sample, step)."),
    click.option("--stop", multiple=True, help="Stop string (repeatable).  [default: none]"),
    click.option("-n", "n", default=1, type=int, help="Samples per row; each is its own output row (sample_index)."),
    click.option("--max-model-len", default=None, type=int,
                 help="Context limit: prompt + max tokens; longer rows become error rows.  [default: the model's]"),
    click.option("--price", default="deepseek-v4-flash", help="Price card for cost_usd."),
    click.option("--prices", "prices_file", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="JSON/TOML file of private price cards (see the README's 'Price files')."),
    click.option("--json-schema", "json_schema", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="Every output must match this JSON schema (a file): constrained decoding; outputs gain "
                      "valid and parsed.  [default: none]"),
    click.option("--regex", default=None, help="Every output must match this regular expression.  [default: none]"),
    click.option("--choice", default=None, help="Every output is one of these comma-separated strings.  [default: none]"),
    click.option("--max-thinking-tokens", default=None, type=int,
                 help="Thinking mode: </think> is forced after this many reasoning tokens.  [default: no budget]"),
    click.option("--limit", default=None, type=int, help="Process only the first N input rows.  [default: all]"),
    click.option("--shard", default=None, callback=_shard,
                 help="I/N: the I-th of N slices, cut by prefix group.  [default: all rows]"),
)


def row_options(f):
    for option in reversed(ROW_OPTIONS):
        f = option(f)
    return f


def row_fields(kw: dict) -> dict:
    """The RowOptions fields from the parsed ROW_OPTIONS (keep_columns split, stop a tuple)."""
    kw = dict(kw)
    kw["keep_columns"] = tuple(c.strip() for c in kw.pop("keep_columns", "").split(",") if c.strip())
    kw["stop"] = tuple(kw.get("stop") or ())
    if kw.get("json_schema"):
        try:
            with open(kw["json_schema"], encoding="utf-8") as f:
                text = f.read()
            import json

            json.loads(text)
        except (OSError, ValueError) as e:
            from batchv4.errors import UserError

            raise UserError(f"--json-schema {kw['json_schema']}: {str(e).splitlines()[0]}") from None
        kw["json_schema"] = text
    choice = kw.get("choice")
    kw["choice"] = tuple(c.strip() for c in choice.split(",") if c.strip()) if choice else ()
    return kw


@click.command(cls=SectionedCommand, sections=RUN_SECTIONS, context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@click.option("-o", "--output", "output", required=True, help="Output folder (local path or fsspec URL).")
@row_options
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--kv-cache-dtype", default="auto", type=click.Choice(["auto", "fp8"]),
              help="auto: the model's dtype; fp8: V4's production cache (FP8 entries, FP4 indexer keys) "
                   "with the FP8/FP4 activation simulation.")
@click.option("--max-batched-tokens", default=2048, type=int, help="Token budget per engine step.")
@click.option("--max-num-seqs", default=64, type=int, help="Sequences running at once.")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--data-parallel-size", default=1, type=int,
              help="Ranks (one process each; rank r on cuda:r), each running its own sequences and cache; "
                   "prefix groups are dealt to ranks balanced by tokens.")
@click.option("--enable-expert-parallel", is_flag=True,
              help="Shard the routed experts over the ranks (each holds and reads 1/N of them) instead of "
                   "replicating them.  [default: replicated]")
@click.option("--resume/--overwrite", default=True,
              help="Continue a previous run in OUTPUT, or replace it (only ever a batchv4 run's files).")
@click.option("--part-rows", default=512, type=int, help="Output rows per Parquet part.")
@click.option("--base-url", "base_urls", multiple=True,
              help="OpenAI-compatible endpoint, e.g. https://api.deepseek.com/v1 (repeatable: prefix groups are "
                   "spread over the endpoints).  [default: none]")
@click.option("--api-key-env", default=None,
              help="Name of the environment variable holding the API key.  [default: no Authorization header]")
@click.option("--provider", default="auto", type=click.Choice(["auto", "deepseek", "vllm", "openai"]),
              help="Request dialect for thinking mode: deepseek's `thinking` field, vLLM/SGLang's "
                   "chat_template_kwargs, or neither.  [default: deepseek for api.deepseek.com, else vllm]")
@click.option("--concurrency", default=16, type=int, help="Requests in flight at most (halved on 429, regrown).")
@click.option("--max-retries", default=8, type=int, help="Retries of a request on 429, 5xx, timeouts and drops.")
@click.option("--request-timeout", default=600.0, type=float, help="Seconds per request attempt.")
@click.option("--rpm", default=None, type=int, help="Requests per minute at most.  [default: no limit]")
@click.option("--tpm", default=None, type=int,
              help="Tokens (prompt + max tokens) per minute at most.  [default: no limit]")
@click.option("--max-cost-usd", default=None, type=float,
              help="Stop sending once the job's priced cost reaches this; a later run continues.  [default: no cap]")
@click.option("--when", default="now", type=click.Choice(["now", "off-peak"]),
              help="off-peak: send only in the price card's off-peak hours, waiting for them.")
@click.option("--quiet", is_flag=True, help="No progress bars or table (error rows are still counted on stderr).")
@click.option("--executor", default="local", type=click.Choice(["local", "ray"]),
              help="local: this process; ray: engine replicas as Ray actors, each prefix group on one "
                   "replica (needs the batchv4[ray] extra).")
@click.option("--address", "ray_address", default=None,
              help="Ray cluster to join (e.g. ray://head:10001 or auto).  [default: a local cluster]")
@click.option("--replicas", default=1, type=int, help="Engine replicas (Ray actors) with --executor ray.")
@click.option("--cpus-per-replica", default=0.5, type=float,
              help="CPUs Ray reserves per replica (fractions let --replicas 2 fit 2 cores).")
@click.option("--gpus-per-replica", default=0.0, type=float,
              help="GPUs per replica; above 1 a replica is a rank group of that many GPUs (with --device cpu: "
                   "that many ranks over gloo, no GPUs reserved).")
def run(input_url, output, kv_cache_memory, kv_cache_dtype, max_batched_tokens, max_num_seqs, device,
        data_parallel_size, enable_expert_parallel, resume,
        part_rows, base_urls, api_key_env, provider, concurrency, max_retries, request_timeout, rpm, tpm,
        max_cost_usd, when, quiet, executor, ray_address, replicas, cpus_per_replica, gpus_per_replica, **row):
    """Generate an output for every row of INPUT (Parquet, JSONL, JSON arrays or OpenAI batch JSONL;
    a file, a folder, a glob or any fsspec URL) into the folder OUTPUT: Parquet parts with per-row
    tokens and cost, errors-*.parquet for rows that cannot run, summary.json."""
    from batchv4.errors import UserError
    from batchv4.io.outdir import is_ephemeral
    from batchv4.io.urls import redact_url
    from batchv4.pipelines.run import RunConfig, run as run_job

    if is_ephemeral(output):
        raise UserError(f"-o {redact_url(output)}: memory:// storage ends with this process; write to a "
                        "folder or an object store")
    cfg = RunConfig(input=input_url, output=output, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                    max_batched_tokens=max_batched_tokens, max_num_seqs=max_num_seqs, device=device,
                    data_parallel_size=data_parallel_size, enable_expert_parallel=enable_expert_parallel,
                    overwrite=not resume, quiet=quiet, part_rows=part_rows, base_urls=tuple(base_urls),
                    api_key_env=api_key_env, provider=provider, concurrency=concurrency, max_retries=max_retries,
                    request_timeout=request_timeout, rpm=rpm, tpm=tpm, max_cost_usd=max_cost_usd, when=when,
                    executor=executor, ray_address=ray_address, replicas=replicas,
                    cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, **row_fields(row))
    if executor == "ray":
        from batchv4.pipelines.run_config import check_executor

        check_executor(cfg)             # the missing extra is one line, before Ray is imported
        from batchv4.pipelines.ray_executor import run_ray

        summary = run_ray(cfg)
    else:
        summary = run_job(cfg)
    if not quiet:
        from batchv4.pipelines.report_cmd import render

        click.echo(render(summary))
    report_errors(summary, cfg.output)


def report_errors(summary: dict, output: str) -> None:
    """Error rows are counted on stderr, even with --quiet; a job whose every processed row became
    an error row exits 1 (a rerun with nothing left to do exits 0)."""
    from batchv4.io.urls import redact_url

    c = summary["counts"]
    new_errors, new_outputs = c.get("new_error_rows", 0), c.get("new_output_rows", 0)
    if new_errors:
        click.echo(f"{new_errors:,} error row(s) this run ({c.get('error_rows', 0):,} in all): see "
                   f"{redact_url(output).rstrip('/')}/errors-*.parquet", err=True)
    if summary.get("this_run", {}).get("stopped_by_spend_cap"):
        click.echo(f"spend cap reached: {c.get('not_sent_rows', 0):,} row(s) not sent; run the same command "
                   "again (with a higher --max-cost-usd) to finish", err=True)
    if new_errors and not new_outputs:
        click.echo("Error: every row this run processed became an error row", err=True)
        raise SystemExit(1)
