"""Scale: real `flwr run . local` simulations with many clients, per merge method.

For every (clients, merge) pair this starts a fresh Flower simulation (its own FLWR_HOME,
so its own background SuperLink, stopped by PID afterwards) on the simulated LLM with no
latency, and reports from what the run itself left on disk and from sampling /proc:

- wall time: the whole `flwr run` (SuperLink start, Ray start, all rounds, the final test),
  and per round, the time between consecutive appends to rounds.jsonl (round 1 from the
  moment the initial evaluation was written to summary.json);
- peak memory: the largest sum, over all processes of the run (the SuperLink and every
  process below it: ServerApp, simulation engine, Ray's processes and its actors), of
  PSS (proportional set size: shared pages split between the processes that share them,
  from /proc/PID/smaps_rollup) and of RSS (which counts shared pages once per process,
  so it overstates), sampled every 0.25 s;
- the largest number of Ray ClientApp actors alive at once: how many clients run at once;
- CPU seconds by process kind (from /proc/PID/stat, the last value seen of each process): the
  simulation process (``flwr-simulation``: the ServerApp, Flower's simulation engine and Ray's
  driver), the Ray ClientApp actors (the clients' own work), and the rest (SuperLink, Ray's
  services); and the server's cost per reply: the simulation process's CPU seconds over the
  replies of the run (every phase asks every client: the start prompt's evaluation, training
  and evaluation per round, one test per distinct prompt of ``test-prompts``);
- the merged prompt's length (chars and tokens) per round, what the budget dropped, and
  the largest summariser input (tokens) against `merge-token-budget`.

Each run holds /tmp/fedtextgrad-flwr.lock (flock) from before `flwr run` until its
SuperLink is stopped, and its SuperLink listens on ports of its own (39191/39193, see
SUPERLINK_PORTS), so it neither collides with nor is captured by another user's SuperLink.

The synthetic data holds ``clients * batch-size / 0.2`` examples (at least 250), at most 100,000
(the setting's limit): beyond 6,666 clients at batch 3 each client holds fewer training examples
than a batch, and the benchmark lowers the batch to what they hold (2 at 10,000 clients), saying so.

    python -m tests.benchmarks.bench_scale --clients 10,30,100 --rounds 3 --merges concat,summarize-uid
    python -m tests.benchmarks.bench_scale --clients 100,1000,10000 --merges summarize-uid --timeout 2400
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedtextgrad_core.run.records import RoundRecord
from tests.benchmarks.periodic import Periodic
from tests.support.deployment_helpers import cmdline
from tests.support.simulation_helpers import stop_superlinks

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = "/tmp/fedtextgrad-flwr.lock"
# `flwr run . local` hands a run to whatever SuperLink listens on its local ports (39091/39093),
# even one another user left running for another FLWR_HOME; the run would then execute in that
# SuperLink's processes and be measured wrongly. The benchmark's SuperLinks use ports of their
# own (flwr reads them from these environment variables), and it still holds the lock.
SUPERLINK_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": 39191, "FLWR_LOCAL_CONTROL_API_PORT": 39193}
SAMPLE_SECONDS = 0.25
TRAIN_SHARE = 0.2  # synthetic data: 20 % of the examples are training examples
MAX_TIMELINE = 400  # output lines kept, with their times, in the JSON file
MAX_SYNTHETIC = 100_000  # the largest synthetic-size the settings accept


# --- processes ----------------------------------------------------------------------------


def _environ(pid: int) -> bytes:
    """The process's environment: every process of a run inherits its FLWR_HOME, even the
    SuperLink that `flwr run` detaches and the Ray processes below it."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    return parents


def _tree(roots: list[int], parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks; None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _kind(command: str) -> str:
    if "flwr-simulation" in command:
        return "simulation"
    if "ClientAppActor" in command:
        return "client_actors"
    return "other"


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) once it has gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


