"""ChatEngine.cascade: work on a graph whose nodes become ready as others finish (TextGrad's backward pass)."""

from __future__ import annotations

import threading
import time

import pytest

from fedtextgrad_core.llm.engine import ChatEngine
from tests.support.concurrency_probe import InFlightProbe
from tests.support.settings_helpers import endpoint

# three branches of two nodes each, and a node that needs all three branches
NEEDS = {"a1": [], "b1": [], "c1": [], "a2": ["a1"], "b2": ["b1"], "c2": ["c1"], "end": ["a2", "b2", "c2"]}
FIRST = ["a1", "b1", "c1"]


def graph_work(engine: ChatEngine, log: list[str], lock: threading.Lock):
    """``work`` over NEEDS: each node one LLM call; hands back the nodes whose needs are all done."""
    waiting = {node: len(needs) for node, needs in NEEDS.items()}

    def work(node: str) -> list[str]:
        engine.generate(node)
        with lock:
            log.append(node)
            ready = []
            for other, needs in NEEDS.items():
                if node in needs:
                    waiting[other] -= 1
                    if waiting[other] == 0:
                        ready.append(other)
        return ready

    return work


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_every_node_runs_once_after_what_it_needs_and_up_to_the_limit(concurrency: int) -> None:
    probe = InFlightProbe(target=min(concurrency, 3))  # three branches at most run side by side
    engine = ChatEngine(endpoint(concurrency=concurrency), probe)
    log: list[str] = []
    engine.cascade(graph_work(engine, log, threading.Lock()), FIRST)
    assert sorted(log) == sorted(NEEDS)
    for node, needs in NEEDS.items():
        assert all(log.index(need) < log.index(node) for need in needs), (node, log)
    assert probe.peak == min(concurrency, 3) and not probe.gave_up
    assert engine.take_usage().calls == len(NEEDS)


def test_inside_a_worker_it_runs_inline_in_the_order_nodes_became_ready() -> None:
    engine = ChatEngine(endpoint(concurrency=2), lambda messages: ("ok", 1, 1))
    log: list[str] = []
    engine.map(lambda _: engine.cascade(graph_work(engine, log, threading.Lock()), FIRST), [0, 1])
    # two cascades, each in its own worker, each breadth-first and alone in its thread
    assert sorted(log) == sorted(2 * list(NEEDS))
    assert log.count("end") == 2


def test_a_failure_is_raised_after_the_calls_in_flight_finish() -> None:
    finished: list[str] = []

    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        node = messages[-1]["content"]
        if node == "b1":
            raise ValueError("b1 failed")
        time.sleep(0.2 if node == "a1" else 0.0)
        finished.append(node)
        return "ok", 1, 1

    engine = ChatEngine(endpoint(concurrency=4, max_retries=0), chat)
    log: list[str] = []
    with pytest.raises(ValueError, match="b1 failed"):
        engine.cascade(graph_work(engine, log, threading.Lock()), FIRST)
    snapshot = list(finished)
    time.sleep(0.4)
    assert "a1" in snapshot  # waited for: nothing of the cascade runs on after it raised
    assert finished == snapshot and "end" not in finished
