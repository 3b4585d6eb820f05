"""HTML reports of `estimate --html` and `report --html`: self-contained pages with charts.

Modules: `figures` (the data behind the charts, plain Python: streaming prompt-token histogram,
week calendar of a job's price, cost split per card, schedule, a run's timeline and error reasons),
`charts` (matplotlib, SVG canvas only, rendered to inline SVG with text kept as text) and `page`
(the HTML). matplotlib is an extra: `pip install 'batchv4[report]'`; only `--html` needs it.
Does not own: prices and windows (`batchv4.accounting`) or the text tables (the CLI commands).
"""
