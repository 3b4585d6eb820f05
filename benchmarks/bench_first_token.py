"""Time to the first generated token of `run`, the engine built beside the reading against after it.

Run:  python benchmarks/bench_first_token.py [--rows 200000] [--repeats 1]

A checkpoint folder of the `tiny` geometry (seeded weights, bf16, official layout) and a JSONL of
document-question prompts are written to a temporary folder. The same `run` job then goes twice
per repeat, alternating: with `build_beside_reading=True` (the default: the engine is built in a
thread once the first row to generate is known, while the rest of the input is read, tokenized
and planned) and with it False (built after the plan has read the whole input). Both sides do the
same work up to the first output: read and tokenize every row (the planner needs them all before
its first request), load the checkpoint, generate the first request's one token (max_tokens 1).
The engine stops the job at its first output; the time from `run()`'s start to that output is
the figure. The machine's two cores are shared by the reading and the load, so the saving is at
most the shorter of the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pipeline import make_rows, write_jsonl  # noqa: E402


class _First(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import torch

    from batchv4.config import ModelConfig
    from batchv4.model.checkpoint import save_official_checkpoint
    from batchv4.model.model import Transformer
    from batchv4.pipelines import run as run_mod
    from batchv4.pipelines.run import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.load("tiny")
        ckpt = os.path.join(tmp, "ckpt")
        save_official_checkpoint(Transformer.random(cfg, 0).to(torch.bfloat16), cfg, ckpt)
        src = os.path.join(tmp, "in.jsonl")
        write_jsonl(src, make_rows(args.rows))
        times: dict[bool, list[float]] = {True: [], False: []}
        builds: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.repeats):
            for beside in (True, False):
                t0 = time.perf_counter()
                built = []

                def factory(c):
                    t = time.perf_counter()
                    llm = run_mod._default_llm(c)
                    built.append(time.perf_counter() - t)

                    class Stop:
                        def generate_stream(self, requests):
                            for out in llm.generate_stream(requests):
                                times[beside].append(time.perf_counter() - t0)
                                raise _First()
                            yield  # pragma: no cover

                        def stats(self):
                            return llm.stats()
                    return Stop()

                out = os.path.join(tmp, f"out-{rep}-{beside}")
                try:
                    run_mod.run(RunConfig(input=src, output=out, model=ckpt, max_tokens=1, quiet=True, device="cpu"),
                                llm_factory=factory, build_beside_reading=beside)
                except _First:
                    pass
                builds[beside].append(built[0])
                print(f"repeat {rep} beside={beside}: first output {times[beside][-1]:.1f} s "
                      f"(engine build {built[0]:.1f} s)", flush=True)
        a, b = statistics.median(times[True]), statistics.median(times[False])
        print(f"\n| engine built | rows | first output s (median) | engine build s |\n|---|---|---|---|")
        print(f"| beside the reading | {args.rows:,} | {a:.1f} | {statistics.median(builds[True]):.1f} |")
        print(f"| after the reading | {args.rows:,} | {b:.1f} | {statistics.median(builds[False]):.1f} |")
        print(f"\nsaving: {b - a:.1f} s ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
