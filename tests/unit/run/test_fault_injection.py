"""Faults injected into a running federation: each is reported, the run goes on, nothing is lost.

Three clients, two rounds, ``min-train-clients=2``. Client 2 works normally in round 1 and
its fault starts when round 2 begins: its LLM endpoint (a real HTTP server) starts returning
500s, hangs, returns garbage or an empty body, drops connections; its LLM server process is
killed by PID; or its data file disappears. Each test checks that

* the fault is reported in the round table and in rounds.jsonl (stage and reason naming the
  endpoint or the file),
* the run goes on with the two clients left and finishes,
* what was written before the fault (round 1's record) is unchanged.

Messages are real Flower Messages delivered in process to the real ClientApp
(flower_loopback.py). A SuperNode killed mid-round with its processes is in
test_deployment.py; the server process killed mid-run is in test_resume_simulation.py and
test_deployment.py.
"""

from __future__ import annotations

import json
import signal

import pytest

from fedtextgrad_core.run.records import RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import RunFolder
from tests import SHARED_DATA
from tests.support.deployment_helpers import kill_pids, start_sim_server
from tests.support.faulty_llm_server import FaultyLLMServer
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import run_server

# the second send of round 2 onwards: 1 = initial evaluation, 2/3 = round 1 train/evaluate, 4 = round 2 train
pytestmark = pytest.mark.slow  # federations against misbehaving LLM servers, waiting out their timeouts

ROUND_2_STARTS = 4
FAST_FAILURE = {"llm-max-retries": 1, "llm-retry-backoff": 0.01, "llm-timeout": 1.0}


class FaultFromRound2(LoopbackGrid):
    """Calls ``inject()`` once, just before round 2's training messages are delivered, and keeps
    round 1's record as it was on disk at that moment."""

    def __init__(self, run_config, inject, run_dir, **kwargs):
        super().__init__(run_config, **kwargs)
        self.inject, self.run_dir, self.sends = inject, run_dir, 0
        self.before_fault = ""

    def send_and_receive(self, messages, timeout=None):
        self.sends += 1
        if self.sends == ROUND_2_STARTS:
            self.before_fault = (self.run_dir / "rounds.jsonl").read_text()
            self.inject()
        return super().send_and_receive(messages, timeout)


def run_with_fault(tmp_path, node_2: dict, inject
                   ) -> tuple[list[RoundRecord], RunSummary, list[str], FaultFromRound2]:
    config = default_run_config(**{"num-server-rounds": 2, "min-train-clients": 2, "local-steps": 1,
                                   "batch-size": 2, "synthetic-size": 60, "results-dir": str(tmp_path),
                                   "run-name": "run", **FAST_FAILURE,
                                   # client 2 uses an LLM server of its own; the server merges with the
                                   # simulated LLM on purpose (left unset, the run would refuse that)
                                   "server-backend": "sim"})
    grid = FaultFromRound2(config, inject, tmp_path / "run", node_overrides={2: {"partition-id": 2, **node_2}})
    _, lines = run_server(config, grid)
    folder = RunFolder(tmp_path / "run")
    return folder.read_rounds(), folder.read_summary(), lines, grid


def assert_survived(rounds, summary, lines, grid, names: str) -> None:
    """Round 1 whole and kept, round 2 without client 2 and saying why, the run finished."""
    assert summary.finished is True and summary.rounds == 2, summary.error
    first, second = rounds
    assert {u.label for u in first.uploads} == {"0", "1", "2"} and first.failures == ()
    # nothing written was lost: round 1's line is on disk byte for byte as it was before the fault
    assert len(grid.before_fault.splitlines()) == 1
    assert (grid.run_dir / "rounds.jsonl").read_text().startswith(grid.before_fault)
    assert RoundRecord.from_json(json.loads(grid.before_fault)) == first
    assert {u.label for u in second.uploads} == {"0", "1"}
    stages = {f.stage: f.reason for f in second.failures if f.label == "2"}
    assert set(stages) == {"train", "evaluate"}, second.failures
    assert {f.node_id for f in second.failures} == {102}
    for reason in stages.values():
        assert names in reason, reason
    assert any(line.startswith("2") and "FAILED" in line and names in line for line in lines), lines
    assert summary.test_failures and all(names in f.reason for f in summary.test_failures)
    assert {f.label for f in summary.test_failures} == {"2"}


def openai_node(url: str) -> dict:
    return {"llm-backend": "openai", "llm-base-url": url, "llm-model": "m"}


ENDPOINT_FAULTS = {  # mode of the faulty server -> what the report must say besides the URL
    "http500": "HTTP 500",
    "hang": "did not answer in time",
    "garbage": "not an OpenAI-style JSON answer",
    "empty": "empty",
    "die": "",
}


@pytest.mark.parametrize("mode", sorted(ENDPOINT_FAULTS))
def test_an_endpoint_that_turns_faulty_mid_run_is_reported_and_the_run_goes_on(tmp_path, mode):
    with FaultyLLMServer("sim", hang_seconds=3.0) as server:
        rounds, summary, lines, grid = run_with_fault(
            tmp_path, openai_node(server.url), lambda: setattr(server, "mode", mode))
        assert server.chat_requests > 0
    assert_survived(rounds, summary, lines, grid, server.url)
    reasons = [f.reason for f in rounds[1].failures]
    assert all(ENDPOINT_FAULTS[mode].lower() in reason.lower() for reason in reasons), reasons


def test_an_llm_server_process_killed_mid_run_is_reported_and_the_run_goes_on(tmp_path):
    server, url = start_sim_server(tmp_path / "sim-server.log")
    try:
        rounds, summary, lines, grid = run_with_fault(
            tmp_path, openai_node(url), lambda: (kill_pids([server.pid], signal.SIGKILL), server.wait()))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert_survived(rounds, summary, lines, grid, url)


def test_a_data_file_that_disappears_mid_run_is_reported_and_the_run_goes_on(tmp_path):
    source = SHARED_DATA / "bbh" / "object_counting.json"
    if not source.is_file():
        pytest.skip(f"real data not found at {source}")
    data_file = tmp_path / "site-2" / "object_counting.json"
    data_file.parent.mkdir()
    data_file.write_bytes(source.read_bytes())  # a site's own copy, in tmp
    rounds, summary, lines, grid = run_with_fault(tmp_path, {"data-source": str(data_file)}, data_file.unlink)
    assert_survived(rounds, summary, lines, grid, str(data_file))
    assert "does not exist" in rounds[1].failures[0].reason
