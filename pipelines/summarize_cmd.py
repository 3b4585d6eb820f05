"""`batchv4 summarize CORPUS -o OUT`: the Click front of the summarize pipeline (options only; the
job is `pipelines.summarize`, the estimate `pipelines.summarize_estimate`)."""

from __future__ import annotations

import click

from batchv4.pipelines.run_cmd import SectionedCommand

SECTIONS = (
    ("Corpus and output", ("output", "text_column", "id_column", "fmt", "resume", "part_rows", "estimate")),
    ("Summaries", ("instructions", "max_summary_tokens", "chunk_tokens", "strategy", "corpus_summary", "thinking",
                   "temperature", "seed")),
    ("Model and engine", ("model", "device", "kv_cache_memory", "max_batched_tokens", "max_num_seqs", "max_model_len")),
    ("Remote backend (--backend openai)", ("backend", "base_urls", "api_key_env", "provider", "tokenizer",
                                           "concurrency", "max_retries", "request_timeout", "max_cost_usd")),
    ("Cost", ("price", "prices_file")),
)


def _instructions(value: str | None) -> str | None:
    if value is None or not value.startswith("@"):
        return value
    from batchv4.errors import UserError

    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--instructions {value}: {e.strerror or e}") from None


@click.command(cls=SectionedCommand, sections=SECTIONS, context_settings={"show_default": True})
@click.argument("corpus", metavar="CORPUS")
@click.option("-o", "--output", default=None, help="The output folder (local path); not needed with --estimate.")
@click.option("--text-column", default="text", help="Column holding each document's text.")
@click.option("--id-column", default=None, help="Column with document ids.  [default: 'id' if present, else the row number]")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default=None,
              help="Corpus format.  [default: detected; a folder of .txt/.md files is one document per file]")
@click.option("--instructions", default=None,
              help="The summarizing instructions, or @FILE; first in every prompt.  [default: a general summary]")
@click.option("--max-summary-tokens", default=256, type=int, help="Tokens per summary at most.")
@click.option("--chunk-tokens", default=None, type=int,
              help="Tokens per chunk of a document that does not fit.  [default: the largest that fits]")
@click.option("--strategy", default="hierarchical", type=click.Choice(["hierarchical", "incremental"]),
              help="hierarchical: summarize chunks, then merge summaries level by level; incremental: a running "
                   "summary updated chunk by chunk.")
@click.option("--corpus-summary", is_flag=True, help="Also merge the document summaries into one (corpus.json).")
@click.option("--estimate", is_flag=True, help="Print the predicted chunks, levels, tokens and cost (JSON); run nothing.")
@click.option("--model", default="tiny", help="Preset name or checkpoint directory; with --backend openai the provider's model name.")
@click.option("--max-model-len", default=None, type=int,
              help="Context limit (prompt + summary).  [default: the model's; V4's 1,048,576 with --backend openai]")
@click.option("--thinking/--no-thinking", default=False, help="V4 thinking mode.")
@click.option("--temperature", default=None, type=float, show_default=False, help="Sampling temperature.  [default: 0]")
@click.option("--seed", default=0, type=int, help="Sampling seed.")
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--max-batched-tokens", default=2048, type=int, help="Token budget per engine step.")
@click.option("--max-num-seqs", default=64, type=int, help="Sequences running at once.")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--part-rows", default=16, type=int, help="Rows per Parquet part of each level (what a kill can lose).")
@click.option("--resume/--overwrite", default=True, help="Continue an earlier job in OUT, or replace it.")
@click.option("--backend", default="local", type=click.Choice(["local", "openai"]),
              help="local: batchv4's engine; openai: an OpenAI-compatible API at --base-url.")
@click.option("--base-url", "base_urls", multiple=True, help="OpenAI-compatible endpoint (repeatable).  [default: none]")
@click.option("--api-key-env", default=None, help="Name of the environment variable holding the API key.")
@click.option("--provider", default="auto", type=click.Choice(["auto", "deepseek", "vllm", "openai"]),
              help="Request dialect for thinking mode.")
@click.option("--tokenizer", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder with the tokenizer.json that counts tokens.  [default: the model's, else V4's]")
@click.option("--concurrency", default=16, type=int, help="Requests in flight at most.")
@click.option("--max-retries", default=8, type=int, help="Retries of a request on 429, 5xx, timeouts and drops.")
@click.option("--request-timeout", default=600.0, type=float, help="Seconds per request attempt.")
@click.option("--max-cost-usd", default=None, type=float, help="Stop sending once a level's priced cost reaches this.")
@click.option("--price", default="deepseek-v4-flash", help="Price card for cost_usd.")
@click.option("--prices", "prices_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON/TOML file of private price cards.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def summarize(corpus, output, text_column, id_column, fmt, instructions, max_summary_tokens, chunk_tokens, strategy,
              corpus_summary, estimate, part_rows, resume, quiet, base_urls, **engine):
    """Summarize every document of CORPUS (Parquet/JSONL with a text column, or a folder of text files;
    local or fsspec) into OUT: documents.parquet, chunks.parquet (the tree of chunks and merges, with
    offsets, tokens and cost), corpus.json with --corpus-summary, summary.json. Documents longer than
    the context are cut into chunks and merged; every level is a resumable run under OUT/_levels/."""
    import json

    from batchv4.errors import UserError
    from batchv4.pipelines.run_config import RunConfig
    from batchv4.pipelines.summarize import SummarizeConfig
    from batchv4.pipelines.summarize_chunks import DEFAULT_INSTRUCTIONS

    if output is None and not estimate:
        raise UserError("an output folder is required (-o OUT)")
    run = RunConfig(input=corpus, output=output or "", fmt=fmt, part_rows=part_rows, overwrite=not resume,
                    quiet=quiet, base_urls=tuple(base_urls), **engine)
    cfg = SummarizeConfig(run, text_column=text_column, id_column=id_column,
                          instructions=_instructions(instructions) or DEFAULT_INSTRUCTIONS,
                          max_summary_tokens=max_summary_tokens, chunk_tokens=chunk_tokens, strategy=strategy,
                          corpus_summary=corpus_summary)
    if estimate:
        from batchv4.pipelines.summarize_estimate import estimate_summarize

        click.echo(json.dumps(estimate_summarize(cfg), indent=2, default=str))
        return
    from batchv4.pipelines.summarize import summarize as run_summarize

    s = run_summarize(cfg)
    c, t = s["counts"], s["totals"]
    cost = "n/a" if t.get("cost_usd") is None else f"${t['cost_usd']:.6f}"
    click.echo(f"{c['documents']:,} documents ({c['error_documents']:,} failed, {c['one_pass_documents']:,} in one "
               f"pass), {c['chunks']:,} chunks, {c['merges'] + c['corpus_merges']:,} merges, up to "
               f"{c['max_levels']} levels; {t['prompt_tokens']:,} prompt tokens ({t['prompt_cache_hit_tokens']:,} "
               f"cache hits), {t['completion_tokens']:,} completion tokens, {cost}")
    if c["error_documents"]:
        click.echo(f"{c['error_documents']:,} document(s) failed: see the error column of "
                   f"{output.rstrip('/')}/documents.parquet", err=True)
