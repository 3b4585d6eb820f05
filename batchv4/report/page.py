"""The self-contained HTML pages of `estimate --html` and `report --html`.

Owns: the page layout (inline CSS, the charts' inline SVG, the text tables beside them, and the
JSON the page was made from in a `<script type="application/json" id="batchv4-data">` block), and
the time zone the user reads it in. A page loads nothing: no scripts, styles, fonts or images
from anywhere, and no http(s) link in any src or href. Does not own: the figures (`figures`) or
the drawing (`charts`).
"""

from __future__ import annotations

import html
import json
import os
from datetime import datetime, tzinfo
from typing import Any

from batchv4.errors import UserError
from batchv4.report import charts
from batchv4.report.charts import usd

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1000px;color:#222;
background:#fff;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666;font-size:.85em}
svg{max-width:100%;height:auto}
"""


def zone(name: str | None) -> tuple[str, tzinfo]:
    """The reader's time zone: an IANA name, or this machine's local zone."""
    if not name:
        local = datetime.now().astimezone().tzinfo
        return (local.tzname(None) or "local time") if local else "UTC", local  # type: ignore[return-value]
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return name, ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin or UTC") from None


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _when(iso: str, tz: tzinfo) -> str:
    return datetime.fromisoformat(iso).astimezone(tz).strftime("%a %Y-%m-%d %H:%M")


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    th = "".join(f'<th class="{"n" if i >= numeric_from else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join('<tr>' + ''.join(r) + '</tr>' for r in rows)}" \
           "</tbody></table>"


def _td(text: str, **data: Any) -> str:
    attrs = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items() if v is not None)
    return f'<td class="n"{attrs}>{_e(text)}</td>'


def _quote_label(q: dict[str, Any]) -> str:
    return q["label"] + (" *" if q.get("approximate") else "") + (f" ({q['window']})" if q.get("window") else "")


def cost_section(quotes: list[dict[str, Any]], title: str, xlabel: str = "USD") -> str:
    entries = [{**q, "label": _quote_label(q)} for q in quotes]
    rows = []
    for q in entries:
        s = q.get("split") or {}
        rows.append([f"<td>{_e(q['label'])}</td>"]
                    + [_td(usd(s.get(k)) if s else "-", usd=s.get(k)) for k in ("miss_usd", "hit_usd", "output_usd")]
                    + [_td(usd(q["cost_usd"]), card=q["card"], window=q.get("window") or "", usd=q["cost_usd"])])
    table = _table(["card", "cache-miss input", "cache-hit input", "output", "total"], rows)
    return (f"<h2>{_e(title)}</h2><div id='cost-chart'>{charts.cost_bars(entries, xlabel)}</div>{table}"
            "<p class='note'>* approximate: another tokenizer counts the same text differently. "
            "Peak and off-peak: the dearest and cheapest windows of the next 7 days.</p>")


def calendar_section(cal: dict[str, Any] | None, tz_name: str, tz: tzinfo, note: str) -> str:
    if cal is None:
        return ""
    from batchv4.accounting.pricing import BEIJING

    c = cal["cheapest"]
    text = (f"Cheapest window on {_e(cal['label'])}: {_e(_when(c['start'], tz))} to {_e(_when(c['end'], tz))} "
            f"{_e(tz_name)} ({_e(_when(c['start'], BEIJING))} to {_e(_when(c['end'], BEIJING))} Beijing time), "
            f"{_e(usd(c['cost_usd']))}: a saving of {_e(usd(c['saving_usd']))} ({c['saving_share']:.0%}) against "
            f"starting now at {_e(usd(cal['cost_now_usd']))}.")
    return (f"<h2>Price by start hour</h2><p id='cheapest' data-start='{_e(c['start'])}' data-end='{_e(c['end'])}' "
            f"data-usd='{c['cost_usd']!r}' data-saving-usd='{c['saving_usd']!r}'>{text}</p>"
            f"<div id='calendar-chart'>{charts.calendar(cal, [(tz_name, tz), ('Beijing time', BEIJING)])}</div>"
            f"<p class='note'>The whole job priced at the rate of its start hour. {_e(note)}</p>")


def histogram_section(hist: dict[str, Any], measured: bool) -> str:
    rows = [[f"<td>{lo}-{hi - 1}</td>", _td(f"{r:,}", rows=r), _td(f"{t:,}", tokens=t),
             _td(f"{h / t:.1%}" if t else "-", hits=h)]
            for lo, hi, r, t, h in zip(hist["lo"], hist["hi"], hist["rows"], hist["prompt_tokens"],
                                       hist["cache_hit_tokens"])]
    what = "measured" if measured else "predicted (API cache units)"
    return (f"<h2>Prompt tokens per row</h2><div id='histogram-chart'>{charts.histogram(hist, measured)}</div>"
            + _table(["prompt tokens", "rows", "prompt tokens", f"from cache, {what}"], rows))


def _page(title: str, body: str, data: dict[str, Any]) -> str:
    blob = json.dumps(data, default=str).replace("</", "<\\/")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
            f"<body><h1>{_e(title)}</h1>{body}"
            f"<script type='application/json' id='batchv4-data'>{blob}</script></body></html>")


def estimate_page(res: dict[str, Any], tz_name: str | None = None) -> str:
    name, tz = zone(tz_name)
    t = res["tokens"]
    sched = res.get("schedule") or {}
    lines = [f"<p>{res['rows']:,} rows ({res['error_rows']:,} error rows), {t['prompt_tokens']:,} prompt tokens, "
             f"{t['api_cache_hit_tokens']:,} predicted API cache hits. Priced for a start at "
             f"{_e(_when(res['start'], tz))} {_e(name)}.</p>"]
    if sched.get("duration_seconds") is not None:
        w = sched["window"] or {}
        inside = "ends inside" if sched["ends_inside_window"] else "does not end inside"
        lines.append(f"<p id='schedule'>At {sched['tokens_per_second']:,.0f} tokens/s ({_e(sched['throughput_from'])}) "
                     f"the job takes {sched['duration_seconds'] / 3600:,.2f} h, ends {_e(_when(sched['ends_at'], tz))}, "
                     f"and {inside} the {'peak' if w.get('peak') else 'off-peak'} window it starts in "
                     f"(until {_e(_when(w['end'], tz)) if w else '-'}).</p>")
    body = ("".join(lines) + cost_section(res["compare"], "Cost per card (expected output)", "USD (expected output)")
            + calendar_section(res.get("calendar"), name, tz, res.get("billing_calendar", ""))
            + histogram_section(res["prompt_tokens_histogram"], measured=False)
            + f"<p class='note'>{_e(res.get('notes', ''))}</p>")
    return _page("batchv4 estimate", body, res)


def report_page(summary: dict[str, Any], extra: dict[str, Any], tz_name: str | None = None) -> str:
    """`extra`: `quotes` (compare with splits), `calendar`, `timeline`, `errors`, `predicted`."""
    name, tz = zone(tz_name)
    t = summary.get("totals", {})
    c = summary.get("counts", {})
    body = [f"<p>{c.get('output_rows', 0):,} output rows, {c.get('error_rows', 0):,} error rows"
            f"{'' if summary.get('complete') else ' (partial run)'}; {t.get('prompt_tokens', 0):,} prompt tokens, "
            f"{t.get('cache_hit_rate', 0.0):.1%} served from cache; cost on {_e(summary.get('price_card'))}: "
            f"<span id='cost' data-usd='{t.get('cost_usd')!r}'>{_e(usd(t.get('cost_usd')))}</span>.</p>"]
    if extra.get("predicted"):
        rows = [[f"<td>{_e(p['figure'])}</td>", _td(_num(p["predicted"]), value=p["predicted"]),
                 _td(_num(p["measured"]), value=p["measured"]),
                 _td("-" if p["ratio"] is None else f"{p['ratio']:.3f}")] for p in extra["predicted"]]
        ratios = [p for p in extra["predicted"] if p["ratio"] is not None]
        body.append("<h2>Predicted (estimate) against measured (this run)</h2>"
                    + (f"<div id='predicted-chart'>{charts.bars([p['figure'] for p in ratios], [p['ratio'] for p in ratios], 'measured / predicted')}</div>" if ratios else "")
                    + _table(["figure", "predicted", "measured", "measured / predicted"], rows))
    body.append(cost_section(extra.get("quotes", []), "Cost of this run's tokens per card"))
    body.append(calendar_section(extra.get("calendar"), name, tz, extra.get("billing_calendar", "")))
    tl = extra.get("timeline")
    if tl and tl.get("start"):
        body.append(histogram_section(tl["histogram"], measured=True))
        body.append(f"<h2>Throughput and cache hits over the run</h2><p>{_e(_when(tl['start'], tz))} to "
                    f"{_e(_when(tl['end'], tz))} {_e(name)}, from the rows' finished_at.</p>"
                    f"<div id='timeline-chart'>{charts.timeline(tl)}</div>")
    errs = extra.get("errors") or []
    if errs:
        rows = [[f"<td>{_e(e['reason'])}</td>", _td(f"{e['rows']:,}", rows=e["rows"])] for e in errs]
        body.append("<h2>Error rows by reason</h2><div id='errors-chart'>"
                    f"{charts.bars([e['reason'][:50] for e in errs], [e['rows'] for e in errs], 'rows')}</div>"
                    + _table(["reason", "rows"], rows))
    return _page("batchv4 report", "".join(body), {**summary, "report": extra})


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if isinstance(v, int) or (isinstance(v, float) and v >= 1000) else f"{v:.6g}"


def write(path: str, text: str) -> None:
    """Write the page atomically (a local path)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
