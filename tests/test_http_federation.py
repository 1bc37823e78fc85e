"""The `fedtextgrad sim-server` command as a real process, driven through the `openai` client path.

A federation whose clients and server all talk HTTP to the served sim must end exactly
as the same federation with the in-process sim: the HTTP path adds transport, not behaviour.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .flower_loopback import LoopbackGrid
from .test_strategy import make_strategy


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def sim_server_process(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("sim-server") / "sim-server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedtextgrad_core.cli", "sim-server", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sim-server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
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
    rounds = [json.loads(line) for line in (recorder.path / "rounds.jsonl").read_text().splitlines()]
    return {"summary": json.loads((recorder.path / "summary.json").read_text()), "rounds": rounds}


def test_federation_over_http_matches_the_in_process_sim(sim_server_process, tmp_path):
    url, process = sim_server_process
    over_http = _run(tmp_path / "http", **{
        "llm-backend": "openai", "llm-base-url": url, "llm-model": "sim",
        "server-backend": "openai", "server-base-url": url, "server-model": "sim",
    })
    in_process = _run(tmp_path / "local")
    for key in ("initial_val_accuracy", "best_val_accuracy", "best_prompt", "test_accuracy"):
        assert over_http["summary"][key] == in_process["summary"][key], key
    assert [r["merged_prompt"] for r in over_http["rounds"]] == [r["merged_prompt"] for r in in_process["rounds"]]
    # tokens came from the HTTP usage field, calls went over the wire
    client = over_http["rounds"][0]["clients"][0]["metrics"]
    assert client["llm_calls"] > 0 and client["prompt_tokens"] > 0 and client["completion_tokens"] > 0
    assert over_http["summary"]["cost"]["server_merge"]["llm_calls"] == 2
    assert process.poll() is None  # the server process is still serving


def test_sim_server_stops_on_sigterm(tmp_path):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "fedtextgrad_core.cli", "sim-server", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0  # a clean exit, not a kill