@dataclass
class Sampler(Periodic):
    """Samples the run's processes and its results folder until stopped."""

    flwr_home: Path
    run_dir: Path
    root_pid: int
    started: float = field(default_factory=time.perf_counter)
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_processes: int = 0
    peak_actors: int = 0
    initial_done_at: float | None = None
    cpu_ticks: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (kind, utime + stime)
    round_done_at: list[float] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    interval = SAMPLE_SECONDS

    def sample(self) -> None:
        parents = _parents()
        marker = f"FLWR_HOME={self.flwr_home}".encode()
        roots = [self.root_pid] + [p for p in parents if marker in _environ(p)]
        pids = _tree(roots, parents) & set(parents)
        self.seen_pids |= pids
        rss = pss = 0
        for pid in pids:
            r, p = _memory_kb(pid)
            rss, pss = rss + r, pss + p
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                self.cpu_ticks[pid] = (_kind(cmdline(pid)), ticks)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.peak_actors = max(self.peak_actors, sum("ClientAppActor" in cmdline(pid) for pid in pids))
        now = time.perf_counter()
        if self.initial_done_at is None and (self.run_dir / "summary.json").exists():
            self.initial_done_at = now
        rounds_file = self.run_dir / "rounds.jsonl"
        if rounds_file.exists():
            lines = rounds_file.read_text(encoding="utf-8").count("\n")
            while len(self.round_done_at) < lines:
                self.round_done_at.append(now)


