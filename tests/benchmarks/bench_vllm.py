"""vLLM on this CPU (deploy/vllm-cpu.sh) beside `fedtextgrad serve` (llama.cpp) on the same GGUF file.

What it costs to get vLLM here and what it gives: the install time (the script's marker of the last
complete install, or a fresh install into a temporary venv with ``--fresh-install``), the conversion
time (the model folder's marker, or a fresh one with ``--fresh-convert``), the time from ``serve`` to
``GET /v1/models`` answering, the resident memory of the server and every process it started (read
from /proc, after the measurements), and completion tokens/s with 1 and 4 requests in flight, through
the project's endpoint bench (:class:`fedtextgrad_core.tools.endpoint_bench.EndpointBench`: the same
``openai`` client and error sorting as a federated run). Then the same for ``fedtextgrad serve`` on
the very GGUF file vLLM's folder was converted from. The 1-minute load average is recorded per
cell: on a shared 2-core machine it moves the figures a lot.

    python -m tests.benchmarks.bench_vllm
    python -m tests.benchmarks.bench_vllm --fresh-install --fresh-convert --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtextgrad_core.tools.endpoint_bench import DEFAULT_PROMPT, EndpointBench, parse_concurrency
from fedtextgrad_core.tools.serve import serving
from tests.support.vllm_server import (
    INSTALL_TIMEOUT_SECONDS,
    MODEL_DIR,
    MODEL_NAME,
    VLLM_VERSION,
    error_line,
    free_port,
    install_seconds,
    missing_requirement,
    process_tree,
    rss_bytes,
    run_script,
    serve_args,
    start_vllm_server,
)

HERE = Path(__file__).resolve().parent
CONVERT_MARKER = "fedtextgrad-converted.txt"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _gib(value: int) -> float:
    return round(value / 2**30, 2)


def converted_from(model_dir: Path) -> tuple[Path, float | None]:
    """The GGUF file a converted folder was made from, and how long that conversion took."""
    text = (model_dir / CONVERT_MARKER).read_text()
    gguf = re.search(r"^gguf=(.*?) size=", text, re.M)
    seconds = re.search(r"^seconds=(\d+)$", text, re.M)
    if not gguf:
        raise SystemExit(f"{model_dir / CONVERT_MARKER} does not name its GGUF file")
    return Path(gguf.group(1)), float(seconds.group(1)) if seconds else None


def fresh_install() -> float:
    """A complete install into a temporary venv, timed; the venv is removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="bench-vllm-install-"))
    try:
        started = time.perf_counter()
        done = run_script(["install", "--venv", str(folder / "venv")], INSTALL_TIMEOUT_SECONDS)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"fresh install failed: {error_line(done.stdout)}")
        return seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fresh_convert(gguf: Path) -> float:
    folder = Path(tempfile.mkdtemp(prefix="bench-vllm-convert-"))
    try:
        started = time.perf_counter()
        done = run_script(["convert", "--gguf", str(gguf), "--out", str(folder / "model")], 900)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"fresh conversion failed: {error_line(done.stdout)}")
        return seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(base_url: str, model: str, levels: list[int], requests: int, max_tokens: int, prompt: str,
            pid: int, server: str) -> dict[str, Any]:
    """Every level against one server, then its memory; one dict."""
    bench = EndpointBench(base_url, model, "EMPTY", max_tokens=max_tokens, prompt=prompt, timeout=600.0)
    bench.check()  # one untimed request: warms the server
    rows = []
    for level in levels:
        before = _load()
        result = bench.measure(level, requests)
        rows.append({"load_1min": [before, _load()], **result.__dict__})
        print(f"  {server}, {level} in flight: {result.completion_tokens_per_s or 0:.1f} tok/s, "
              f"{result.errors} errors", flush=True)
    pids = process_tree(pid)
    return {"rows": rows, "rss_bytes": rss_bytes(pids), "processes": len(pids)}


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'server':<27} {'start s':>7} {'RSS GiB':>7} {'in flight':>9} {'compl tok/s':>11} {'req/s':>6} "
             f"{'p50 ms':>7} {'errors':>6} {'load 1m':>9}"]
    for server in result["servers"]:
        for row in server["rows"]:
            before, after = row["load_1min"]
            lines.append(f"{server['server']:<27} {server['start_seconds']:>7.1f} {_gib(server['rss_bytes']):>7.2f} "
                         f"{row['concurrency']:>9} {_cell(row['completion_tokens_per_s'], 1):>11} "
                         f"{row['requests_per_s']:>6.2f} {_cell(row['latency_p50_ms'], 0):>7} {row['errors']:>6} "
                         f"{before:>4.2f}>{after:<4.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-install", action="store_true",
                        help="time a complete install into a temporary venv (minutes, ~680 MB from PyPI)")
    parser.add_argument("--fresh-convert", action="store_true", help="time a conversion into a temporary folder")
    parser.add_argument("--concurrency", default="1,4", help="requests in flight per cell (default 1,4)")
    parser.add_argument("--requests", type=int, default=8, help="requests per cell (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each server (vLLM's OMP_NUM_THREADS, llama.cpp's --threads; default 1)")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="vLLM's --dtype, one server each (auto, bfloat16, float32; default bfloat16,float32)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--out", default=str(HERE / "bench_vllm.json"), help="JSON results ('' for none)")
    args = parser.parse_args(argv)
    levels = parse_concurrency(args.concurrency)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("auto", "bfloat16", "float32") for d in dtypes):
        raise SystemExit(f"--dtypes {args.dtypes!r}: a comma-separated list of auto, bfloat16, float32")
    started = time.perf_counter()

    reason = missing_requirement()  # install and convert through the script, cached
    if reason:
        raise SystemExit(f"cannot benchmark vLLM: {reason}")
    gguf, convert_seconds = converted_from(MODEL_DIR)
    install_s, install_how = install_seconds(), "the marker of the last complete install (deploy/vllm-cpu.sh)"
    if args.fresh_install:
        print("timing a fresh install into a temporary venv ...", flush=True)
        install_s, install_how = fresh_install(), "a fresh install into a temporary venv, timed now"
    convert_how = "the model folder's marker"
    if args.fresh_convert:
        print("timing a fresh conversion into a temporary folder ...", flush=True)
        convert_seconds, convert_how = fresh_convert(gguf), "a fresh conversion, timed now"

    servers = []
    for dtype in dtypes:
        print(f"vLLM {VLLM_VERSION} (vllm-cpu), {MODEL_DIR} (from {gguf.name}), dtype {dtype}, {args.threads} "
              f"thread(s) ...", flush=True)
        cwd = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
        port = free_port()
        serve = [*serve_args(port), "--threads", str(args.threads), "--dtype", dtype]
        server = start_vllm_server(cwd, serve, port=port, name=MODEL_NAME)
        try:
            chosen = re.search(r"dtype (\w+):", server.output)
            measured = measure(server.base_url, server.name, levels, args.requests, args.max_tokens, args.prompt,
                               server.pid, f"vLLM {dtype}")
            servers.append({"server": f"vLLM {VLLM_VERSION} ({chosen.group(1) if chosen else dtype})",
                            "start_seconds": server.start_seconds, **measured})
        finally:
            server.stop()
            shutil.rmtree(cwd, ignore_errors=True)

    print(f"fedtextgrad serve (llama.cpp), {gguf.name}, 4 slots, {args.threads} thread(s) ...", flush=True)
    with serving(str(gguf), parallel=max(levels), threads=args.threads, ctx=4096, quiet=True) as llama:
        measured = measure(llama.base_url, llama.alias, levels, args.requests, args.max_tokens, args.prompt,
                           llama.pid, "llama.cpp")
        servers.append({"server": "fedtextgrad serve (GGUF)", "start_seconds": llama.start_seconds, **measured})

    result = {"benchmark": "vllm", "vllm": VLLM_VERSION, "gguf": str(gguf), "threads": args.threads,
              "max_tokens": args.max_tokens, "requests": args.requests, "cpus": os.cpu_count(),
              "machine": platform.machine(), "install": {"seconds": install_s, "how": install_how},
              "convert": {"seconds": convert_seconds, "how": convert_how}, "servers": servers,
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"\n{gguf.name}, max_tokens {args.max_tokens}, {args.requests} requests per cell, {args.threads} server "
          f"thread(s), {os.cpu_count()} CPUs")
    print(f"vLLM install: {_cell(install_s, 0)} s ({install_how}); conversion to bf16 safetensors: "
          f"{_cell(convert_seconds, 0)} s ({convert_how})")
    print(format_report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
