"""End to end: the README's `flwr run . local` in Flower's simulation, checked by its results.

`flwr run` starts a background SuperLink (simulation mode) in an isolated FLWR_HOME;
the test stops that process by its PID afterwards. `flwr run` can exit 0 when the run
failed, so every check is made on what the run left on disk and printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 420


def _superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of SuperLink processes that belong to this FLWR_HOME (and so to this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    for pid in _superlinks_of(home):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _superlinks_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _superlinks_of(home):
        os.kill(pid, signal.SIGKILL)


def flwr_run(flwr_home: Path, run_config: str) -> str:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    done = subprocess.run(
        ["flwr", "run", ".", "local", "--stream", "--federation-config", "num-supernodes=3",
         "--run-config", run_config],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    return done.stdout + done.stderr


def test_default_federation_improves_the_prompt_and_leaves_a_complete_results_folder(flwr_home, tmp_path):
    output = flwr_run(flwr_home, f"results-dir='{tmp_path}' run-name='e2e' num-server-rounds=2")
    run_dir = tmp_path / "e2e"
    assert (run_dir / "summary.json").exists(), output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True, output[-3000:]
    assert summary["rounds"] == 2
    assert summary["best_val_accuracy"] > summary["initial_val_accuracy"]
    assert summary["test_accuracy"] is not None
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    assert len(rounds[0]["clients"]) == 3  # three simulated SuperNodes, as pyproject.toml declares
    assert all(r["merged_prompt"].endswith("where VALUE is a numerical value.") for r in rounds)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["merge"] == "summarize-uid"
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "prompts" / "best.txt").read_text().strip() == summary["best_prompt"]
    assert "merged (summarize-uid)" in output  # the per-round table was printed


def test_bad_setting_stops_the_run_at_start_with_one_clear_line(flwr_home, tmp_path):
    output = flwr_run(flwr_home, f"results-dir='{tmp_path}' merge='average'")
    assert ("fedtextgrad: the run cannot start: setting 'merge' = 'average' is not accepted; "
            "expected concat, summarize, summarize-uid") in output
    assert not any(tmp_path.iterdir())  # nothing was started