def _stop_processes(flwr_home: Path, seen: set[int]) -> None:
    """Stop this run's SuperLink, then anything else of this run still alive, by PID."""
    stop_superlinks(flwr_home)
    alive = _parents()
    for pid in seen & set(alive):
        if "python" in cmdline(pid) or "ray" in cmdline(pid) or "flower" in cmdline(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    clients: int
    merge: str
    rounds: int
    num_cpus: int
    init_cpus: int  # 0: let Ray count the machine's CPUs
    token_budget: int
    synthetic_size: int
    local_steps: int
    batch_size: int
    timeout: float
    test_prompts: str = "best,last,initial"

    def federation_config(self) -> str:
        parts = [f"num-supernodes={self.clients}", f"client-resources-num-cpus={self.num_cpus}"]
        if self.init_cpus:
            parts.append(f"init-args-num-cpus={self.init_cpus}")
        return " ".join(parts)

    def run_config(self, results_dir: Path) -> str:
        return (f"results-dir='{results_dir}' run-name='scale' merge='{self.merge}' "
                f"num-server-rounds={self.rounds} merge-token-budget={self.token_budget} "
                f"synthetic-size={self.synthetic_size} local-steps={self.local_steps} "
                f"batch-size={self.batch_size} min-train-clients={self.clients} test-prompts='{self.test_prompts}'")

    def command(self, results_dir: Path) -> list[str]:
        return ["flwr", "run", ".", "local", "--stream", "--federation-config", self.federation_config(),
                "--run-config", self.run_config(results_dir)]


def run_once(plan: RunPlan, workdir: Path, app_dir: Path = ROOT) -> dict:
    flwr_home = workdir / "flwr-home"
    results_dir = workdir / "results"
    flwr_home.mkdir(parents=True)
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", **{k: str(v) for k, v in SUPERLINK_PORTS.items()})
    command = plan.command(results_dir)
    with open(LOCK_FILE, "a") as lock:
        waited = _lock_free_ports(lock, plan.timeout)
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        sampler = Sampler(flwr_home, results_dir / "scale", process.pid)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        timeline: list[tuple[float, str]] = []  # (seconds since start, line): where the time goes
        reader = threading.Thread(target=_read_lines, args=(process, started, timeline), daemon=True)
        reader.start()
        try:
            process.wait(timeout=plan.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            timeline.append((time.perf_counter() - started, f"[bench_scale] flwr run killed after {plan.timeout:.0f} s"))
        reader.join(timeout=10)
        wall = time.perf_counter() - started
        sampler.stop()
        thread.join()
        _stop_processes(flwr_home, sampler.seen_pids)
    output = "\n".join(line for _, line in timeline)
    result = summarise(plan, results_dir / "scale", sampler, wall, waited, " ".join(command), output)
    result["timeline"] = [[round(t, 2), line[:160]] for t, line in timeline if line.strip()][:MAX_TIMELINE]
    return result


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _lock_free_ports(lock, patience: float) -> float:
    """Hold the lock with nothing listening on the benchmark's SuperLink ports; seconds waited.

    Waits (lock released) until the ports are free, or gives up after ``patience`` seconds
    naming the SuperLinks it sees.
    """
    started = time.perf_counter()
    while True:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = [port for port in SUPERLINK_PORTS.values() if _port_in_use(port)]
        if not busy:
            return time.perf_counter() - started
        fcntl.flock(lock, fcntl.LOCK_UN)
        if time.perf_counter() - started > patience:
            owners = [pid for pid in _parents() if "flower-superlink" in cmdline(pid)]
            raise SystemExit(f"bench_scale: ports {busy} are held by a SuperLink this benchmark did not start "
                             f"(PIDs {owners}); stop it and run again")
        time.sleep(5)


def _read_lines(process: subprocess.Popen, started: float, timeline: list[tuple[float, str]]) -> None:
    for line in process.stdout:
        timeline.append((time.perf_counter() - started, line.rstrip()))


def _round_seconds(sampler: Sampler) -> list[float]:
    marks = ([sampler.initial_done_at] if sampler.initial_done_at is not None else []) + sampler.round_done_at
    if sampler.initial_done_at is None:
        return []
    return [b - a for a, b in itertools.pairwise(marks)]


def summarise(plan: RunPlan, run_dir: Path, sampler: Sampler, wall: float, waited: float, command: str,
              output: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()] \
        if (run_dir / "rounds.jsonl").exists() else []
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {"simulation": 0.0, "client_actors": 0.0, "other": 0.0}
    for kind, ticks in sampler.cpu_ticks.values():
        cpu[kind] += ticks / tick
    prompts = {"best": summary.get("best_prompt"), "last": summary.get("final_prompt"),
               "initial": summary.get("initial_prompt")}
    tested = {prompts[name] for name in plan.test_prompts.split(",") if prompts.get(name) is not None}
    phases = 1 + 2 * len(rounds) + len(tested) if summary.get("finished") else None
    replies = plan.clients * phases if phases else None
    per_round = []
    for line, seconds in zip(rounds, _round_seconds(sampler) + [None] * len(rounds)):
        record = RoundRecord.from_json(line)
        metrics = record.merged_prompt_metrics or {}
        merge = record.merge
        per_round.append({
            "round": record.round,
            "clients_ok": len(record.uploads),
            "failures": len(record.failures),
            "wall_seconds": seconds,
            "merge_and_eval_seconds": record.seconds,
            "merged_chars": len(record.merged_prompt),
            "merged_tokens": metrics.get("tokens"),
            "tokenizer": metrics.get("tokenizer"),
            "val_accuracy": record.val_accuracy,
            "summariser_calls": merge.summariser_calls,
            "merge_levels": merge.levels,
            "largest_summariser_input_tokens": merge.largest_summariser_input_tokens,
            "dropped_sentences": len(merge.dropped_sentences),
            "duplicates_removed": merge.duplicates_removed,
            "fallback_reason": merge.fallback_reason,
        })
    return {
        "plan": asdict(plan),
        "command": command,
        "finished": bool(summary.get("finished")),
        "error": summary.get("error") or ("" if summary else "no summary.json: " + output[-1500:]),
        "wall_seconds": wall,
        "lock_wait_seconds": waited,
        "seconds_to_initial_eval": (sampler.initial_done_at - sampler.started
                                    if sampler.initial_done_at is not None else None),
        "peak_pss_mb": sampler.peak_pss_kb / 1024,
        "peak_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_processes": sampler.peak_processes,
        "peak_client_actors": sampler.peak_actors,
        "cpu_seconds": cpu,
        "replies": replies,
        "server_ms_per_reply": 1000 * cpu["simulation"] / replies if replies else None,
        "client_ms_per_reply": 1000 * cpu["client_actors"] / replies if replies else None,
        "initial_val_accuracy": summary.get("initial_val_accuracy"),
        "best_val_accuracy": summary.get("best_val_accuracy"),
        "rounds": per_round,
    }


# --- the table ----------------------------------------------------------------------------


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    head = (f"{'clients':>7} {'merge':<14} {'ok':>3} {'wall s':>7} {'s/round':>16} {'PSS MB':>7} {'RSS MB':>7} "
            f"{'actors':>6} {'merged chars':>16} {'merged tok':>14} {'max in/budget':>15} {'calls':>9} {'dropped':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        rounds = r["rounds"]
        budget = r["plan"]["token_budget"]
        largest = [x["largest_summariser_input_tokens"] for x in rounds if x["largest_summariser_input_tokens"]]
        print(f"{r['plan']['clients']:>7} {r['plan']['merge']:<14} {'yes' if r['finished'] else 'NO':>3} "
              f"{r['wall_seconds']:>7.1f} {'/'.join(_fmt(x['wall_seconds'], '.0f') for x in rounds):>16} "
              f"{r['peak_pss_mb']:>7.0f} {r['peak_rss_mb']:>7.0f} {r['peak_client_actors']:>6} "
              f"{'/'.join(str(x['merged_chars']) for x in rounds):>16} "
              f"{'/'.join(_fmt(x['merged_tokens']) for x in rounds):>14} "
              f"{(str(max(largest)) if largest else '-') + '/' + str(budget):>15} "
              f"{'/'.join(_fmt(x['summariser_calls']) for x in rounds):>9} "
              f"{'/'.join(str(x['dropped_sentences']) for x in rounds):>9}")
        cpu = r["cpu_seconds"]
        print(f"        CPU s: simulation process {cpu['simulation']:.1f}, client actors {cpu['client_actors']:.1f}, "
              f"other {cpu['other']:.1f}; {_fmt(r['replies'])} replies: server "
              f"{_fmt(r['server_ms_per_reply'], '.2f')} ms/reply, clients {_fmt(r['client_ms_per_reply'], '.2f')} "
              f"ms/reply")
        if r["error"]:
            print(f"        error: {r['error'][:300]}")
    print("s/round, merged chars/tok, calls, dropped: one value per round. max in: the largest summariser "
          "input (tokens) of the run. PSS/RSS: peak sum over the run's processes.")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,30,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--merges", default="concat,summarize-uid")
    parser.add_argument("--num-cpus", type=int, default=1,
                        help="client-resources-num-cpus: CPUs Ray reserves per ClientApp (whole numbers in flwr 1.42)")
    parser.add_argument("--init-cpus", type=int, default=0,
                        help="init-args-num-cpus: CPUs Ray believes it has (0: the machine's); actors = this / num-cpus")
    parser.add_argument("--token-budget", type=int, default=3000)
    parser.add_argument("--synthetic-size", type=int, default=0,
                        help="examples per task; 0: enough for --batch-size training examples per client, at least 250")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--test-prompts", default="best,last,initial", help="the run's test-prompts")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before one flwr run is killed")
    parser.add_argument("--app-dir", default=str(ROOT), help="the Flower app to run (default: this project)")
    parser.add_argument("--out", default="tests/benchmarks/bench_scale.json")
    args = parser.parse_args(argv)

    results = []
    for clients in [int(c) for c in args.clients.split(",")]:
        size = args.synthetic_size or min(MAX_SYNTHETIC, max(250, math.ceil(clients * args.batch_size / TRAIN_SHARE)))
        # at most MAX_SYNTHETIC examples: with many clients, each holds fewer training examples than a batch
        batch = max(1, min(args.batch_size, math.floor(size * TRAIN_SHARE) // clients))
        if batch != args.batch_size:
            print(f"[{clients} clients] batch-size {batch} instead of {args.batch_size}: synthetic-size {size} "
                  f"leaves {math.floor(size * TRAIN_SHARE) // clients} training example(s) per client", flush=True)
        for merge in [m.strip() for m in args.merges.split(",") if m.strip()]:
            plan = RunPlan(clients, merge, args.rounds, args.num_cpus, args.init_cpus, args.token_budget, size,
                           args.local_steps, batch, args.timeout, args.test_prompts)
            with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
                result = run_once(plan, Path(tmp), Path(args.app_dir))
            print(f"[{clients} clients, {merge}] {result['wall_seconds']:.1f} s, finished={result['finished']}"
                  + (f": {result['error'][:400]}" if result["error"] else ""), flush=True)
            results.append(result)
    print_table(results)
    Path(args.out).write_text(json.dumps({"runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
