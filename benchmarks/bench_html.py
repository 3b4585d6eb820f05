"""The HTML page of a 1-million-row estimate: its size and the time to produce it.

Writes a JSONL of short prompts (default 1,000,000 rows) into a temp dir, runs the estimate
(`batchv4.pipelines.estimate`) once without and once with the HTML page, and prints both times,
the page's share of the time and its size. Usage: python benchmarks/bench_html.py [ROWS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone


def main(rows: int = 1_000_000) -> None:
    from batchv4.pipelines.estimate import EstimateConfig, estimate
    from batchv4.report.page import estimate_page, write

    start = datetime(2026, 12, 2, 2, tzinfo=timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "prompt": f"Summarize item {i} of the list in one line."}) + "\n")
        cfg = EstimateConfig(input=src, max_tokens=64)
        t0 = time.perf_counter()
        estimate(cfg, now=start)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = estimate(cfg, now=start)
        est = time.perf_counter() - t0
        t1 = time.perf_counter()
        page = os.path.join(tmp, "estimate.html")
        write(page, estimate_page(res, "UTC"))
        html = time.perf_counter() - t1
        size = os.path.getsize(page)
    total = est + html
    print(f"rows {rows:,}: estimate without html {plain:.1f} s; with html {total:.1f} s "
          f"(estimate {est:.1f} s + page {html:.2f} s, {html / total:.1%} of it); page {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
