"""LLM engines: the openai backend against the real sim HTTP server, errors, usage and concurrency."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, LLMError, SimUnsupportedError
from fedtextgrad_core.llm.engine import BACKEND_GROUP, ChatEngine, Usage, backend_names, make_engine
from fedtextgrad_core.llm.openai_transport import OpenAIChat, openai_chat
from fedtextgrad_core.sim import SimLLM, approx_tokens
from fedtextgrad_core.sim.backend import sim_chat
from fedtextgrad_core.sim.server import make_server
from tests.support.concurrency_probe import InFlightProbe
from tests.support.settings_helpers import endpoint

TASK = get_task("object_counting")
QUESTION = "I have a flute, a piano, four stoves, and two violins. How many musical instruments do I have?"


def openai_engine(url: str, **overrides) -> ChatEngine:
    return make_engine(endpoint(backend="openai", base_url=url, model="sim-over-http", timeout=5, **overrides))


def expected_reply(system: str, user: str) -> str:
    return SimLLM().complete([{"role": "system", "content": system}, {"role": "user", "content": user}])


def test_openai_backend_returns_the_text_and_counts_usage(sim_http: str) -> None:
    engine = openai_engine(sim_http)
    reply = engine.generate(QUESTION, system_prompt=TASK.start_prompt)
    assert reply == expected_reply(TASK.start_prompt, QUESTION)
    assert TASK.extract_answer(reply) is not None  # a real answer to the question, with its answer line
    usage = engine.take_usage()
    assert usage.calls == 1 and usage.errors == 0
    assert usage.prompt_tokens == approx_tokens(TASK.start_prompt) + approx_tokens(QUESTION)
    assert usage.completion_tokens == approx_tokens(reply)
    assert engine.take_usage() == Usage()  # taking usage resets it


def test_engine_is_a_textgrad_engine_callable_like_one(sim_http: str) -> None:
    engine = openai_engine(sim_http)
    assert engine(QUESTION, system_prompt=TASK.start_prompt) == expected_reply(TASK.start_prompt, QUESTION)
    assert engine.usage.calls == 1


def test_sim_backend_matches_the_http_path(sim_http: str) -> None:
    in_process = make_engine(endpoint())
    over_http = openai_engine(sim_http)
    for engine in (in_process, over_http):
        assert engine.generate(QUESTION, system_prompt=TASK.start_prompt) == expected_reply(TASK.start_prompt, QUESTION)
    assert in_process.take_usage().prompt_tokens == over_http.take_usage().prompt_tokens


def test_api_key_comes_from_the_named_environment_variable(sim_http: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(port=0)
    seen: list[str | None] = []
    base = server.RequestHandlerClass

    class Spy(base):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            super().do_POST()

    server.RequestHandlerClass = Spy
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        monkeypatch.setenv("FTG_TEST_API_KEY", "key-from-the-environment")
        openai_engine(url, api_key_env="FTG_TEST_API_KEY").generate(QUESTION, system_prompt=TASK.start_prompt)
        openai_engine(url).generate(QUESTION, system_prompt=TASK.start_prompt)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert seen == ["Bearer key-from-the-environment", "Bearer EMPTY"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_at_the_start_naming_the_url_and_the_setting() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        make_engine(endpoint(backend="openai", base_url=url, model="m", timeout=1, startup_wait=0))
    message = str(info.value)
    assert url in message and "model m" in message and "unreachable" in message
    assert "GET " + url + "/models" in message and "'llm-base-url'" in message
    assert time.monotonic() - started < 10  # one quick check, not a timeout per call


def test_http_error_from_the_endpoint_is_an_llm_error(sim_http: str) -> None:
    # The sim refuses a GSM8K-style question with HTTP 400; the client must surface it.
    engine = openai_engine(sim_http)
    with pytest.raises(LLMError, match="refused the request with HTTP 400") as info:
        engine.generate("Natalia sold clips to 48 of her friends. How many clips did she sell?", system_prompt="p")
    assert sim_http in str(info.value)


def test_the_sim_backend_raises_a_clear_error_for_unsupported_questions() -> None:
    with pytest.raises(SimUnsupportedError, match="object counting"):
        make_engine(endpoint()).generate("What is the capital of France?", system_prompt="p")


def test_make_engine_rejects_bad_endpoint_settings() -> None:
    with pytest.raises(ConfigError) as info:
        make_engine(endpoint(backend="openai", model="m"), "server-api-key-env")
    assert info.value.setting == "server-base-url"
    with pytest.raises(ConfigError) as info:
        make_engine(endpoint(backend="anthropic"), "backward-api-key-env")
    assert (info.value.setting, info.value.value) == ("backward-backend", "anthropic")
    assert "sim or openai" in str(info.value)  # the registered backends, named


def test_backends_are_found_by_name_in_their_entry_point_group(sim_http: str) -> None:
    from importlib.metadata import entry_points

    registered = {entry.name: entry.load() for entry in entry_points(group=BACKEND_GROUP)}
    assert registered == {"sim": sim_chat, "openai": openai_chat}
    assert backend_names() == ("sim", "openai")  # the simulator first: it is the default
    # make_engine builds its chat function with the factory registered under the backend's name
    assert isinstance(make_engine(endpoint(backend="openai", base_url=sim_http, model="m"))._chat, OpenAIChat)
    reply, prompt_tokens, completion_tokens = sim_chat(endpoint(), "llm-api-key-env")(
        [{"role": "system", "content": TASK.start_prompt}, {"role": "user", "content": QUESTION}])
    assert reply == expected_reply(TASK.start_prompt, QUESTION) and prompt_tokens > 0 and completion_tokens > 0


def test_engine_counts_failed_calls_as_errors_and_returns_text_for_none() -> None:
    replies: Iterator[str | None] = iter([None])

    def chat(messages):
        reply = next(replies, "boom")
        if reply == "boom":
            raise RuntimeError("endpoint broke")
        return reply, 3, 0

    engine = ChatEngine(endpoint(), chat)
    assert engine.generate("q") == ""
    with pytest.raises(RuntimeError):
        engine.generate("q")
    usage = engine.take_usage()
    assert (usage.calls, usage.errors, usage.prompt_tokens) == (1, 1, 3)
    assert usage.as_metrics("llm_")["llm_calls"] == 1


def test_default_system_prompt_is_used_when_none_is_given() -> None:
    seen = []
    engine = ChatEngine(endpoint(), lambda messages: (seen.append(messages) or "ok", 1, 1))
    engine.generate("hello")
    assert seen[0][0] == {"role": "system", "content": engine.system_prompt} and engine.system_prompt


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_engine_never_exceeds_its_concurrency(concurrency: int) -> None:
    probe = InFlightProbe(concurrency)
    engine = ChatEngine(endpoint(concurrency=concurrency), probe)
    callers = [threading.Thread(target=engine.generate, args=("q",)) for _ in range(3 * concurrency + 2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)
    assert probe.peak == concurrency and not probe.gave_up
    assert engine.take_usage().calls == len(callers)


def test_describe_names_the_endpoint() -> None:
    assert "sim" in endpoint().describe()
    described = endpoint(backend="openai", base_url="http://127.0.0.1:8000/v1", model="qwen").describe()
    assert described == "qwen at http://127.0.0.1:8000/v1"
