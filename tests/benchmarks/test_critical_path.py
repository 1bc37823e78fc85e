"""The overhead benchmark's ideal time: the critical path of a known call log, and a real sim call log."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.sim.server import make_server
from tests.benchmarks.critical_path import (
    SERVER,
    Call,
    Structure,
    StructureError,
    Window,
    busy_fraction,
    client_waves,
    figures,
    phases,
    read_call_log,
)

LATENCY = 0.2
# batch 3, 2 requests at a time: a batch takes 2 waves; validation of 5 takes 3
STRUCTURE = Structure(latency=LATENCY, concurrency=2, batch_size=3, val_sizes={"0": 5, "1": 5})


def calls(source: str, kinds: list[str], start: float) -> list[Call]:
    """Calls of one client, each starting a little after the previous (only their window matters)."""
    return [Call(source, kind, start + 0.001 * i, start + 0.001 * i + LATENCY) for i, kind in enumerate(kinds)]


def test_a_training_window_counts_batches_feedback_rewrites_and_validation() -> None:
    # step 1: batch, 3 feedback, rewrite, re-score; step 2: batch with no mistakes; then validation
    kinds = ["answer"] * 3 + ["feedback"] * 3 + ["rewrite"] + ["answer"] * 3 + ["answer"] * 3 + ["answer"] * 5
    # 3 batch groups x 2 waves + 3 feedback + 1 rewrite + 3 validation waves
    assert client_waves(kinds, "train", STRUCTURE, "0") == 3 * 2 + 3 + 1 + 3


def test_an_evaluation_window_is_answers_concurrency_at_a_time() -> None:
    assert client_waves(["answer"] * 5, "evaluate", STRUCTURE, "0") == 3
    with pytest.raises(StructureError, match="TextGrad calls in an evaluation window"):
        client_waves(["answer", "feedback"], "evaluate", STRUCTURE, "0")


def test_answers_that_do_not_split_into_batches_are_refused() -> None:
    with pytest.raises(StructureError, match="do not split into batches of 3 plus 5"):
        client_waves(["answer"] * 7, "train", STRUCTURE, "0")


def test_the_critical_path_takes_the_slowest_client_per_window_and_adds_the_merge() -> None:
    # round 0 evaluation [0, 1); training [1, 5); the server merges at 5.1; evaluation [6, 7)
    log = (calls("0", ["answer"] * 5, 0.0) + calls("1", ["answer"] * 4, 0.0)
           + calls("0", ["answer"] * 3 + ["feedback"] * 2 + ["rewrite"] + ["answer"] * 5, 1.0)  # 2+2+1+3 = 8
           + calls("1", ["answer"] * 3 + ["answer"] * 5, 1.0)  # a step without mistakes: 2 + 3 = 5
           + calls(SERVER, ["merge"], 5.1)
           + calls("0", ["answer"] * 5, 6.0) + calls("1", ["answer"] * 5, 6.0))
    windows = [Window("round 0 evaluate val", "evaluate", 0.0, 1.0), Window("round 1 train", "train", 1.0, 5.0),
               Window("round 1 evaluate val", "evaluate", 6.0, 7.0)]
    run = phases(log, windows, STRUCTURE, 0.0, 7.5)
    assert [p.label for p in run] == ["start", "round 0 evaluate val", "server after round 0 evaluate val",
                                      "round 1 train", "server after round 1 train", "round 1 evaluate val", "end"]
    assert [p.waves for p in run if p.window] == [{"0": 3, "1": 2}, {"0": 8, "1": 5}, {"0": 3, "1": 3}]
    assert run[4].waves == {SERVER: 1}
    total = figures(log, run, STRUCTURE, 0.0, 7.5)
    assert total.ideal == pytest.approx((3 + 8 + 1 + 3) * LATENCY)
    assert total.calls == len(log) == 5 + 4 + 11 + 8 + 1 + 10
    assert total.sequential_ideal == pytest.approx(39 * LATENCY)
    assert total.measured == pytest.approx(7.5)


def test_a_client_call_outside_every_window_breaks_the_structure() -> None:
    log = calls("0", ["answer"], 2.0)
    with pytest.raises(StructureError, match="outside any server window"):
        phases(log, [Window("round 0 evaluate val", "evaluate", 0.0, 1.0)], STRUCTURE, 0.0, 3.0)


def test_busy_fraction_counts_overlapping_calls_once() -> None:
    log = [Call("0", "answer", 0.0, 1.0), Call("1", "answer", 0.5, 1.5), Call("0", "answer", 3.0, 4.0)]
    assert busy_fraction(log, 0.0, 4.0) == pytest.approx(2.5 / 4.0)


def test_the_sim_server_logs_each_call_with_its_kind_and_latency(tmp_path) -> None:
    log_path = tmp_path / "calls.jsonl"
    server = make_server(port=0, latency_ms=50, call_log=log_path)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=10)
        before = time.time()
        client.chat.completions.create(model="sim", messages=[
            {"role": "system", "content": get_task("object_counting").start_prompt},
            {"role": "user", "content": "I have a flute and two pianos. How many musical instruments do I have?"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="sim", messages=[])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["kind"], e["status"]) for e in entries] == [("answer", 200), ("invalid", 400)]
    assert before <= entries[0]["start"] and entries[0]["end"] - entries[0]["start"] >= 0.05
    with pytest.raises(StructureError, match="failed with HTTP 400"):
        read_call_log(log_path, "0")
