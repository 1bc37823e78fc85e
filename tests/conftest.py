"""Shared fixtures: a real OpenAI-compatible sim server on loopback, for the openai backend path,
and an isolated FLWR_HOME for `flwr run . local` whose SuperLink is stopped by PID afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.machine_share import lock_folder, machine
from tests.support.sim_http import serving_sim
from tests.support.simulation_helpers import stop_superlinks


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


@pytest.fixture(scope="module", autouse=True)
def machine_share(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Integration modules share the machine; one marked ``alone`` (a real vLLM) has it to itself."""
    alone = request.node.get_closest_marker("alone") is not None
    if not alone and "integration" not in request.node.path.parts:
        yield
        return
    with machine(lock_folder(tmp_path_factory.getbasetemp()), alone):
        yield


# The longest modules first. Under `pytest -n N --dist loadscope` (the README's test line) xdist
# hands out whole modules (a class of test_deployment.py each) in collection order, so a long one
# collected late would run alone at the end while the other workers sit idle.
LONG_FIRST = ("test_vllm", "test_real_llm", "test_deployment", "test_bad_input_output", "test_deploy_walkthrough",
              "test_compose", "test_experiment", "test_constraints", "test_resume_simulation", "test_e2e_simulation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py"),
                                         len(rank)))
