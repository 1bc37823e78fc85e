"""Concurrent against sequential evaluation, through the real HTTP path, with a fixed LLM latency.

Serves the simulated LLM over HTTP with a fixed delay per call and scores the same
prompt on the same examples with the `openai` backend at several concurrency limits.
All figures come from one run; the speedup is the ratio of wall times in that run.

    python -m tests.benchmarks.bench_eval_concurrency --latency-ms 100 --examples 64 --concurrency 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.sim.server import make_server
from tests.support.settings_helpers import endpoint


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--out", default="bench_eval_concurrency.json")
    args = parser.parse_args(argv)

    server = make_server(port=0, latency_ms=args.latency_ms)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    task = get_task("object_counting")
    examples = generate(task.name, args.examples, seed=0)
    rows = []
    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            settings = endpoint(backend="openai", base_url=url, model="sim", concurrency=concurrency)
            times = []
            for _ in range(args.repeats):
                engine = make_engine(settings)
                started = time.perf_counter()
                scores = evaluate_prompt(engine, task, task.start_prompt, examples)
                times.append(time.perf_counter() - started)
                usage = engine.take_usage()
            median = statistics.median(times)
            rows.append({"concurrency": concurrency, "seconds": median, "requests_per_s": len(examples) / median,
                         "tokens_per_s": (usage.prompt_tokens + usage.completion_tokens) / median,
                         "accuracy": scores.accuracy})
    finally:
        server.shutdown()
        server.server_close()
    sequential = rows[0]["seconds"]
    print(f"{len(examples)} examples, {args.latency_ms:.0f} ms per call, median of {args.repeats} runs")
    print(f"{'concurrency':>11}  {'seconds':>8}  {'ideal s':>7}  {'req/s':>7}  {'speedup':>8}  {'ideal':>6}")
    for row in rows:
        row["speedup"] = sequential / row["seconds"]
        # perfect overlap: ceil(n / c) waves of one latency each, against n sequential calls
        row["ideal_speedup"] = len(examples) / -(-len(examples) // row["concurrency"])
        row["ideal_seconds"] = -(-len(examples) // row["concurrency"]) * args.latency_ms / 1000
        print(f"{row['concurrency']:>11}  {row['seconds']:>8.2f}  {row['ideal_seconds']:>7.2f}  {row['requests_per_s']:>7.1f}  "
              f"{row['speedup']:>7.2f}x  {row['ideal_speedup']:>5.1f}x")
    result = {"latency_ms": args.latency_ms, "examples": len(examples), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
