"""Charts of the HTML reports: matplotlib figures rendered to static inline SVG strings.

Owns: drawing (cost per card split by token class, the week calendar in two time zones, the
prompt-token histogram with its cache share, a run's throughput and hit rate over time, error
rows by reason, predicted against measured). Figures are built with `matplotlib.figure.Figure`
and the SVG canvas only: pyplot (and any GUI backend) is never imported. Text stays text
(`svg.fonttype = "none"`), so the numbers in a chart can be read from the page. Does not own: the
figures' data (`figures`) or the page around them (`page`).
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timedelta
from typing import Any

from batchv4.errors import UserError

SEGMENTS = (("miss_usd", "cache-miss input", "#d62728"), ("hit_usd", "cache-hit input", "#2ca02c"),
            ("output_usd", "output", "#1f77b4"), ("other_usd", "other", "#7f7f7f"))


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--html needs matplotlib: pip install 'batchv4[report]'") from None
    from matplotlib.figure import Figure

    return matplotlib, Figure


def usd(v: float | None) -> str:
    return "n/a" if v is None else (f"${v:,.2f}" if v >= 100 else f"${v:.6g}")


def _svg(fig) -> str:
    matplotlib, _ = require_matplotlib()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "batchv4", "svg.image_inline": True}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML declaration or doctype


def _figure(w: float, h: float):
    _, Figure = require_matplotlib()
    fig = Figure(figsize=(w, h), dpi=100)
    return fig


def cost_bars(entries: list[dict[str, Any]], xlabel: str = "USD") -> str:
    """Horizontal stacked bars, one per quote (`label`, `split`, `cost_usd`), total at the end."""
    entries = [e for e in entries if e.get("cost_usd") is not None]
    fig = _figure(9, 0.45 * len(entries) + 1.4)
    ax = fig.add_subplot()
    names = [e["label"] for e in entries]
    y = list(range(len(entries)))[::-1]
    left = [0.0] * len(entries)
    for key, label, color in SEGMENTS:
        vals = [(e.get("split") or {}).get(key, 0.0) if e.get("split") else (e["cost_usd"] if key == "miss_usd"
                                                                              else 0.0) for e in entries]
        if key == "other_usd" and not any(abs(v) > 1e-15 for v in vals):
            continue
        ax.barh(y, vals, left=left, color=color, label=label, height=0.6)
        left = [a + b for a, b in zip(left, vals)]
    top = max([e["cost_usd"] for e in entries] or [0.0]) or 1.0
    for i, e in enumerate(entries):
        t = ax.text(e["cost_usd"] + top * 0.01, y[i], usd(e["cost_usd"]), va="center", fontsize=8)
        t.set_gid(f"total-{i}")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(xlabel)
    ax.legend(loc="lower right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _grid(first: datetime, costs: list[float], tz) -> tuple[list[str], list[list[float]]]:
    cells: dict[tuple[Any, int], float] = {}
    for h, c in enumerate(costs):
        local = (first + timedelta(hours=h)).astimezone(tz)
        cells.setdefault((local.date(), local.hour), c)
    days = sorted({d for d, _ in cells})
    rows = [[cells.get((d, hr), math.nan) for hr in range(24)] for d in days]
    return [d.strftime("%a %m-%d") for d in days], rows


def calendar(cal: dict[str, Any], zones: list[tuple[str, Any]]) -> str:
    """The week of start hours in each time zone of `zones` (name, tzinfo), coloured by the job's
    price if started then; the cheapest window's start hour marked."""
    first = datetime.fromisoformat(cal["first_hour"])
    fig = _figure(9.5, 2.9 * len(zones))
    lo, hi = min(cal["cost_usd"]), max(cal["cost_usd"])
    cheap = datetime.fromisoformat(cal["cheapest"]["start"])
    mesh = None
    for i, (name, tz) in enumerate(zones):
        ax = fig.add_subplot(len(zones), 1, i + 1)
        labels, rows = _grid(first, cal["cost_usd"], tz)
        mesh = ax.pcolormesh(rows, cmap="RdYlGn_r", vmin=lo, vmax=hi if hi > lo else lo + 1e-12,
                             edgecolors="white", linewidth=0.5)
        ax.set_yticks([r + 0.5 for r in range(len(labels))], labels, fontsize=7)
        ax.set_xticks([h + 0.5 for h in range(0, 24, 2)], [f"{h:02d}" for h in range(0, 24, 2)], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"start hour, {name}", fontsize=9)
        c = cheap.astimezone(tz)
        if c.strftime("%a %m-%d") in labels:
            ax.text(c.hour + 0.5, labels.index(c.strftime("%a %m-%d")) + 0.5, "★", ha="center", va="center",
                    fontsize=9)
    if mesh is not None:
        cb = fig.colorbar(mesh, ax=fig.axes, shrink=0.8)
        cb.set_label("USD if started then", fontsize=8)
        cb.solids.set_rasterized(False)  # vector: no embedded image
    return _svg(fig)


def histogram(hist: dict[str, Any], measured: bool) -> str:
    """Rows per prompt-length bin, and the share of each bin's prompt tokens served from cache."""
    fig = _figure(9, 3.2)
    ax = fig.add_subplot()
    labels = [f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}" for lo, hi in zip(hist["lo"], hist["hi"])]
    x = list(range(len(labels)))
    ax.bar(x, hist["rows"], color="#1f77b4", label="rows")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("rows")
    ax.set_xlabel("prompt tokens per row")
    ax2 = ax.twinx()
    share = [h / t if t else 0.0 for h, t in zip(hist["cache_hit_tokens"], hist["prompt_tokens"])]
    ax2.plot(x, share, color="#ff7f0e", marker="o", label="cache share")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel(("measured" if measured else "predicted") + " share from cache")
    ax.spines[["top"]].set_visible(False)
    return _svg(fig)


def timeline(tl: dict[str, Any]) -> str:
    """Computed tokens per second and the cache-hit rate over the run's time."""
    fig = _figure(9, 3.0)
    ax = fig.add_subplot()
    x = [s / 60 for s in tl["slice_start_seconds"]]
    ax.step(x, [v or 0.0 for v in tl["tokens_per_second"]], where="post", color="#1f77b4")
    ax.set_xlabel("minutes since the first finished row")
    ax.set_ylabel("computed tokens / s", color="#1f77b4")
    ax2 = ax.twinx()
    ax2.plot(x, [math.nan if v is None else v for v in tl["cache_hit_rate"]], color="#2ca02c", marker=".")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("cache-hit rate", color="#2ca02c")
    return _svg(fig)


def bars(labels: list[str], values: list[float], xlabel: str) -> str:
    """Plain horizontal bars with their values written at the ends."""
    fig = _figure(9, 0.4 * len(labels) + 1.2)
    ax = fig.add_subplot()
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color="#9467bd", height=0.6)
    top = max(values or [1]) or 1
    for yi, v in zip(y, values):
        ax.text(v + top * 0.01, yi, f"{v:,.4g}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)
