"""`batchv4 estimate`: the Click front of the estimate pipeline. Never imports torch.

It takes `run`'s row options (the same bundle, `run_cmd.ROW_OPTIONS`), so it counts the rows that
`run` with the same options would run.
"""

from __future__ import annotations

import json

import click

from batchv4.pipelines.run_cmd import SectionedCommand, row_fields, row_options


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
    ("Prompts", ("prompt_column", "messages_column", "template", "system", "id_column", "keep_columns", "thinking")),
    ("Output tokens", ("max_tokens", "output_tokens", "n")),
    ("Sampling (as run takes them; they do not change the estimate)", ("temperature", "top_p", "seed", "stop")),
    ("Model", ("model", "max_model_len")),
    ("Cost", ("price", "prices_file")),
)


@click.command(cls=SectionedCommand, sections=ESTIMATE_SECTIONS, context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@row_options
@click.option("--output-tokens", default=None, callback=_triple,
              help="Output tokens per row as LOW,EXPECTED,HIGH or one number, capped by each row's max tokens."
                   "  [default: 1,MAX/2,MAX]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def estimate(input_url, output_tokens, as_json, **row):
    """What running INPUT would cost, before running it (no model is loaded)."""
    from batchv4.pipelines.estimate import EstimateConfig, estimate as run_estimate

    res = run_estimate(EstimateConfig(input=input_url, output_tokens=output_tokens, **row_fields(row)))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = res["tokens"]
    per_row = t["output_tokens_per_row"]
    lines = [
        f"rows                 {res['rows']:>14,}   (error rows {res['error_rows']:,}; output rows {res['output_rows']:,})",
        f"prompt tokens        {t['prompt_tokens']:>14,}",
        f"  engine cache hits  {t['engine_cache_hit_tokens']:>14,}   (prefill {t['engine_prefill_tokens']:,}; "
        f"reuse x{t['predicted_reuse']:.2f})",
        f"  API cache hits     {t['api_cache_hit_tokens']:>14,}",
        f"output tokens/row    {per_row['low']:,.0f} / {per_row['expected']:,.0f} / {per_row['high']:,.0f}"
        "  (low / expected / high)",
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
    if res["error_rows"]:
        click.echo(f"{res['error_rows']:,} input row(s) would become error rows", err=True)


def _usd(v) -> str:
    return "n/a" if v is None else (f"${v:,.2f}" if v >= 100 else f"${v:.6g}")
