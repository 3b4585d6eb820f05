"""`batchv4 estimate`: the Click front of the estimate pipeline. Never imports torch."""

from __future__ import annotations

import json

import click

from batchv4.pipelines.run_cmd import SectionedCommand, _shard


def _triple(ctx, param, value):
    if value is None:
        return None
    try:
        parts = [int(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter("use LOW,EXPECTED,HIGH or one number") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or any(p < 0 for p in parts) or not parts[0] <= parts[1] <= parts[2]:
        raise click.BadParameter("use LOW,EXPECTED,HIGH with 0 <= LOW <= EXPECTED <= HIGH")
    return tuple(parts)


ESTIMATE_SECTIONS = (
    ("Input", ("fmt", "limit", "shard")),
    ("Prompts", ("prompt_column", "messages_column", "template", "system", "thinking")),
    ("Output tokens", ("max_tokens", "output_tokens", "n")),
    ("Cost", ("price", "prices_file")),
)


@click.command(cls=SectionedCommand, sections=ESTIMATE_SECTIONS, context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "openai"]), default=None,
              help="Input format.  [default: detected from the content]")
@click.option("--prompt-column", default=None,
              help="Column holding the user prompt.  [default: 'messages' if present, else 'prompt']")
@click.option("--messages-column", default=None, help="Column holding chat messages [{role, content}].")
@click.option("--template", default=None, help="Prompt template with {column} placeholders ({{ }} for braces).")
@click.option("--system", default=None, help="System prompt put before every conversation.")
@click.option("--thinking/--no-thinking", default=False, help="V4 thinking mode.")
@click.option("--max-tokens", default=256, type=int, help="Upper bound of output tokens per row.")
@click.option("--output-tokens", default=None, callback=_triple,
              help="Output tokens per row as LOW,EXPECTED,HIGH or one number.  [default: 1,MAX/2,MAX]")
@click.option("-n", "n", default=1, type=int, help="Samples per row.")
@click.option("--price", default="deepseek-v4-flash", help="Price card.")
@click.option("--prices", "prices_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON/TOML file of private price cards.")
@click.option("--limit", default=None, type=int, help="Only the first N input rows.  [default: all]")
@click.option("--shard", default=None, callback=_shard, help="I/N: the I-th of N slices.  [default: all rows]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def estimate(input_url, fmt, prompt_column, messages_column, template, system, thinking, max_tokens, output_tokens,
             n, price, prices_file, limit, shard, as_json):
    """What running INPUT would cost, before running it (no model is loaded)."""
    from batchv4.pipelines.estimate import EstimateConfig, estimate as run_estimate

    res = run_estimate(EstimateConfig(input_url, fmt, prompt_column, messages_column, template, system, None, thinking,
                                      max_tokens, output_tokens, n, price, prices_file, limit, shard))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = res["tokens"]
    lines = [
        f"rows                 {res['input']['rows']:>14,}   (errors {res['input']['error_rows']:,})",
        f"prompt tokens        {t['prompt_tokens']:>14,}",
        f"  engine cache hits  {t['engine_hit_tokens']:>14,}   (prefill {t['engine_prefill_tokens']:,}; "
        f"reuse x{t['predicted_reuse']:.2f})",
        f"  API cache hits     {t['api_hit_tokens']:>14,}",
        f"output tokens/row    {t['output_tokens_per_row']['low']:,} / {t['output_tokens_per_row']['expected']:,}"
        f" / {t['output_tokens_per_row']['high']:,}  (low / expected / high)",
        "",
        f"cost on {res['card']} now:  " + " / ".join(_usd(res["cost_usd"][k]) for k in ("low", "expected", "high")),
    ]
    if res["cheapest_window"]:
        w = res["cheapest_window"]
        lines.append(f"cheapest window:  {w['start']} .. {w['end']}  {_usd(w['cost_usd'])} (expected)")
    lines += ["", f"{'card':<34}{'window':<10}{'expected cost':>16}"]
    for q in res["compare"]:
        name = q["label"] + (" *" if q["approximate"] else "")
        lines.append(f"{name:<34}{(q['window'] or '-'):<10}{_usd(q['cost_usd']):>16}")
    lines.append("* approximate: another tokenizer")
    click.echo("\n".join(lines))


def _usd(v) -> str:
    return "n/a" if v is None else (f"${v:,.2f}" if v >= 100 else f"${v:.6g}")
