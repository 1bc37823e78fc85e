"""Deployment against simulation: the same short run on real SuperLink + SuperNodes, and in `flwr run . local`.

The run: 2 rounds, 2 clients, one local step of batch 2, 60 synthetic examples, the sim LLM in
each ClientApp process (``RUN_CONFIG``, the deployment tests' run). The deployment is started
with the deploy/ scripts as an operator starts it (tests/support/deployment_helpers.py): an insecure
SuperLink and two SuperNodes on 127.0.0.1, each with its own FLWR_HOME, every process stopped by
PID afterwards. The simulation is `flwr run . local` with `num-supernodes=2` in an FLWR_HOME and
on ports of its own (tests/support/simulation_helpers.py). Both are timed from `flwr run` to its exit.

While the deployment runs, the benchmark timestamps every new line of each SuperNode's log (read
every 50 ms) and every ClientApp / ServerApp process it sees come and go (/proc, every 50 ms), so
it can print where one round's time goes: from the round's start (rounds.jsonl ``started_at``)
to its end, each SuperNode receiving its message, its ClientApp process starting and exiting, the
reply sent, and the ServerApp moving on.

``--app-dir`` runs another copy of the app (an older version, for a before/after);
``--superexec-poll`` sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL (seconds) for the processes the
deployment starts: how often a SuperNode's (and the SuperLink's) task runner asks for a ClientApp
(ServerApp) to start; Flower's default is 1.0 s. ``--superexec-poll ''`` leaves Flower's default.

    python -m tests.benchmarks.bench_deployment --repeats 2
    python -m tests.benchmarks.bench_deployment --app-dir /tmp/orig --superexec-poll ''   # before
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmarks.periodic import Periodic
from tests.support.deployment_helpers import ROOT, Deployment, alive, cmdline, descendants, free_ports, wait_until
from tests.support.simulation_helpers import flwr_env, stop_superlinks

RUN_CONFIG = "num-server-rounds=2 min-train-clients=2 local-steps=1 batch-size=2 synthetic-size=60"
NODES = 2
SAMPLE_SECONDS = 0.05
RUN_TIMEOUT = 900
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# SuperNode log lines worth a place on the timeline (Flower 1.42's wording)
NODE_EVENTS = (("Receiving: ", "message received from the SuperLink"), ("Sending: ", "reply sent to the SuperLink"))


@dataclass
class Watcher(Periodic):
    """Timestamps new SuperNode log lines and the app processes below the deployment, until stopped."""

    logs: dict[str, Path]  # node name -> its log file
    roots: list[int]  # PIDs whose descendants are watched (SuperLink, SuperNodes)
    lines: list[tuple[float, str, str]] = field(default_factory=list)  # (time, node, line)
    processes: dict[int, list] = field(default_factory=dict)  # pid -> [kind, parent name, first, last seen]
    _offsets: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    interval = SAMPLE_SECONDS

    def __post_init__(self) -> None:
        for name, path in self.logs.items():  # only what is logged from now on
            self._offsets[name] = path.stat().st_size if path.exists() else 0

    def sample(self) -> None:
        now = time.time()
        for name, path in self.logs.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(self._offsets[name])
                    data = handle.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[name] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                self.lines.append((now, name, re.sub(r"\x1b\[[0-9;]*m", "", line).strip()))
        for root, name in zip(self.roots, ["superlink", *self.logs]):
            for pid in descendants(root):
                command = cmdline(pid)
                kind = ("clientapp" if "flwr-clientapp" in command else "serverapp" if "flwr-serverapp" in command
                        else None)
                if kind is None:
                    continue
                seen = self.processes.setdefault(pid, [kind, name, now, now])
                seen[3] = now


def _start_deployment(root: Path, env_extra: dict[str, str]) -> tuple[Deployment, dict]:
    deployment = Deployment(root)
    deployment.env.pop(POLL_ENV, None)  # the test helpers' own setting: this benchmark says what it wants
    deployment.env.update(env_extra)
    link_port, *node_ports = free_ports(1 + NODES)
    superlink = f"127.0.0.1:{link_port}"
    try:  # a start that fails part-way leaves nothing running
        link = deployment.start("start-superlink.sh", "superlink", "--insecure", "--port", str(link_port))
        nodes = deployment.start_many(*[
            ("start-supernode.sh", f"supernode-{i}", "--insecure", "--superlink", superlink, "--partition-id",
             str(i), "--num-partitions", str(NODES), "--port", str(node_ports[i]))
            for i in range(NODES)])
        for node in nodes:
            if not wait_until(lambda node=node: "SuperNode ID:" in node.log, 120, 0.2):
                raise RuntimeError(f"{node.name} did not connect: {node.log[-2000:]}")
        home = root / "submitter"
        deployment.script("add-connection.sh", "--name", "bench", "--superlink", superlink, "--insecure",
                          "--flwr-home", str(home))
    except BaseException:
        deployment.stop_all()
        raise
    return deployment, {"link": link, "nodes": nodes, "home": home}


def _flwr_run(command: list[str], app_dir: Path, env: dict[str, str]) -> tuple[float, str]:
    began = time.monotonic()
    done = subprocess.run(command, cwd=app_dir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False)
    return time.monotonic() - began, done.stdout + done.stderr


def _results(run_dir: Path, output: str) -> tuple[dict, list[dict]]:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"no summary.json in {run_dir}; output:\n{output[-3000:]}")
    summary = json.loads(summary_path.read_text())
    if not summary.get("finished"):
        raise RuntimeError(f"the run did not finish: {summary.get('error')}\n{output[-3000:]}")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return summary, rounds


def run_deployed(app_dir: Path, workdir: Path, env_extra: dict[str, str]) -> dict:
    deployment, parts = _start_deployment(workdir / "deployment", env_extra)
    try:
        logs = {node.name: node.state / "log" for node in parts["nodes"]}
        watcher = Watcher(logs, [parts["link"].pid, *(node.pid for node in parts["nodes"])])
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        results = workdir / "results"
        env = dict(deployment.env, FLWR_HOME=str(parts["home"]))
        began = time.time()
        seconds, output = _flwr_run(["flwr", "run", str(app_dir), "bench", "--stream", "--run-config",
                                     f"{RUN_CONFIG} results-dir='{results}' run-name='deployed'"], app_dir, env)
        watcher.stop()
        thread.join()
        summary, rounds = _results(results / "deployed", output)
    finally:
        deployment.stop_all()
        left = [pid for pid in deployment.all_pids() if alive(pid)]
        if left:
            print(f"warning: processes still alive after stopping the deployment: {left}")
    apps = sorted(watcher.processes.values(), key=lambda p: p[2])
    clientapps = [p for p in apps if p[0] == "clientapp"]
    return {"mode": "deployed", "seconds": seconds, "began": began, "rounds": rounds, "summary": summary,
            "lines": watcher.lines, "apps": apps,
            "clientapp_processes": len(clientapps),
            "clientapp_median_lifetime_s": statistics.median(p[3] - p[2] for p in clientapps) if clientapps else None}


def run_simulated(app_dir: Path, workdir: Path) -> dict:
    flwr_home = workdir / "sim-home"
    flwr_home.mkdir(parents=True)
    results = workdir / "sim-results"
    try:
        seconds, output = _flwr_run(["flwr", "run", str(app_dir), "local", "--stream", "--federation-config",
                                     f"num-supernodes={NODES}", "--run-config",
                                     f"{RUN_CONFIG} results-dir='{results}' run-name='simulated'"], app_dir,
                                    flwr_env(flwr_home))
    finally:
        stop_superlinks(flwr_home)
    summary, rounds = _results(results / "simulated", output)
    return {"mode": "simulated", "seconds": seconds, "rounds": rounds, "summary": summary}


def timeline(run: dict, start: float, end: float) -> list[tuple[float, str]]:
    """The watched events between ``start`` and ``end`` (wall clock), in seconds from ``start``."""
    events: list[tuple[float, str]] = []
    for when, node, line in run["lines"]:
        if start - 0.5 <= when <= end + 0.5:
            for needle, what in NODE_EVENTS:
                if needle in line:
                    kind = line.split(needle, 1)[1].split(" ")[0]
                    events.append((when - start, f"{node}: {kind} {what}"))
    for kind, parent, first, last in run["apps"]:
        if first <= end + 0.5 and last >= start - 0.5:
            name = "ClientApp" if kind == "clientapp" else "ServerApp"
            events.append((first - start, f"{parent}: {name} process seen"
                           + (" (a new process per message)" if kind == "clientapp" else "")))
            events.append((last - start, f"{parent}: {name} process gone ({last - first:.2f} s alive)"))
    return sorted(events)


def round_timeline(run: dict, server_round: int = 1) -> list[tuple[float, str]]:
    """Events of one round, in seconds from its start (rounds.jsonl started_at)."""
    record = next(r for r in run["rounds"] if r["round"] == server_round)
    start, end = record["started_at"], record["ended_at"]
    return sorted([(0.0, f"round {server_round} starts: its training requests go out (with the previous "
                         "evaluation's, see federation.py)"),
                   *timeline(run, start, end),
                   (end - start, f"round {server_round} ends: merged prompt evaluated, rounds.jsonl written")])


def run_phases(run: dict) -> list[tuple[str, float]]:
    """The whole deployed run cut at what the watcher saw: before the first message, the message
    exchanges (first receive to last reply, per phase), and after the last reply."""
    received = [(when, line.split("Receiving: ", 1)[1].split(" ")[0]) for when, _, line in run["lines"]
                if "Receiving: " in line]
    sent = [when for when, _, line in run["lines"] if "Sending: " in line]
    servers = [p for p in run["apps"] if p[0] == "serverapp"]
    if not received or not sent or not servers:
        return []
    began, ended = run["began"], run["began"] + run["seconds"]
    server_first, server_last = servers[0][2], servers[-1][3]
    return [("flwr run to the ServerApp process", server_first - began),
            ("ServerApp process to the first message at a SuperNode", received[0][0] - server_first),
            (f"{len(received)} messages handled, first received to last reply sent", sent[-1] - received[0][0]),
            ("last reply to the ServerApp process's end", server_last - sent[-1]),
            ("ServerApp's end to flwr run's exit", ended - server_last)]


def _each(runs: list[dict]) -> str:
    return ", ".join(f"{run['seconds']:.1f}" for run in runs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode; medians are reported")
    parser.add_argument("--app-dir", default=str(ROOT), help="the Flower app to run (default: this project)")
    parser.add_argument("--superexec-poll", default="0.1",
                        help=f"{POLL_ENV} for the deployment's processes, seconds ('' = Flower's default, 1.0)")
    parser.add_argument("--no-simulation", action="store_true", help="time the deployment only")
    parser.add_argument("--out", default="tests/benchmarks/bench_deployment.json")
    args = parser.parse_args(argv)
    app_dir = Path(args.app_dir).resolve()
    env_extra = {POLL_ENV: args.superexec_poll} if args.superexec_poll else {}

    deployed, simulated = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
            run = run_deployed(app_dir, Path(tmp), env_extra)
            print(f"deployed run {repeat + 1}: {run['seconds']:.1f} s ({run['clientapp_processes']} ClientApp "
                  f"processes, median lifetime {run['clientapp_median_lifetime_s'] or 0:.2f} s)", flush=True)
            deployed.append(run)
            if not args.no_simulation:
                sim = run_simulated(app_dir, Path(tmp))
                print(f"simulated run {repeat + 1}: {sim['seconds']:.1f} s", flush=True)
                simulated.append(sim)

    dep = statistics.median(r["seconds"] for r in deployed)
    print(f"\n{NODES} SuperNodes, {RUN_CONFIG}; app {app_dir}; {POLL_ENV}={args.superexec_poll or '(default 1.0)'}")
    print(f"deployed (SuperLink + {NODES} SuperNodes on loopback), median of {len(deployed)}: {dep:.1f} s "
          f"(each: {_each(deployed)})")
    result: dict = {"run_config": RUN_CONFIG, "app_dir": str(app_dir), "superexec_poll": args.superexec_poll,
                    "deployed_s": [r["seconds"] for r in deployed], "deployed_median_s": dep}
    if simulated:
        sim_median = statistics.median(r["seconds"] for r in simulated)
        print(f"simulated (flwr run . local, num-supernodes={NODES}), median of {len(simulated)}: {sim_median:.1f} s "
              f"(each: {_each(simulated)})")
        print(f"deployed / simulated: {dep / sim_median:.2f} (goal <= 1.5)")
        result.update({"simulated_s": [r["seconds"] for r in simulated], "simulated_median_s": sim_median,
                       "deployed_over_simulated": dep / sim_median})
        same = [r["summary"]["best_prompt"] for r in deployed + simulated]
        print(f"same best prompt in every run: {'yes' if len(set(same)) == 1 else 'NO'}")
    first = deployed[0]
    shown = max(r["round"] for r in first["rounds"])
    print(f"\nround {shown} of the first deployed run, seconds from its start:")
    round_1 = round_timeline(first, shown)
    for seconds, what in round_1:
        print(f"  {seconds:7.2f}  {what}")
    phases = [(r["round"], r["ended_at"] - r["started_at"]) for r in first["rounds"]]
    print("rounds (train + merge + evaluate), s: " + ", ".join(f"round {n} {s:.1f}" for n, s in phases))
    print("\nthe whole deployed run (first run):")
    for what, seconds in run_phases(first):
        print(f"  {seconds:7.2f}  {what}")
    result["round_timeline"] = {"round": shown, "events": round_1}
    result["round_seconds"] = phases
    result["run_phases"] = run_phases(first)
    result["run_timeline"] = timeline(first, first["began"], first["began"] + first["seconds"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
