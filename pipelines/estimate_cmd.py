"""`batchv4 estimate`: the Click front of the estimate pipeline. Never imports torch.

It takes `run`'s row options (the same bundle, `run_cmd.ROW_OPTIONS`), so it counts the rows that
`run` with the same options would run. `--html FILE` writes the self-contained page
(`batchv4.report.page`); `--json-out FILE` saves the JSON, which `report OUT --estimate FILE` (or
an estimate.json copied into the run's output folder after the run) compares with the run.
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
    ("Planning", ("start", "throughput", "throughput_from")),
    ("Output", ("as_json", "json_out", "html", "tz")),
)


def parse_start(value: str | None, tz_name: str | None):
    """`--start`: an ISO time; one without an offset is read in --tz (default: local time)."""
    from datetime import datetime

    from batchv4.errors import UserError

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--start {value!r} is not an ISO time such as 2026-12-05T18:00+08:00") from None
    if when.tzinfo is None:
        from batchv4.report.page import zone

        when = when.replace(tzinfo=zone(tz_name)[1]) if tz_name else when.astimezone()
    return when


@click.command(cls=SectionedCommand, sections=ESTIMATE_SECTIONS, context_settings={"show_default": True})
@click.argument("input_url", metavar="INPUT")
@row_options
@click.option("--output-tokens", default=None, callback=_triple,
              help="Output tokens per row as LOW,EXPECTED,HIGH or one number, capped by each row's max tokens."
                   "  [default: 1,MAX/2,MAX]")
@click.option("--start", default=None, metavar="ISO_TIME",
              help="Price a job that starts then (an offset, or read in --tz).  [default: now]")
@click.option("--throughput", type=click.FloatRange(min=0, min_open=True), default=None, metavar="TOKENS_PER_S",
              help="Computed tokens (prefill + output) per second: say how long the job takes.")
@click.option("--throughput-from", default=None, metavar="OUT",
              help="Take the throughput from an earlier run's output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--json-out", default=None, metavar="FILE",
              help="Also write the JSON to FILE, for `report OUT --estimate FILE`.")
@click.option("--html", default=None, metavar="FILE", help="Write a self-contained HTML page with charts.")
@click.option("--tz", default=None, help="Time zone of the page and of --start.  [default: local]")
def estimate(input_url, output_tokens, start, throughput, throughput_from, as_json, json_out, html, tz, **row):
    """What running INPUT would cost, before running it (no model is loaded)."""
    from batchv4.errors import UserError
    from batchv4.pipelines.estimate import EstimateConfig, estimate as run_estimate

    if throughput and throughput_from:
        raise UserError("give --throughput or --throughput-from, not both")
    if html:
        from batchv4.report.charts import require_matplotlib
        from batchv4.report.page import zone

        require_matplotlib(), zone(tz)  # fail before the estimate: no matplotlib, or an unknown zone
    res = run_estimate(EstimateConfig(input=input_url, output_tokens=output_tokens, **row_fields(row),
                                      start=parse_start(start, tz), throughput=throughput,
                                      throughput_from=throughput_from))
    if json_out:
        from batchv4.report.page import write

        write(json_out, json.dumps(res, indent=2))
    if html:
        from batchv4.report.page import estimate_page, write

        write(html, estimate_page(res, tz))
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
        lines.append(f"cheapest window:  {w['start']} .. {w['end']}  {_usd(w['cost_usd'])} (expected; "
                     f"saves {_usd(w['saving_usd'])})")
    op = res.get("off_peak")
    if op is not None:
        lines.append("off-peak now" if not op["peak_now"] else
                     f"peak now; the next off-peak window opens {op['next_off_peak_start']} "
                     "(run --backend openai --when off-peak waits for it)")
    s = res["schedule"]
    if s["duration_seconds"] is not None:
        inside = "inside" if s["ends_inside_window"] else "after the end of"
        lines.append(f"at {s['tokens_per_second']:,.0f} tok/s: {s['duration_seconds'] / 3600:,.2f} h, ends "
                     f"{s['ends_at']}, {inside} the window it starts in")
    lines.append(res["billing_calendar"])
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
