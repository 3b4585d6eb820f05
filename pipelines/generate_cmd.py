"""`batchv4 generate SEEDS -o OUT --template T`: the Click front of the generate pipeline (options
only; the job is `pipelines.generate`)."""

from __future__ import annotations

import click

from batchv4.pipelines.run_cmd import SectionedCommand, row_fields, row_options

SECTIONS = (
    ("Dataset", ("output", "partition", "dedup", "near_threshold", "dedup_against", "resume")),
    ("Prompts", ("template", "system", "id_column", "keep_columns", "thinking")),
    ("Sampling", ("n", "max_tokens", "temperature", "top_p", "seed", "stop")),
    ("Structured outputs", ("json_schema", "regex", "choice", "max_thinking_tokens")),
    ("Model and engine", ("model", "device", "kv_cache_memory", "max_batched_tokens", "max_num_seqs",
                          "max_model_len")),
)


@click.command(cls=SectionedCommand, sections=SECTIONS, context_settings={"show_default": True})
@click.argument("seeds", metavar="SEEDS")
@click.option("-o", "--output", required=True, help="The dataset folder (local path).")
@row_options
@click.option("--partition", default=None,
              help="Hive-style partition of this night, e.g. date=2026-12-01.  [default: night=default]")
@click.option("--dedup/--no-dedup", default=True, help="Drop exact and near-duplicate outputs.")
@click.option("--near-threshold", default=0.8, type=float, help="MinHash Jaccard similarity that makes a near duplicate.")
@click.option("--dedup-against", multiple=True,
              help="Other generate datasets (folders) whose kept rows count as seen.  [default: none]")
@click.option("--kv-cache-memory", default="512MiB", help="Memory for the KV cache and snapshots.")
@click.option("--max-batched-tokens", default=2048, type=int, help="Token budget per engine step.")
@click.option("--max-num-seqs", default=64, type=int, help="Sequences running at once.")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--resume/--overwrite", default=True, help="Continue this night's run, or replace it.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate(seeds, output, partition, dedup, near_threshold, dedup_against, kv_cache_memory, max_batched_tokens,
             max_num_seqs, device, resume, quiet, **row):
    """Generate a dataset from the seed table SEEDS (Parquet/JSONL): each seed row through --template,
    -n samples per seed, deduplicated, written under OUT/<partition>/ with a dataset card."""
    from batchv4.pipelines.generate import GenerateConfig, generate as run_generate
    from batchv4.pipelines.run_config import RunConfig

    fields = row_fields(row)
    if fields.get("temperature") is None:
        fields["temperature"] = 1.0        # samples of one seed should differ
    cfg = RunConfig(input=seeds, output=output, kv_cache_memory=kv_cache_memory, max_batched_tokens=max_batched_tokens,
                    max_num_seqs=max_num_seqs, device=device, overwrite=not resume, quiet=quiet, **fields)
    res = run_generate(GenerateConfig(cfg, partition=partition, dedup=dedup, near_threshold=near_threshold,
                                      dedup_against=tuple(dedup_against)))
    n = res["night"]
    click.echo(f"{n['partition']}: {n['generated_rows']:,} generated, {n['kept_rows']:,} kept, "
               f"{n['dropped_exact']:,} exact and {n['dropped_near']:,} near duplicates dropped, "
               f"{n['error_rows']:,} error rows, {n['skipped_generated_on_other_nights']:,} seeds done on other nights")
