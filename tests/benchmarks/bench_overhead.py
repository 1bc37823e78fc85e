"""Overhead against the ideal, and speedup against the sequential baseline (issue 5, benchmarks 1 and 2).

Serves the simulated LLM over real HTTP with a fixed latency per call, one server
process per client and one for the ServerApp's summariser, and runs the real ServerApp
(PromptStrategy) against the real ClientApp, its messages delivered in-process as
real Flower Messages:

- concurrent: clients at the same time, ``llm-concurrency`` requests in flight per client;
- sequential baseline, as the paper's reference code works: clients one after another,
  batch items one after another, evaluation one request at a time (concurrency 1).

Each server logs its calls, so the ideal wall time is rebuilt from what actually
happened (``critical_path.py``): the longest chain of calls that must come one after
another, times the latency. Printed: measured / ideal (target <= 1.10), and the
measured speedup over the baseline against the ideal speedup (target >= 0.80 of it).
With ``--flwr`` the same federation also runs in Flower's simulation (``flwr run``),
with its start-up reported apart from the federation itself.

    python -m tests.benchmarks.bench_overhead --latency-ms 200 --rounds 2 --repeats 3 [--flwr]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from fedtextgrad_core.run.client_round import NodeIdentity, load_client_data
from fedtextgrad_core.run.messages import REQUEST_RECORD, RoundRequest
from fedtextgrad_core.run.settings import RunSettings
from server_app.server_app import app as server_app
from tests.benchmarks.critical_path import (
    SERVER,
    Call,
    Figures,
    Phase,
    Structure,
    Window,
    figures,
    phases,
    read_call_log,
    server_extra,
)
from tests.benchmarks.sim_fleet import SimFleet
from tests.support.deployment_helpers import QUIET_ENV, cmdline, kill_pids
from tests.support.flower_loopback import ROOT, LoopbackGrid, default_run_config

FLWR_LOCK = "/tmp/fedtextgrad-flwr.lock"
FLWR_TIMEOUT_SECONDS = 900
CALL_KINDS = ("answer", "feedback", "rewrite", "merge")


class TimedGrid(LoopbackGrid):
    """The loopback grid, also noting when each send-and-wait started and ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows: list[Window] = []

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        messages = list(messages)
        kind = str(messages[0].metadata.message_type) if messages else "none"
        request = RoundRequest.decode(messages[0].content[REQUEST_RECORD]) if messages else None
        split = f" {request.kind.data_split}" if request is not None and kind != "train" else ""
        label = f"round {request.server_round if request is not None else '?'} {kind}{split}"
        start = time.time()
        replies = super().send_and_receive(messages, timeout)
        self.windows.append(Window(label, "train" if kind == "train" else "evaluate", start, time.time()))
        return replies


@dataclass
class RunOutcome:
    mode: str
    figures: Figures
    phases: list[Phase]
    calls_by_kind: dict[str, int]
    best_prompt: str
    test_accuracy: float | None


