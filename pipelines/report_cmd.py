"""`batchv4 report OUTPUT`: the summary of a finished or partial run, and the table `run` prints."""

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


@click.command()
@click.argument("output_url", metavar="OUTPUT")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def report(output_url, as_json):
    """Print the summary of a finished or partial run in OUTPUT."""
    from batchv4.io.urls import get_fs, join
    from batchv4.io.writers import iter_output_rows, read_manifest

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
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(("" if summary.get("complete") else "(partial run)\n") + render(summary))
