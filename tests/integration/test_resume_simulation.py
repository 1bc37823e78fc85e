"""Resume after the server process is killed, in Flower's simulation (`flwr run . local`).

The simulation's server side is the ``flwr-simulation`` process (ServerApp and the Ray
workers that host the ClientApps) under the local SuperLink this test's FLWR_HOME owns.
It is killed with SIGKILL, with its descendants, by PID once round 1 is on disk and round
2 is under way; the `flwr run` that watched it is stopped by its PID. A second `flwr run`
with ``resume-from`` continues in the same folder. The result is compared with an
uninterrupted run of the same seed, computed in process (test_resume.py shows in-process
and resumed runs agree; here the transport is Flower's own). The loopback deployment
counterpart is in test_deployment.py.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support.deployment_helpers import alive, cmdline, descendants, kill_pids, wait_until
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import outcome, run_server
from tests.support.simulation_helpers import ROOT, RUN_TIMEOUT, flwr_env, flwr_run, flwr_run_command, superlinks_of

pytestmark = pytest.mark.slow

SHORT = {"num-server-rounds": 3, "local-steps": 1, "batch-size": 2, "synthetic-size": 60}
# slower LLM calls while the run is watched, so the kill lands inside round 2, not after it
SLOW = 300


def _config_line(results, name: str, **extra: object) -> str:
    settings = {**SHORT, "results-dir": str(results), "run-name": name, **extra}
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())


def _records(run_dir) -> int:
    path = run_dir / "rounds.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_a_killed_simulation_server_resumes_and_ends_like_an_uninterrupted_run(flwr_home, tmp_path):
    run_dir = tmp_path / "killed"
    run = subprocess.Popen(flwr_run_command(_config_line(tmp_path, "killed", **{"sim-latency-ms": SLOW})),
                           cwd=ROOT, env=flwr_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victims: list[int] = []
    try:
        assert wait_until(lambda: _records(run_dir) >= 1 or run.poll() is not None, RUN_TIMEOUT, 0.1)
        servers = [pid for link in superlinks_of(flwr_home) for pid in descendants(link)
                   if "flwr-simulation" in cmdline(pid)]
        assert len(servers) == 1, (f"the simulation's server process was not found (exit code {run.poll()}, "
                                   f"{_records(run_dir)} round(s) on disk, SuperLinks {superlinks_of(flwr_home)})")
        victims = [servers[0], *descendants(servers[0])]
        kill_pids(victims)
        assert wait_until(lambda: not any(alive(pid) for pid in victims), 15)
    finally:
        if run.poll() is None:  # `flwr run --stream` keeps waiting for a run whose server is gone
            run.kill()
        run.communicate(timeout=30)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["rounds"] == 1 == _records(run_dir), summary
    first_round = (run_dir / "rounds.jsonl").read_text()

    began = time.monotonic()
    output = flwr_run(flwr_home, _config_line(tmp_path, "killed", **{"resume-from": str(run_dir)}))
    print(f"\nresumed simulation run: {time.monotonic() - began:.1f} s")
    assert f"resuming {run_dir} after round 1" in output, output[-3000:]
    assert (run_dir / "rounds.jsonl").read_text().startswith(first_round)  # round 1 kept, not redone
    resumed = outcome(run_dir)
    assert resumed["rounds"] == 3, output[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_after_rounds"] == [1]

    reference_config = default_run_config(**SHORT, **{"results-dir": str(tmp_path / "reference"), "run-name": "run"})
    run_server(reference_config, LoopbackGrid(reference_config))
    assert resumed == outcome(tmp_path / "reference" / "run")