def clients(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def run_config_for(args: argparse.Namespace, concurrency: int, results: Path, name: str,
                   server_url: str, client_url: str = "") -> dict[str, object]:
    """The run config of one benchmark run: pyproject defaults, the benchmark's overrides."""
    config = default_run_config(**{
        "num-server-rounds": args.rounds, "llm-concurrency": concurrency,
        "server-backend": "openai", "server-base-url": server_url, "server-model": "sim",
        "results-dir": str(results), "run-name": name,
    })
    if client_url:
        config.update({"llm-backend": "openai", "llm-base-url": client_url, "llm-model": "sim"})
    return config


def structure_for(args: argparse.Namespace, run_config: dict[str, object], concurrency: int) -> Structure:
    """Batch and validation sizes as the clients see them (their own data partitions)."""
    settings = RunSettings.from_config(run_config)
    val_sizes, batch = {}, settings.local.batch_size
    for label in clients(args.clients):
        data = load_client_data(settings, NodeIdentity(int(label), args.clients))
        val_sizes[label] = len(data.val) if settings.client_val_eval else 0
        batch = min(batch, len(data.train))
    return Structure(args.latency_ms / 1000, concurrency, batch, val_sizes)


def read_calls(fleet: SimFleet) -> list[Call]:
    return [call for name, path in fleet.logs.items() for call in read_call_log(path, name)]


def count_kinds(calls: list[Call]) -> dict[str, int]:
    return {kind: sum(c.kind == kind for c in calls) for kind in CALL_KINDS}


def run_loopback(args: argparse.Namespace, fleet: SimFleet, mode: str, results: Path, name: str) -> RunOutcome:
    """One federation through the real ServerApp and ClientApp, clients in parallel or in turn."""
    concurrent = mode == "concurrent"
    concurrency = args.concurrency if concurrent else 1
    run_config = run_config_for(args, concurrency, results, name, fleet.urls[SERVER])
    nodes = {int(label): {"llm-backend": "openai", "llm-base-url": fleet.urls[label], "llm-model": "sim"}
             for label in clients(args.clients)}
    grid = TimedGrid(run_config, num_nodes=args.clients, node_overrides=nodes, parallel=concurrent)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with (results / f"{name}.out").open("w") as out, contextlib.redirect_stdout(out):
        start = time.time()
        server_app(grid, context)
        end = time.time()
    calls = [c for c in read_calls(fleet) if start <= c.start < end]
    structure = structure_for(args, run_config, concurrency)
    run_phases = phases(calls, grid.windows, structure, start, end)
    summary = json.loads((results / name / "summary.json").read_text())
    if not summary.get("finished"):
        raise RuntimeError(f"the {mode} run did not finish: {summary.get('error')}")
    return RunOutcome(mode, figures(calls, run_phases, structure, start, end), run_phases, count_kinds(calls),
                      summary["best_prompt"], summary["test_accuracy"])


# --- the same federation in Flower's simulation ------------------------------------------

def _superlinks_of(flwr_home: Path) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and "flower-superlink" in (line := cmdline(int(p.name))) and str(flwr_home) in line]


