"""How long a ClientApp takes to start, beyond Python's own start-up.

A SuperNode starts a ClientApp process for its runs, and every second spent importing
is a second before the first LLM call. Each measurement is a fresh interpreter started
as a subprocess, repeated, and the median is reported:

- ``python -c pass``: the interpreter alone (the floor);
- ``import flwr.clientapp``: what Flower itself costs, which no ClientApp can avoid;
- ``import client_app.client_app``: our ClientApp module, with the core, TextGrad and
  everything they pull in;
- a first message: the same import, then one real ``train`` message (one local step on
  the simulated LLM) handled by the real ClientApp, timed inside the child.

One ``python -X importtime`` run of the ClientApp import then says where the time goes
(the largest packages by cumulative import time), and whether the real ``litellm``
was imported (``textgrad_import`` keeps it out). The machine may be shared: the load
average at start and end is recorded next to the figures.

    python -m tests.benchmarks.bench_startup --runs 7 --out bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

# Runs in the child: import the ClientApp, hand it one train message, print the timings as JSON.
FIRST_MESSAGE = """
import time
started = time.perf_counter()
import client_app.client_app as module
imported = time.perf_counter()
import json, sys, tomllib
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
with open("pyproject.toml", "rb") as handle:
    run_config = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
run_config.update({"local-steps": 1, "client-val-eval": False})
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.run.messages import REQUEST_RECORD, RoundRequest
prompt = get_task(run_config["task"]).start_prompt
request = RoundRequest(phase="train", server_round=1, prompt=prompt)
message = Message(content=RecordDict({REQUEST_RECORD: ConfigRecord(request.encode())}),
                  message_type=MessageType.TRAIN, dst_node_id=100)
context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config=run_config)
built = time.perf_counter()
reply = module.app(message, context)
answered = time.perf_counter()
if reply.has_error():
    sys.exit(f"the ClientApp answered with an error: {reply.error.reason}")
litellm = sys.modules.get("litellm")
print(json.dumps({"import_s": imported - started, "first_message_s": answered - built,
                  "real_litellm_imported": bool(getattr(litellm, "__file__", None)),
                  "textgrad_imported": "textgrad" in sys.modules, "openai_imported": "openai" in sys.modules}))
"""

COMMANDS = {
    "python -c pass": "pass",
    "import flwr.clientapp": "import flwr.clientapp",
    "import client_app.client_app": "import client_app.client_app",
}


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        sys.exit(f"bench_startup: {code.strip().splitlines()[0]!r} failed:\n{done.stderr[-2000:]}")
    return done


def wall_seconds(code: str) -> float:
    started = time.perf_counter()
    _run(code)
    return time.perf_counter() - started


def largest_imports(top: int) -> tuple[list[dict], bool]:
    """The top-level packages with the largest cumulative import time, from ``-X importtime``."""
    stderr = _run("import client_app.client_app", "-X", "importtime").stderr
    packages: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit():
            continue  # the header line
        root = name.split(".")[0]
        if name == root:  # a package's own line holds the cumulative time of everything under it
            packages[root] = max(packages.get(root, 0), int(cumulative))
    rows = sorted(packages.items(), key=lambda item: -item[1])[:top]
    litellm_real = any(line.rstrip().endswith("| litellm") or "| litellm." in line for line in stderr.splitlines())
    return [{"package": name, "cumulative_s": us / 1e6} for name, us in rows], litellm_real


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per measurement; the median is kept")
    parser.add_argument("--top", type=int, default=8, help="largest imports to list")
    parser.add_argument("--out", default="bench_startup.json")
    args = parser.parse_args(argv)
    if args.runs < 1:
        sys.exit("bench_startup: --runs must be at least 1")

    load_before = os.getloadavg()[0]
    _run("import client_app.client_app")  # warm the file cache and any .pyc compilation first
    samples: dict[str, list[float]] = {label: [] for label in COMMANDS}
    first_message: list[dict] = []
    for run in range(args.runs):  # interleaved, so a burst of load hits every measurement alike
        for label, code in COMMANDS.items():
            samples[label].append(wall_seconds(code))
        started = time.perf_counter()
        timings = json.loads(_run(FIRST_MESSAGE).stdout.strip().splitlines()[-1])
        timings["process_s"] = time.perf_counter() - started
        first_message.append(timings)
        print(f"run {run + 1}/{args.runs} done", flush=True)
    imports, litellm_real = largest_imports(args.top)
    load_after = os.getloadavg()[0]

    floor = statistics.median(samples["python -c pass"])
    rows = [{"what": label, "median_s": statistics.median(values), "min_s": min(values),
             "beyond_python_s": statistics.median(values) - floor} for label, values in samples.items()]
    process = statistics.median(t["process_s"] for t in first_message)
    rows.append({"what": "import + first train message (process)", "median_s": process,
                 "min_s": min(t["process_s"] for t in first_message), "beyond_python_s": process - floor})
    inside = {key: statistics.median(t[key] for t in first_message) for key in ("import_s", "first_message_s")}

    print(f"\nClientApp start-up, median of {args.runs} fresh interpreters "
          f"(load average {load_before:.1f} before, {load_after:.1f} after, {os.cpu_count()} cores)")
    print(f"{'':<42}  {'median s':>8}  {'min s':>6}  {'beyond python s':>15}")
    for row in rows:
        print(f"{row['what']:<42}  {row['median_s']:>8.3f}  {row['min_s']:>6.3f}  {row['beyond_python_s']:>15.3f}")
    print(f"inside the child: import {inside['import_s']:.3f} s, first train message "
          f"(1 local step, sim) {inside['first_message_s']:.3f} s")
    print("largest imports of the ClientApp (cumulative, one -X importtime run; a package's time includes "
          "the packages it imports):")
    for item in imports:
        print(f"  {item['package']:<20} {item['cumulative_s']:.3f} s")
    print(f"real litellm imported: {'yes' if litellm_real else 'no'}; after a first sim message: "
          f"textgrad {'yes' if first_message[-1]['textgrad_imported'] else 'no'}, "
          f"openai {'yes' if first_message[-1]['openai_imported'] else 'no'}")

    result = {"python": platform.python_version(), "cores": os.cpu_count(), "runs": args.runs,
              "load_average": {"before": load_before, "after": load_after}, "rows": rows,
              "in_child_median_s": inside, "largest_imports": imports, "real_litellm_imported": litellm_real,
              "first_message_modules": {k: first_message[-1][k] for k in ("textgrad_imported", "openai_imported")}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
