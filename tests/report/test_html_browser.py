"""`estimate --html` and `report --html` opened in headless Chromium (driven over the DevTools
protocol on a pipe, one browser for the module): no console errors, no request but the page
itself, no http(s) URL in any src or href, a screenshot that is not blank, and the numbers in the
tables and in the charts' SVG text equal to the JSON summaries'. Skips where Chromium is missing."""

import io
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "cli"))
from cdp import Browser, find_chromium  # noqa: E402
from cli_engines import EchoEngine, write_jsonl  # noqa: E402

from batchv4.report.charts import usd  # noqa: E402

pytest.importorskip("matplotlib", reason="the HTML pages need matplotlib: pip install 'batchv4[report]'")
START = datetime(2026, 9, 30, 2, tzinfo=timezone.utc)  # Wednesday 10:00 Beijing, peak; National Day ahead
DOC = "Document: " + "The Rhine rises in the Swiss Alps and reaches the North Sea. " * 12 + "\nQuestion: "


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium not found on PATH: install Debian's `chromium` package to run the HTML browser tests")
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """An estimate (its HTML, and its JSON saved with --json-out), then the run on a fast
    engine with a ticking clock, then its report (HTML and JSON)."""
    import batchv4.pipelines.run as run_mod

    tmp = tmp_path_factory.mktemp("html")
    rows = [{"id": f"r{i}", "prompt": DOC + f"question number {i}?"} for i in range(24)]
    rows += [{"id": "bad1"}, {"id": "bad2", "prompt": 3}]
    src = write_jsonl(tmp / "in.jsonl", rows)
    out = str(tmp / "out")
    est_out = cli(["estimate", src, "--json", "--json-out", str(tmp / "estimate.json"), "--html",
                   str(tmp / "estimate.html"), "--start", START.isoformat(), "--tz", "UTC", "--max-tokens", "2"])
    ticks = iter(range(10**6))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "_default_llm", lambda cfg: EchoEngine())
        mp.setattr(run_mod, "_now", lambda: START + timedelta(seconds=7 * next(ticks)))
        cli(["run", src, "-o", out, "--max-tokens", "2", "--quiet"])
    rep_out = cli(["report", out, "--json", "--html", str(tmp / "report.html"), "--tz", "Asia/Tokyo",
                   "--estimate", str(tmp / "estimate.json")])
    return {"estimate": (str(tmp / "estimate.html"), json.loads(est_out)),
            "report": (str(tmp / "report.html"), json.loads(rep_out))}


def cli(args):
    from click.testing import CliRunner

    from batchv4.cli import cli as group

    r = CliRunner().invoke(group, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def open_checked(browser, path):
    text = open(path, encoding="utf-8").read()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I), "a network URL in src/href"
    assert "<link" not in text and "@import" not in text and "<script src" not in text
    page = browser.open(path)
    assert page.console_errors == []
    assert page.requests == ["file://" + os.path.abspath(path)]
    from PIL import Image

    img = Image.open(io.BytesIO(page.screenshot())).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100 and sum(1 for n in img.histogram() if n) > 20, "blank screenshot"
    return page


def chart_texts(page, chart):
    return page.eval(f"[...document.querySelectorAll('#{chart} svg text')].map(t => t.textContent)")


def cost_cells(page):
    return page.eval("[...document.querySelectorAll('td[data-card]')].map(td => "
                     "[td.dataset.card, td.dataset.window, Number(td.dataset.usd), td.textContent])")


def check_costs(page, quotes):
    cells = cost_cells(page)
    want = [[q["card"], q["window"] or "", q["cost_usd"]] for q in quotes if q["cost_usd"] is not None]
    assert [c[:3] for c in cells] == want
    texts = chart_texts(page, "cost-chart")
    for q in quotes:
        assert usd(q["cost_usd"]) in texts, q
    # the split of each bar adds up to its total
    splits = page.eval("[...document.querySelectorAll('td[data-card]')].map(td => [...td.parentElement"
                       ".querySelectorAll('td[data-usd]')].slice(0, 3).map(c => Number(c.dataset.usd)))")
    for s, q in zip(splits, [q for q in quotes if q["cost_usd"] is not None]):
        assert sum(s) == pytest.approx(q["cost_usd"], rel=1e-9)


def test_estimate_page(browser, pages):
    path, res = pages["estimate"]
    page = open_checked(browser, path)
    check_costs(page, res["compare"])
    assert page.eval("JSON.parse(document.getElementById('batchv4-data').textContent).cost_usd") == res["cost_usd"]
    cheap = page.eval("Object.assign({}, document.getElementById('cheapest').dataset)")
    cal = res["calendar"]["cheapest"]
    assert cheap["start"] == cal["start"] and float(cheap["usd"]) == cal["cost_usd"]
    assert float(cheap["savingUsd"]) == cal["saving_usd"] and cal["saving_usd"] > 0
    hist = page.eval("[...document.querySelectorAll('td[data-rows]')].map(td => Number(td.dataset.rows))")
    assert hist == res["prompt_tokens_histogram"]["rows"]
    assert any("Beijing" in t for t in chart_texts(page, "calendar-chart"))
    page.close()


def test_report_page(browser, pages):
    path, summary = pages["report"]
    _, est = pages["estimate"]
    page = open_checked(browser, path)
    check_costs(page, summary["compare"])
    assert float(page.eval("document.getElementById('cost').dataset.usd")) == summary["totals"]["cost_usd"]
    values = page.eval("[...document.querySelectorAll('td[data-value]')].map(td => Number(td.dataset.value))")
    t = summary["totals"]
    assert values[1::2] == [t["prompt_tokens"], t["api_cache_hit_tokens"], t["completion_tokens"], t["cost_usd"]]
    assert values[0] == est["tokens"]["prompt_tokens"] and values[6] == est["cost_usd"]["expected"]
    errors = page.eval("[...document.querySelectorAll('#errors-chart ~ table td[data-rows]')]"
                       ".map(td => Number(td.dataset.rows))")
    assert sum(errors) == summary["counts"]["error_rows"] == 2
    assert page.eval("document.querySelectorAll('#timeline-chart svg').length") == 1
    page.close()
