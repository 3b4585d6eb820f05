"""The data behind the HTML pages: histogram bins, the week calendar against brute force over all
hours, the schedule, throughput from an earlier run, and the planning options' errors."""

import json
import os
import sys
from datetime import datetime, timedelta, timezone

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli"))
from cli_engines import run_main, write_jsonl  # noqa: E402

from batchv4.accounting.cards import get_card  # noqa: E402
from batchv4.accounting.summary import Totals, cheapest_window, price_totals  # noqa: E402
from batchv4.report.figures import TokenHistogram, schedule, throughput_from, week_calendar  # noqa: E402

UTC = timezone.utc
JOB = Totals(rows=1000, prompt_tokens=2_000_000, prompt_cache_hit_tokens=500_000, prompt_cache_miss_tokens=1_500_000,
             completion_tokens=300_000)


def test_histogram_bins():
    h = TokenHistogram()
    for n, hit in [(0, 0), (1, 0), (5, 0), (7, 4), (8, 0), (1000, 512)]:
        h.add(n, hit)
    d = h.to_dict()
    assert d["lo"] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert d["rows"] == [1, 1, 0, 2, 1, 0, 0, 0, 0, 0, 1]
    assert d["prompt_tokens"][3] == 12 and d["cache_hit_tokens"][3] == 4 and d["max_prompt_tokens"] == 1000


@pytest.mark.parametrize("start", [
    datetime(2026, 9, 28, 2, tzinfo=UTC),   # Monday 10:00 Beijing, peak, the week of National Day
    datetime(2026, 12, 4, 7, tzinfo=UTC),   # Friday 15:00 Beijing, peak, a weekend ahead
])
def test_cheapest_window_is_the_brute_force_one(start):
    card = get_card("deepseek-v4-flash")
    hourly = [price_totals(JOB, card, start + timedelta(hours=h)) for h in range(168)]
    best = min(hourly)
    first = hourly.index(best)
    w = cheapest_window(JOB, card, start)
    assert w.cost_usd == best
    assert w.start == start + timedelta(hours=first)
    assert all(c > best for c in hourly[:first])
    cal = week_calendar(JOB, card, start)
    assert cal["cost_usd"] == hourly
    assert cal["cheapest"]["start"] == w.start.isoformat()
    assert cal["cheapest"]["saving_usd"] == pytest.approx(hourly[0] - best)


def test_schedule_ends_inside_or_not():
    card = get_card("deepseek-v4-flash")
    start = datetime(2026, 12, 2, 10, tzinfo=UTC)  # Wednesday 18:00 Beijing: off-peak until 01:00 UTC
    s = schedule(JOB, card, start, 3_600_000, 1000.0, "--throughput")
    assert s["duration_seconds"] == 3600 and s["ends_inside_window"] is True and s["window"]["peak"] is False
    s = schedule(JOB, card, start, 3_600_000 * 16, 1000.0, "--throughput")
    assert s["ends_inside_window"] is False
    assert schedule(JOB, card, start, 10, None, None)["duration_seconds"] is None


def test_throughput_from_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"this_run": {"tokens_per_second": 1234.5}}))
    assert throughput_from(str(tmp_path))[0] == 1234.5
    with pytest.raises(ValueError, match="no batchv4 run"):
        throughput_from(str(tmp_path / "none"))


@pytest.mark.parametrize("args,message", [
    (["--start", "tomorrow"], "--start 'tomorrow' is not an ISO time"),
    (["--html", "x.html", "--tz", "Mars/Base"], "unknown time zone 'Mars/Base'"),
    (["--throughput", "5", "--throughput-from", "x"], "give --throughput or --throughput-from, not both"),
])
def test_planning_option_errors(tmp_path, capsys, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    code, _, err = run_main(["estimate", src, *args], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_estimate_start_and_throughput(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(5)])
    code, out, _ = run_main(["estimate", src, "--json", "--start", "2026-12-05T10:00:00+08:00",
                             "--throughput", "100"], capsys)
    res = json.loads(out)
    assert code == 0 and res["start"] == "2026-12-05T10:00:00+08:00"
    s = res["schedule"]
    assert s["duration_seconds"] == pytest.approx(s["job_tokens"] / 100) and s["window"]["peak"] is False
    assert sum(res["prompt_tokens_histogram"]["rows"]) == 5


def test_html_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    code, _, err = run_main(["estimate", src, "--html", str(tmp_path / "e.html")], capsys)
    assert code == 1 and "pip install 'batchv4[report]'" in err
    assert not (tmp_path / "e.html").exists()