def run_flwr(args: argparse.Namespace, fleet: SimFleet, results: Path, name: str, shared: str) -> dict:
    """``flwr run . local`` (under the shared lock); all clients share one sim server here,
    since simulated SuperNodes cannot each be given their own endpoint."""
    config = run_config_for(args, args.concurrency, results, name, fleet.urls[SERVER], fleet.urls[shared])
    changed = default_run_config()
    overrides = " ".join(f"{k}={v!r}" for k, v in config.items() if changed.get(k) != v)  # str or int values
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=results))
    env = dict(os.environ, FLWR_HOME=str(flwr_home), **QUIET_ENV)
    # the lock may be held by another run for minutes: note when it was acquired
    command = ["flock", FLWR_LOCK, "sh", "-c", 'echo "lock acquired at $(date +%s.%N)"; exec "$@"', "sh",
               "flwr", "run", ".", "local", "--stream",
               "--federation-config", args.flwr_federation_config, "--run-config", overrides]
    try:
        start = time.time()
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=FLWR_TIMEOUT_SECONDS)
        end = time.time()
    finally:
        pids = _superlinks_of(flwr_home)
        kill_pids(pids, 15)
    (results / f"{name}.out").write_text(done.stdout + done.stderr)
    summary_path = results / name / "summary.json"
    if not summary_path.exists() or not json.loads(summary_path.read_text()).get("finished"):
        raise RuntimeError(f"the flwr run did not finish; its output is in {results / f'{name}.out'}:\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    calls = [c for c in read_calls(fleet) if start <= c.start < end]
    rounds = [json.loads(line) for line in (results / name / "rounds.jsonl").read_text().splitlines()]
    first, last = min(c.start for c in calls), max(c.end for c in calls)
    acquired = re.search(r"lock acquired at ([0-9.]+)", done.stdout)
    locked = float(acquired.group(1)) if acquired else start
    return {
        "command_s": end - locked,
        "lock_wait_s": locked - start,
        "startup_s": first - locked,  # SuperLink, Ray and the ServerApp process, before the first LLM call
        "federation_s": last - first,  # first LLM call to the last
        "shutdown_s": end - last,
        "round_s": [r.get("seconds") for r in rounds],
        "calls_by_kind": count_kinds(calls),
    }


# --- the report ----------------------------------------------------------------------

def median_of(outcomes: list[RunOutcome], key: str) -> float:
    return statistics.median(o.figures.as_dict()[key] for o in outcomes)


def print_phases(outcome: RunOutcome) -> None:
    print(f"\nwhere the time goes ({outcome.mode}, one run; waves = calls in sequence per client)")
    print(f"{'phase':<28} {'measured s':>10} {'ideal s':>8} {'extra s':>8} {'calls':>6}  waves")
    for phase in outcome.phases:
        waves = " ".join(f"{k}:{v}" for k, v in phase.waves.items())
        print(f"{phase.label:<28} {phase.measured:>10.2f} {phase.ideal:>8.2f} "
              f"{phase.measured - phase.ideal:>8.2f} {phase.calls:>6}  {waves}")


def report(args: argparse.Namespace, runs: dict[str, list[RunOutcome]], flwr: list[dict]) -> dict:
    conc, seq = runs["concurrent"], runs["sequential"]
    for outcome in conc + seq:  # the same work, or the comparison means nothing
        if outcome.calls_by_kind != conc[0].calls_by_kind or outcome.best_prompt != conc[0].best_prompt:
            raise RuntimeError(f"a {outcome.mode} run did different work: {outcome.calls_by_kind} calls, "
                               f"against {conc[0].calls_by_kind}")
    measured_c, ideal_c = median_of(conc, "measured_s"), median_of(conc, "ideal_s")
    if not seq:  # --sequential-repeats 0: the overhead only
        print(f"{args.clients} clients, {args.rounds} round(s), {args.latency_ms:g} ms per LLM call; median of "
              f"{len(conc)}: measured {measured_c:.2f}s, ideal {ideal_c:.2f}s, overhead {measured_c / ideal_c:.3f}")
        print_phases(conc[0])
        return {"concurrent": {"median_measured_s": measured_c, "median_ideal_s": ideal_c,
                               "measured_over_ideal": measured_c / ideal_c,
                               "runs": [o.figures.as_dict() for o in conc]}}
    measured_s, ideal_s = median_of(seq, "measured_s"), median_of(seq, "sequential_ideal_s")
    speedup, ideal_speedup = measured_s / measured_c, ideal_s / ideal_c
    print(f"{args.clients} clients, {args.rounds} round(s), {args.latency_ms:g} ms per LLM call, "
          f"llm-concurrency {args.concurrency}; {conc[0].figures.calls} LLM calls per run "
          f"{conc[0].calls_by_kind}; medians of {args.repeats} run(s) on a shared machine")
    print(f"{'run':<22} {'measured s':>10} {'ideal s':>8} {'meas/ideal':>10} {'LLM busy':>8} {'call s':>7}")
    for mode, outcomes, ideal_key in (("concurrent", conc, "ideal_s"), ("sequential baseline", seq, "sequential_ideal_s")):
        measured, ideal = median_of(outcomes, "measured_s"), median_of(outcomes, ideal_key)
        print(f"{mode:<22} {measured:>10.2f} {ideal:>8.2f} {measured / ideal:>10.3f} "
              f"{median_of(outcomes, 'llm_busy_fraction'):>8.0%} {median_of(outcomes, 'mean_call_s'):>7.3f}")
    print(f"speedup: measured {speedup:.2f}x, ideal {ideal_speedup:.2f}x, "
          f"ratio {speedup / ideal_speedup:.3f} (target >= 0.80); "
          f"overhead {measured_c / ideal_c:.3f} (target <= 1.10)")
    # the server's own work between windows (run folder, plots) is the same in both modes;
    # without it, what is left is the clients' and the transport's share
    extra = statistics.median(server_extra(o.phases) for o in conc)
    extra_seq = statistics.median(server_extra(o.phases) for o in seq)
    rest_c, rest_s = measured_c - extra, measured_s - extra_seq
    print(f"of which the server's own work between windows (results, plots): {extra:.2f}s concurrent, "
          f"{extra_seq:.2f}s sequential; without it: overhead {rest_c / ideal_c:.3f}, "
          f"speedup {rest_s / rest_c:.2f}x, ratio {rest_s / rest_c / ideal_speedup:.3f}")
    result = {
        "latency_ms": args.latency_ms, "clients": args.clients, "rounds": args.rounds,
        "concurrency": args.concurrency, "repeats": args.repeats, "calls_by_kind": conc[0].calls_by_kind,
        "concurrent": {"median_measured_s": measured_c, "median_ideal_s": ideal_c,
                       "measured_over_ideal": measured_c / ideal_c,
                       "runs": [o.figures.as_dict() for o in conc],
                       "phases_first_run": [p.as_dict() for p in conc[0].phases]},
        "sequential": {"median_measured_s": measured_s, "ideal_s": ideal_s, "measured_over_ideal": measured_s / ideal_s,
                       "runs": [o.figures.as_dict() for o in seq]},
        "speedup_measured": speedup, "speedup_ideal": ideal_speedup, "speedup_ratio": speedup / ideal_speedup,
        "targets_met": {"overhead": measured_c / ideal_c <= 1.10, "speedup": speedup / ideal_speedup >= 0.80},
        "server_own_work_s": {"concurrent": extra, "sequential": extra_seq},
        "without_server_own_work": {"measured_over_ideal": rest_c / ideal_c,
                                    "speedup_ratio": rest_s / rest_c / ideal_speedup},
    }
    print_phases(conc[0])
    if flwr:
        federation = statistics.median(f["federation_s"] for f in flwr)
        startup = statistics.median(f["startup_s"] for f in flwr)
        print(f"\nFlower simulation (flwr run, {args.flwr_federation_config}; one sim server shared by the clients), "
              f"median of {len(flwr)}: start-up {startup:.1f}s, federation {federation:.2f}s "
              f"(ideal {ideal_c:.2f}s, ratio {federation / ideal_c:.3f}), whole command "
              f"{statistics.median(f['command_s'] for f in flwr):.1f}s; rounds.jsonl seconds per round "
              f"{flwr[0]['round_s']}")
        if flwr[0]["calls_by_kind"] != conc[0].calls_by_kind:
            print(f"  note: it made different calls {flwr[0]['calls_by_kind']}, so its ideal differs")
        result["flwr"] = {"federation_config": args.flwr_federation_config, "median_federation_s": federation,
                          "median_startup_s": startup, "federation_over_ideal": federation / ideal_c,
                          "same_calls_as_loopback": flwr[0]["calls_by_kind"] == conc[0].calls_by_kind,
                          "runs": flwr}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=200.0, help="fixed latency of every LLM call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="llm-concurrency of the concurrent run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind; medians are reported")
    parser.add_argument("--sequential-repeats", type=int, default=1,
                        help="runs of the (long) sequential baseline; its time barely varies (0: the overhead only)")
    parser.add_argument("--flwr", action="store_true", help="also run the federation with `flwr run` (simulation)")
    parser.add_argument("--flwr-repeats", type=int, default=1, help="flwr runs (each starts Ray afresh)")
    parser.add_argument("--flwr-federation-config", default="num-supernodes=3",
                        help="--federation-config of that flwr run")
    parser.add_argument("--out", default="tests/benchmarks/bench_overhead.json")
    args = parser.parse_args(argv)
    if args.latency_ms <= 0:
        parser.error("--latency-ms must be above 0: the ideal is counted in latencies")

    names = clients(args.clients) + [SERVER, "shared"]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, \
            SimFleet(names, args.latency_ms, Path(tmp) / "servers") as fleet:
        results = Path(tmp) / "results"
        results.mkdir()
        # first imports and first connections are a one-off of the process, not of a run
        warm = run_loopback(argparse.Namespace(**{**vars(args), "rounds": 1}), fleet, "concurrent", results, "warm-up")
        print(f"  warm-up run (not counted): {warm.figures.measured:.2f}s", flush=True)
        runs: dict[str, list[RunOutcome]] = {"concurrent": [], "sequential": []}
        for mode, repeats in (("concurrent", args.repeats), ("sequential", args.sequential_repeats)):
            for repeat in range(repeats):
                outcome = run_loopback(args, fleet, mode, results, f"{mode}-{repeat}")
                runs[mode].append(outcome)
                ideal = outcome.figures.ideal if mode == "concurrent" else outcome.figures.sequential_ideal
                print(f"  {mode} run {repeat + 1}: {outcome.figures.measured:.2f}s (ideal {ideal:.2f}s)", flush=True)
        flwr = [run_flwr(args, fleet, results, f"flwr-{repeat}", "shared")
                for repeat in range(args.flwr_repeats if args.flwr else 0)]
        result = report(args, runs, flwr)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
