"""Shared fixtures: a real OpenAI-compatible sim server on loopback, for the openai backend path,
and an isolated FLWR_HOME for `flwr run . local` whose SuperLink is stopped by PID afterwards."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fedtextgrad_core.sim.server import make_server
from tests.simulation_helpers import stop_superlinks


@contextmanager
def serving_sim(latency_ms: float = 0.0) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>/v1``) of a sim server serving in a thread."""
    server = make_server(host="127.0.0.1", port=0, latency_ms=latency_ms)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def sim_http() -> Iterator[str]:
    with serving_sim() as url:
        yield url


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    """A FLWR_HOME of this test module's own; its background SuperLink is stopped by PID at the end."""
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    stop_superlinks(home)


# The longest modules first. Under `pytest -n N --dist loadscope` (the README's test line) xdist
# hands out whole modules (a class of test_deployment.py each) in collection order, so a long one
# collected late would run alone at the end while the other workers sit idle.
LONG_FIRST = ("test_real_llm", "test_deployment", "test_bad_input_output", "test_deploy_walkthrough", "test_compose",
              "test_experiment", "test_constraints", "test_resume_simulation", "test_e2e_simulation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py"),
                                         len(rank)))
