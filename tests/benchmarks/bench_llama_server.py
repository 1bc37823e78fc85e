"""Completion speed of the real llama.cpp server (SmolLM2-135M), sequential and concurrent.

Starts the server exactly as the real-LLM tests do (``tests/llama_server.py``), sends
the same kind of short requests the federation sends (an object-counting question
under the start prompt) through the project's ``openai`` engine, first one at a time
and then with several in flight, and reports completion tokens per second from the
API's usage field. llama-cpp-python's server runs one completion at a time, so
concurrency is expected to queue, not to speed up. The machine's load average is
recorded with the figures: on a shared 2-core machine it moves them a lot.

    python -m tests.benchmarks.bench_llama_server --requests 8 --concurrency 1,4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from fedtextgrad_core.method.evaluation import answer_all
from fedtextgrad_core.llm.engine import EndpointSettings, make_engine
from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import get_task
from tests.llama_server import N_CTX, missing_requirement, start_llama_server

HERE = Path(__file__).resolve().parent


def measure(url: str, alias: str, questions: list[str], prompt: str, concurrency: int, max_tokens: int) -> dict:
    engine = make_engine(EndpointSettings(backend="openai", base_url=url, model=alias, max_tokens=max_tokens,
                                          timeout=300.0, concurrency=concurrency, max_retries=0))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    replies = answer_all(engine, prompt, questions)
    seconds = time.perf_counter() - started
    usage = engine.take_usage()
    return {
        "concurrency": concurrency,
        "requests": len(replies),
        "seconds": round(seconds, 2),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "completion_tokens_per_s": round(usage.completion_tokens / seconds, 2),
        "total_tokens_per_s": round((usage.prompt_tokens + usage.completion_tokens) / seconds, 2),
        "mean_request_seconds": round(usage.seconds / max(1, usage.calls), 2),  # includes queueing
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per setting")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=N_CTX)
    parser.add_argument("--out", default=str(HERE / "bench_llama_server.json"))
    parser.add_argument("--log", default="", help="server log file (default: a temporary file)")
    args = parser.parse_args(argv)
    reason = missing_requirement()
    if reason:
        raise SystemExit(f"cannot benchmark the llama server: {reason}")

    task = get_task("object_counting")
    levels = [int(c) for c in args.concurrency.split(",")]
    # fresh questions for every setting: the server's prompt cache must not favour a later one
    pool = [e.question for e in generate(task.name, args.requests * len(levels) + 1, seed=7)]
    log_path = Path(args.log) if args.log else Path(tempfile.mkdtemp(prefix="bench-llama-")) / "llama-server.log"
    with start_llama_server(log_path, n_ctx=args.n_ctx) as server:
        measure(server.base_url, server.alias, pool[:1], task.start_prompt, 1, args.max_tokens)  # warm-up
        rows = []
        for i, concurrency in enumerate(levels):
            questions = pool[1 + i * args.requests: 1 + (i + 1) * args.requests]
            rows.append(measure(server.base_url, server.alias, questions, task.start_prompt, concurrency, args.max_tokens))
        command = server.command

    print(f"llama.cpp server, SmolLM2-135M-Instruct Q4_1, n_ctx {args.n_ctx}, 1 thread, "
          f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs")
    print(f"{'concurrency':>11}  {'requests':>8}  {'seconds':>7}  {'compl tok':>9}  {'compl tok/s':>11}  "
          f"{'all tok/s':>9}  {'s/request':>9}  {'load':>9}")
    for r in rows:
        before, after = r["load_average_1min"]
        load = f"{before:.1f}→{after:.1f}"
        print(f"{r['concurrency']:>11}  {r['requests']:>8}  {r['seconds']:>7.1f}  {r['completion_tokens']:>9}  "
              f"{r['completion_tokens_per_s']:>11.1f}  {r['total_tokens_per_s']:>9.1f}  "
              f"{r['mean_request_seconds']:>9.2f}  {load:>9}")
    result = {"benchmark": "llama_server", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "n_ctx": args.n_ctx,
              "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "machine": platform.machine(),
              "server_args": command[command.index("-m"):], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
