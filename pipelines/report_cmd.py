"""`batchv4 report OUTPUT`: the summary of a finished or partial run, and the table `run` prints.

`--html FILE` also writes a self-contained page (`batchv4.report.page`): cost per card split by
token class, the week calendar of this job's price by start hour, the prompt tokens per row and
their measured cache share, throughput and cache hits over the run's time (the rows'
`finished_at`), error rows by reason, and, given an estimate's JSON (`--estimate FILE`, or
OUTPUT/estimate.json as `estimate --json-out` wrote it), predicted against measured.
"""

from __future__ import annotations

import json

import click


def render(summary: dict) -> str:
    c, t = summary.get("counts", {}), summary.get("totals", {})
    r = summary.get("this_run", {})
    lines = [
        f"output rows      {c.get('output_rows', 0):>12,}   error rows {c.get('error_rows', 0):,}",
        f"prompt tokens    {t.get('prompt_tokens', 0):>12,}   cache hits {t.get('prompt_cache_hit_tokens', 0):,}"
        f" ({t.get('cache_hit_rate', 0.0):.1%})",
        f"  API cache hits {t.get('api_cache_hit_tokens', 0):>12,}   (cost_usd is priced with these)",
        f"completion       {t.get('completion_tokens', 0):>12,}   reasoning {t.get('reasoning_tokens', 0):,}",
        f"cost ({summary.get('price_card', '?')})  " + ("n/a" if t.get("cost_usd") is None else f"${t['cost_usd']:,.6f}"),
    ]
    if r:
        lines.append(f"this run         {r.get('wall_seconds', 0):.1f} s, {r.get('tokens_per_second', 0):,.0f} tok/s")
    for q in summary.get("compare", [])[:12]:
        cost = "n/a" if q["cost_usd"] is None else f"${q['cost_usd']:,.6f}"
        lines.append(f"  {q['label'] + (' *' if q['approximate'] else ''):<32}{(q['window'] or '-'):<10}{cost:>14}")
    return "\n".join(lines)


def _read_json(fs, name: str, what: str) -> dict:
    from batchv4.errors import UserError

    try:
        with fs.open(name, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise UserError(f"{what} {name}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {name} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{what} {name}: expected a JSON object")
    return doc


def html_extra(output_url: str, summary: dict, estimate_file: str | None) -> dict:
    """What the page shows beyond the summary (see the module docstring)."""
    from dataclasses import fields
    from datetime import datetime, timezone

    from batchv4.accounting.cards import get_card, load_price_file
    from batchv4.accounting.summary import Totals
    from batchv4.errors import UserError
    from batchv4.io.urls import get_fs, join
    from batchv4.pipelines.estimate import BILLING_NOTE
    from batchv4.report.figures import compare_predicted, error_reasons, quote_split, run_timeline, week_calendar

    t = summary.get("totals", {})
    totals = Totals(**{f.name: t[f.name] for f in fields(Totals) if t.get(f.name) is not None})
    hits = totals.api_cache_hit_tokens
    api = Totals(rows=totals.rows, prompt_tokens=totals.prompt_tokens, prompt_cache_hit_tokens=hits,
                 prompt_cache_miss_tokens=totals.prompt_tokens - hits, completion_tokens=totals.completion_tokens)
    prices_file = (summary.get("config") or {}).get("prices_file")
    try:
        private = load_price_file(prices_file) if prices_file else {}
    except (OSError, UserError):
        private = {}

    def split(q):
        try:
            return quote_split(api, get_card(q["card"], private), datetime.fromisoformat(q["at"]))
        except UserError:
            return None

    quotes = [{**q, "split": split(q)} for q in summary.get("compare", [])]
    try:
        card = get_card(summary.get("price_card") or "deepseek-v4-flash", private)
    except UserError:
        card = None
    cal = week_calendar(api, card, datetime.now(timezone.utc)) if card and card.has_token_prices and api.rows else None
    fs, path = get_fs(output_url)
    if estimate_file is None and fs.exists(join(fs, path, "estimate.json")):
        estimate_file = join(fs, path, "estimate.json")
        est = _read_json(fs, estimate_file, "estimate")
    elif estimate_file is not None:
        est = _read_json(get_fs(estimate_file)[0], get_fs(estimate_file)[1], "--estimate")
    else:
        est = None
    return {"quotes": quotes, "calendar": cal, "timeline": run_timeline(output_url), "errors": error_reasons(output_url),
            "predicted": compare_predicted(est, t) if est else None, "estimate_file": estimate_file,
            "billing_calendar": BILLING_NOTE}


@click.command()
@click.argument("output_url", metavar="OUTPUT")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--html", default=None, metavar="FILE", help="Also write a self-contained HTML page with charts.")
@click.option("--estimate", "estimate_file", default=None, metavar="FILE",
              help="An `estimate --json` result to compare with.  [default: OUTPUT/estimate.json if present]")
@click.option("--tz", default=None, help="Time zone of the page.  [default: local]")
def report(output_url, as_json, html, estimate_file, tz):
    """Print the summary of a finished or partial run in OUTPUT."""
    from batchv4.io.urls import get_fs, join
    from batchv4.io.writers import iter_output_rows, read_manifest

    if html:
        from batchv4.report.charts import require_matplotlib
        from batchv4.report.page import zone

        require_matplotlib(), zone(tz)

    fs, path = get_fs(output_url)
    name = join(fs, path, "summary.json")
    if fs.exists(name):
        with fs.open(name, "rb") as f:
            summary = json.loads(f.read())
        summary["complete"] = True
    else:
        manifest = read_manifest(output_url)
        if manifest is None:
            raise click.ClickException(f"{output_url}: no batchv4 run here (no manifest.json)")
        from batchv4.accounting.summary import summarize

        totals = summarize(iter_output_rows(output_url))
        summary = {"complete": False, "fingerprint": manifest.get("meta", {}).get("fingerprint"),
                   "counts": {"output_rows": totals.rows,
                              "error_rows": sum(p["rows"] for p in manifest.get("error_parts", []))},
                   "totals": totals.to_dict(),
                   "price_card": manifest.get("meta", {}).get("config", {}).get("price")}
    if html:
        from batchv4.report.page import report_page, write

        write(html, report_page(summary, html_extra(output_url, summary, estimate_file), tz))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(("" if summary.get("complete") else "(partial run)\n") + render(summary))
