"""The `fedtextgrad sim-server` command as a real process, driven through the `openai` client path.

A federation whose clients and server all talk HTTP to the served sim must end exactly
as the same federation with the in-process sim: the HTTP path adds transport, not behaviour.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from fedtextgrad_core.run.run_folder import RunFolder
from tests.support.deployment_helpers import start_sim_server
from tests.support.flower_loopback import LoopbackGrid, make_strategy

pytestmark = pytest.mark.slow  # the sim served by a real `fedtextgrad sim-server` process


@pytest.fixture(scope="module")
def sim_server_process(tmp_path_factory):
    process, url = start_sim_server(tmp_path_factory.mktemp("sim-server") / "sim-server.log")
    try:
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run(tmp_path, **overrides) -> dict:
    strategy, run_config, recorder, _ = make_strategy(tmp_path, **{"num-server-rounds": 2, **overrides})
    strategy.start(LoopbackGrid(run_config))
    folder = RunFolder(recorder.path)
    return {"summary": folder.read_summary(), "rounds": folder.read_rounds()}


def test_federation_over_http_matches_the_in_process_sim(sim_server_process, tmp_path):
    url, process = sim_server_process
    over_http = _run(tmp_path / "http", **{
        "llm-backend": "openai", "llm-base-url": url, "llm-model": "sim",
        "server-backend": "openai", "server-base-url": url, "server-model": "sim",
    })
    in_process = _run(tmp_path / "local")
    for key in ("initial_val_accuracy", "best_val_accuracy", "best_round", "best_prompt", "test_accuracy"):
        assert getattr(over_http["summary"], key) == getattr(in_process["summary"], key), key
    assert [r.merged_prompt for r in over_http["rounds"]] == [r.merged_prompt for r in in_process["rounds"]]
    assert [[u.reply.prompt for u in r.uploads] for r in over_http["rounds"]] == [
        [u.reply.prompt for u in r.uploads] for r in in_process["rounds"]]
    # tokens came from the HTTP usage field, calls went over the wire
    client = over_http["rounds"][0].uploads[0].reply
    assert client.local.llm_calls > 0 and client.local.prompt_tokens > 0 and client.local.completion_tokens > 0
    assert url in client.llm and client.simulated is False  # as the client described its LLM
    assert over_http["summary"].cost["server_merge"]["llm_calls"] == 2
    assert process.poll() is None  # the server process is still serving


def test_sim_server_stops_on_sigterm(tmp_path):
    log = tmp_path / "sim-server.log"
    process, url = start_sim_server(log)
    try:
        assert url in log.read_text()  # the banner names where it serves
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0  # a clean exit, not a kill


def test_clients_given_a_real_endpoint_by_their_node_config_make_the_run_not_simulated(sim_server_process, tmp_path):
    """The run config says `sim`, each SuperNode's node config says otherwise: the summary goes by what the
    clients reported (the served sim is, to a client, any OpenAI-compatible server)."""
    url, _ = sim_server_process
    real = {"llm-backend": "openai", "llm-base-url": url, "llm-model": "sim"}
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1, "merge": "concat"})
    strategy.start(LoopbackGrid(run_config, node_overrides={i: real for i in range(3)}))
    summary = RunFolder(recorder.path).read_summary()
    assert summary.finished and set(summary.client_llms.values()) == {f"sim at {url}"}
    assert summary.simulated is False
    assert not any("(simulated LLM)" in line for line in lines if line.startswith("best prompt"))
    # and the same run with the run config's own sim clients is labelled as simulated
    strategy, run_config, recorder, lines = make_strategy(tmp_path / "sim", **{"num-server-rounds": 1, "merge": "concat"})
    strategy.start(LoopbackGrid(run_config))
    assert RunFolder(recorder.path).read_summary().simulated is True
    assert any("(simulated LLM)" in line for line in lines if line.startswith("best prompt"))
