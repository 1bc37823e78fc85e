"""Faults of a real HTTP LLM endpoint, from one call up to a federated round.

A real local server (``faulty_llm_server.py``) answers the real ``openai`` client
path with 5xx, 429, 4xx, hangs, empty and non-JSON bodies, replies without an answer
line, dropped connections and refused connections. What must hold: retryable faults
are retried exactly ``max_retries`` times with growing backoff, final ones are not
retried, every error names the endpoint in one plain line, a client's error reaches
the server's round record, and a round with too few clients fails loudly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, LLMError, TransientLLMError
from fedtextgrad_core.llm import openai_transport as openai_backend
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.run.client_round import answer, load_client_data, node_identity
from fedtextgrad_core.run.messages import Phase, RoundRequest
from fedtextgrad_core.run.round_step import RoundFailed
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.server_setup import open_run
from fedtextgrad_core.run.settings import client_settings
from server_app.strategy import PromptStrategy
from tests.support.faulty_llm_server import NO_ANSWER_TEXT, OK_TEXT, FaultyLLMServer, closed_port
from tests.support.flower_loopback import LoopbackGrid, PushPullLoopback, default_run_config
from tests.support.settings_helpers import endpoint

TASK = get_task("object_counting")


@pytest.fixture(autouse=True)
def fresh_endpoint_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test checks its endpoints afresh (a reused port must not skip the start-up check)."""
    monkeypatch.setattr(openai_backend, "_facts", {})
    monkeypatch.setattr(openai_backend, "_down", {})


@pytest.fixture
def faulty() -> Iterator[FaultyLLMServer]:
    with FaultyLLMServer() as server:
        yield server


def engine_for(url: str, **overrides: object) -> ChatEngine:
    settings = {"backend": "openai", "base_url": url, "model": "m", "timeout": 1.0, "max_retries": 2,
                "retry_backoff": 0.01, "startup_wait": 0.0, **overrides}
    return make_engine(endpoint(**settings))


def assert_plain(message: str, url: str) -> None:
    """One line a user can act on: names the endpoint and model, no library internals."""
    assert url in message and "(model m)" in message
    assert "\n" not in message and "Traceback" not in message
    for internal in ("AttributeError", "JSONDecodeError", "httpx", "httpcore", "openai."):
        assert internal not in message
    assert len(message) < 400


# --- one call: what is retried, how often, and what the error says ----------------------------

@pytest.mark.parametrize(("mode", "phrase"), [
    ("http500", "answered HTTP 500"),
    ("http429", "answered HTTP 429"),  # a rate limit that does not lift
    ("die", "is unreachable: Server disconnected without sending a response"),
])
def test_retryable_faults_are_retried_exactly_max_retries_times_then_name_the_endpoint(
        faulty: FaultyLLMServer, mode: str, phrase: str) -> None:
    faulty.mode, faulty.fail_first = mode, 1000
    engine = engine_for(faulty.url)
    with pytest.raises(TransientLLMError) as info:
        engine.generate("How many?", system_prompt="p")
    assert faulty.chat_requests == 3  # the first try and max_retries=2 retries
    usage = engine.take_usage()
    assert (usage.retries, usage.errors, usage.calls) == (2, 1, 0)
    message = str(info.value)
    assert phrase in message and message.endswith("(gave up after 3 attempts)")
    assert_plain(message, faulty.url)


@pytest.mark.parametrize("max_retries", [0, 1, 4])
def test_the_number_of_tries_follows_max_retries(faulty: FaultyLLMServer, max_retries: int) -> None:
    faulty.mode = "http500"
    engine = engine_for(faulty.url, max_retries=max_retries, retry_backoff=0.001)
    with pytest.raises(LLMError):
        engine.generate("q")
    assert faulty.chat_requests == max_retries + 1
    assert engine.usage.retries == max_retries


@pytest.mark.parametrize("mode", ["flaky500", "http429"])
def test_passing_faults_recover_within_the_retries(faulty: FaultyLLMServer, mode: str) -> None:
    faulty.mode, faulty.fail_first = mode, 2
    engine = engine_for(faulty.url)
    assert engine.generate("How many?", system_prompt="p") == OK_TEXT
    assert faulty.chat_requests == 3
    usage = engine.take_usage()
    assert (usage.calls, usage.retries, usage.errors) == (1, 2, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 7)  # the answer's usage, counted once


def test_a_fault_outlasting_the_retries_is_an_error(faulty: FaultyLLMServer) -> None:
    faulty.mode, faulty.fail_first = "flaky500", 3  # one more failure than max_retries allows
    engine = engine_for(faulty.url)
    with pytest.raises(TransientLLMError, match="HTTP 500"):
        engine.generate("q")
    assert faulty.chat_requests == 3
    assert engine.generate("q") == OK_TEXT  # the fourth request passes: a new call starts afresh
    assert engine.usage.errors == 1 and engine.usage.calls == 1


@pytest.mark.parametrize(("mode", "status", "detail"), [
    ("http400", 400, "maximum context length is 4096 tokens"),
    ("http404", 404, "The model 'm' does not exist"),
])
def test_client_errors_are_final_and_never_retried(faulty: FaultyLLMServer, mode: str, status: int,
                                                   detail: str) -> None:
    faulty.mode = mode
    engine = engine_for(faulty.url)
    with pytest.raises(LLMError) as info:
        engine.generate("q")
    assert not isinstance(info.value, TransientLLMError)
    assert faulty.chat_requests == 1
    assert (engine.usage.retries, engine.usage.errors) == (0, 1)
    message = str(info.value)
    assert f"refused the request with HTTP {status}" in message and detail in message
    assert_plain(message, faulty.url)


@pytest.mark.parametrize(("mode", "phrase"), [
    ("empty", "returned an empty body instead of a JSON answer"),
    ("garbage", "returned a body that is not an OpenAI-style JSON answer: '<html><body><h1>Welcome to nginx!"),
])
def test_unusable_bodies_are_final_with_a_plain_message(faulty: FaultyLLMServer, mode: str, phrase: str) -> None:
    # A 200 whose body is not a chat completion will not improve on asking again: not retried.
    faulty.mode = mode
    engine = engine_for(faulty.url)
    with pytest.raises(LLMError) as info:
        engine.generate("q")
    assert not isinstance(info.value, TransientLLMError)
    assert faulty.chat_requests == 1 and engine.usage.retries == 0 and engine.usage.errors == 1
    assert phrase in str(info.value)
    assert_plain(str(info.value), faulty.url)


@pytest.mark.slow  # waits out a request timeout
def test_a_hanging_endpoint_times_out_naming_it_in_bounded_time() -> None:
    with FaultyLLMServer("hang", hang_seconds=5.0) as server:
        engine = engine_for(server.url, timeout=0.5, max_retries=1)
        started = time.monotonic()
        with pytest.raises(TransientLLMError) as info:
            engine.generate("q")
        elapsed = time.monotonic() - started
        assert server.chat_requests == 2
    assert 0.9 <= elapsed < 3.0  # two timeouts of 0.5 s, not the server's 5 s
    assert "did not answer in time" in str(info.value)
    assert_plain(str(info.value), server.url)
    assert engine.usage.retries == 1 and engine.usage.errors == 1


def test_a_reply_without_an_answer_line_is_scored_malformed_not_a_crash(faulty: FaultyLLMServer) -> None:
    faulty.mode = "no_answer"
    engine = engine_for(faulty.url)
    reply = engine.generate("How many?", system_prompt=TASK.start_prompt)
    assert reply == NO_ANSWER_TEXT
    assert TASK.score(reply, "3") == (False, True)  # wrong and malformed
    examples = [Example(f"I have {n} apples. How many fruits do I have?", str(n)) for n in range(1, 5)]
    scores = evaluate_prompt(engine, TASK, TASK.start_prompt, examples)
    assert (scores.correct, scores.total, scores.malformed) == (0, 4, 4)
    assert engine.usage.errors == 0


# --- refused connections: at start-up and mid-run ---------------------------------------------

def test_a_closed_port_fails_at_engine_creation_quickly_naming_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    started = time.monotonic()
    with pytest.raises(LLMError) as info:
        engine_for(url)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert url in message and "unreachable" in message and f"GET {url}/models" in message
    assert "'llm-base-url'" in message


@pytest.mark.parametrize(("models_mode", "phrase"), [
    ("http500", "answered HTTP 500"),
    ("http404", "refused the request with HTTP 404"),
    ("garbage", "not an OpenAI-style JSON answer"),  # e.g. a web page where the API root should be
])
def test_a_broken_models_route_fails_at_engine_creation(faulty: FaultyLLMServer, models_mode: str,
                                                        phrase: str) -> None:
    faulty.models_mode = models_mode
    with pytest.raises(LLMError) as info:
        engine_for(faulty.url, backend="openai")
    message = str(info.value)
    assert phrase in message and f"GET {faulty.url}/models" in message and "'llm-base-url'" in message
    assert_plain(message, faulty.url)
    assert faulty.models_requests == 1 and faulty.chat_requests == 0


def test_the_start_up_check_names_the_setting_of_the_role() -> None:
    # how long the check waits is tested below; here only what it names matters, so no wait
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(LLMError, match="'backward-base-url'"):
        make_engine(endpoint(backend="openai", base_url=url, model="m", startup_wait=0.0), "backward-api-key-env")


def test_an_endpoint_that_goes_away_mid_run_is_retried_then_named() -> None:
    server = FaultyLLMServer().start()
    try:
        engine = engine_for(server.url)
        assert engine.generate("q") == OK_TEXT  # a pooled keep-alive connection now exists
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(TransientLLMError) as info:
        engine.generate("q again")
    assert time.monotonic() - started < 5
    assert server.chat_requests == 1  # nothing more reached the stopped server
    usage = engine.take_usage()
    assert (usage.calls, usage.retries, usage.errors) == (1, 2, 1)
    assert "is unreachable" in str(info.value) and "Connection refused" in str(info.value)
    assert_plain(str(info.value), server.url)


# --- backoff ---------------------------------------------------------------------------------

def test_backoff_between_retries_grows() -> None:
    with FaultyLLMServer("http500") as server:
        engine = engine_for(server.url, max_retries=3, retry_backoff=0.05)
        with pytest.raises(LLMError):
            engine.generate("q")
        arrivals = list(server.arrivals)
    assert len(arrivals) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    for k, gap in enumerate(gaps):
        # the k-th delay is 0.05 * 2**k seconds times a jitter in [0.5, 1]
        assert gap >= 0.5 * 0.05 * 2 ** k, gaps
    assert sum(gaps) < 0.05 * (1 + 2 + 4) + 1.5, gaps  # and it is not wildly longer than asked


# --- a client's work: the error reaches the caller, naming the endpoint ------------------------

def fault_config(**overrides: object) -> dict[str, object]:
    """A one-round run whose server merges with the simulated LLM on purpose: left unset, a client with a
    real LLM would not train for it (RoundRequest.simulated_only), and its faults would not be reached."""
    return default_run_config(**{"num-server-rounds": 1, "llm-max-retries": 1, "llm-retry-backoff": 0.01,
                                 "llm-timeout": 1.0, "server-backend": "sim", **overrides})


def faulty_node(url: str, partition: int = 0, **extra: object) -> dict[str, object]:
    return {"partition-id": partition, "num-partitions": 3, "llm-backend": "openai", "llm-base-url": url,
            "llm-model": "m", **extra}


def request(phase: Phase) -> RoundRequest:
    return RoundRequest(phase=phase.value, server_round=1, prompt=TASK.start_prompt)


def test_client_evaluation_against_a_failing_endpoint_raises_naming_it(faulty: FaultyLLMServer) -> None:
    faulty.mode = "http500"
    with pytest.raises(LLMError) as info:
        answer(fault_config(), faulty_node(faulty.url), request(Phase.EVALUATE))
    assert faulty.url in str(info.value) and "HTTP 500" in str(info.value)
    # every question that was started was tried twice (llm-max-retries=1); the rest were cancelled
    assert faulty.chat_requests > 0 and faulty.chat_requests % 2 == 0


@pytest.mark.parametrize(("node_retries", "tries"), [(None, 2), (0, 1)])
def test_client_training_against_a_failing_endpoint_raises_naming_it(
        faulty: FaultyLLMServer, node_retries: int | None, tries: int) -> None:
    faulty.mode = "http500"
    extra = {} if node_retries is None else {"llm-max-retries": node_retries}  # a node may set its own
    with pytest.raises(LLMError) as info:
        answer(fault_config(), faulty_node(faulty.url, **extra), request(Phase.TRAIN))
    assert faulty.url in str(info.value) and "HTTP 500" in str(info.value)
    # the first batch's questions (at most 3) were each tried 1 + retries times; how many of them
    # started before the first failure ended the step depends on thread timing
    assert 0 < faulty.chat_requests <= 3 * tries and faulty.chat_requests % tries == 0


# --- a federated round: one faulty node is reported, two fail the round ------------------------

def make_strategy(tmp_path, run_config: dict[str, object]):
    lines: list[str] = []
    run = open_run({**run_config, "results-dir": str(tmp_path), "run-name": "run"}, echo=lines.append)
    return PromptStrategy(run.federation), run.recorder, lines


def test_a_node_with_a_failing_endpoint_is_reported_and_the_round_goes_on(
        tmp_path, faulty: FaultyLLMServer) -> None:
    faulty.mode = "http500"
    run_config = fault_config()
    strategy, recorder, lines = make_strategy(tmp_path, run_config)
    grid = LoopbackGrid(run_config, node_overrides={2: faulty_node(faulty.url, partition=2)})
    strategy.start(grid)
    folder = RunFolder(recorder.path)
    summary = folder.read_summary()
    assert summary.finished is True and summary.error == ""
    [record] = folder.read_rounds()
    assert {u.label for u in record.uploads} == {"0", "1"}
    # node 102 never answered successfully, but its error replies name the partition it holds
    failures = {(f.label, f.stage): f.reason for f in record.failures}
    assert set(failures) == {("2", "train"), ("2", "evaluate")}
    assert {f.node_id for f in record.failures} == {102}
    assert [(f.label, f.stage) for f in summary.test_failures] == [("2", "test")]
    for reason in [*failures.values(), summary.test_failures[0].reason]:
        assert faulty.url in reason and "(model m)" in reason and "HTTP 500" in reason
    assert any("FAILED" in line and faulty.url in line for line in lines)
    assert faulty.chat_requests > 0


def test_a_client_with_a_real_llm_answers_the_start_evaluation_but_does_not_train_for_a_simulated_server_llm(
        tmp_path, faulty: FaultyLLMServer) -> None:
    """server-backend left unset with a summarising merge: the server would merge with the simulated LLM,
    so a client whose LLM is real stops the run. The start prompt's evaluation travels with round 1's
    training in one message; the real client scores the start prompt on its LLM (which is how the server
    learns of it, and says so naming the setting) and refuses the training without one call to its LLM."""
    run_config = default_run_config(**{"num-server-rounds": 1, "merge": "summarize-uid", "llm-timeout": 1.0})
    node = faulty_node(faulty.url, partition=2)
    strategy, recorder, lines = make_strategy(tmp_path, run_config)
    with pytest.raises(ConfigError) as stopped:
        strategy.start(PushPullLoopback(run_config, node_overrides={2: node}))  # sends as a deployment does
    assert stopped.value.setting == "server-backend" and f"client 2 uses m at {faulty.url}" in str(stopped.value)
    validation = load_client_data(client_settings(run_config, node), node_identity(node)).val
    assert faulty.chat_requests == len(validation) > 0  # the evaluation's calls, and no training's
    assert RunFolder(recorder.path).read_summary().error.startswith("ConfigError")
    assert any("server-backend" in line for line in lines)  # what the server's log shows


def test_too_many_nodes_with_failing_endpoints_fail_the_round_naming_them(
        tmp_path, faulty: FaultyLLMServer) -> None:
    faulty.mode = "http500"
    run_config = fault_config(**{"min-train-clients": 2})
    strategy, _, _ = make_strategy(tmp_path, run_config)
    overrides = {p: faulty_node(faulty.url, partition=p) for p in (1, 2)}
    grid = LoopbackGrid(run_config, node_overrides=overrides)
    with pytest.raises(RoundFailed) as failed:
        strategy.start(grid)
    message = str(failed.value)
    assert "at least 2 required" in message
    # both clients failed the same way: one reason, naming both
    assert "clients 1, 2: " in message and faulty.url in message


# --- the per-endpoint limit on requests in flight, seen by the server --------------------------

def run_many(engines: list[ChatEngine], per_engine: int) -> list[str]:
    jobs = [(engine, f"question {i}") for engine in engines for i in range(per_engine)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job[0].generate(job[1]), jobs))


def test_the_server_never_sees_more_requests_in_flight_than_the_concurrency() -> None:
    with FaultyLLMServer("ok", delay=0.15) as server:
        replies = run_many([engine_for(server.url, concurrency=3)], per_engine=12)
        assert replies == [OK_TEXT] * 12 and server.chat_requests == 12
        assert server.max_in_flight == 3


def test_engines_on_the_same_endpoint_share_one_limit() -> None:
    with FaultyLLMServer("ok", delay=0.15) as server:
        engines = [engine_for(server.url, concurrency=3), engine_for(server.url, concurrency=3, temperature=0.7)]
        run_many(engines, per_engine=6)
        assert server.chat_requests == 12
        assert server.max_in_flight == 3
        assert [e.usage.calls for e in engines] == [6, 6]


def test_the_server_does_see_parallel_requests_when_the_limit_allows() -> None:
    # the measurement itself works: without a tight limit, requests do overlap
    with FaultyLLMServer("ok", delay=0.3) as server:
        run_many([engine_for(server.url, concurrency=12)], per_engine=8)
        assert server.max_in_flight > 3


# --- slow and late servers --------------------------------------------------------------------------


@pytest.mark.slow  # waits for a late server
def test_a_server_that_comes_up_late_is_waited_for_within_llm_startup_wait(capsys) -> None:
    """A vLLM still loading its model refuses connections for a while: the start-up check waits for it,
    says so once, and goes on when it answers."""
    from fedtextgrad_core.sim.server import make_server

    port = closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    started_server: list = []

    def come_up_late() -> None:
        time.sleep(3.0)
        server = make_server("127.0.0.1", port)
        started_server.append(server)
        server.serve_forever(poll_interval=0.05)

    import threading

    threading.Thread(target=come_up_late, daemon=True).start()
    began = time.monotonic()
    try:
        engine = engine_for(url, startup_wait=30.0)
        waited = time.monotonic() - began
        assert 2.5 < waited < 20
        said = capsys.readouterr().err
        assert said.count("is not answering yet") == 1 and "llm-startup-wait" in said and url in said
        assert engine.server_kind == "unknown"  # the sim server names no known kind
    finally:
        for server in started_server:
            server.shutdown()
            server.server_close()


@pytest.mark.slow  # waits out llm-startup-wait
def test_a_server_that_never_comes_up_fails_after_llm_startup_wait_saying_so() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    began = time.monotonic()
    with pytest.raises(LLMError) as info:
        engine_for(url, startup_wait=3.0)
    assert 2.5 < time.monotonic() - began < 15
    assert "waited 3 s for it (llm-startup-wait)" in str(info.value) and "unreachable" in str(info.value)


@pytest.mark.slow  # waits out llm-startup-wait twice
def test_a_server_waited_out_in_vain_is_not_waited_for_again_by_the_next_request(capsys) -> None:
    """A client answers a round's evaluation and the next training in one process: when the first waited
    llm-startup-wait for its server in vain, the second fails at once with the same error instead of
    waiting as long again (which doubled the time before the server heard of it). Once that long has
    passed, the server is waited for again."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(LLMError) as first:
        engine_for(url, startup_wait=2.0)
    assert capsys.readouterr().err.count("is not answering yet") == 1
    with pytest.raises(LLMError) as second:
        engine_for(url, startup_wait=2.0)
    assert "is not answering yet" not in capsys.readouterr().err  # not waited for
    assert str(second.value).startswith(str(first.value)) and "waits again only after 2 s" in str(second.value)
    assert_plain(str(second.value), url)
    openai_backend._down.update({key: (0.0, error) for key, (_, error) in openai_backend._down.items()})  # expired
    with pytest.raises(LLMError) as third:
        engine_for(url, startup_wait=2.0)
    assert capsys.readouterr().err.count("is not answering yet") == 1 and str(third.value) == str(first.value)


@pytest.mark.slow  # waits out timeouts
def test_a_timed_out_request_is_sent_again_only_after_waiting_as_long_as_it_ran(faulty: FaultyLLMServer) -> None:
    """The server may still be busy with a request that timed out: the retry must not pile a second copy
    on top at once (with a 0.01 s backoff, the old retry came back at once)."""
    faulty.mode = "hang"
    faulty.hang_seconds = 1.5
    engine = engine_for(faulty.url, timeout=1.0, max_retries=1, retry_backoff=0.01)
    with pytest.raises(TransientLLMError, match="did not answer in time"):
        engine.generate("Q?", system_prompt="p")
    first, second = faulty.arrivals[:2]
    assert second - first >= 2.0  # 1 s until the timeout, then at least as long again before the retry


def test_the_timeout_follows_the_server_kind_unless_set(faulty: FaultyLLMServer) -> None:
    """llm-timeout 0 (the default): long for local CPU servers, shorter for GPU servers and hosted APIs."""
    from fedtextgrad_core.llm.openai_transport import AUTO_TIMEOUT_SECONDS

    auto = engine_for(faulty.url, timeout=0.0, server_kind="llama.cpp")
    assert auto._chat.timeout == AUTO_TIMEOUT_SECONDS["llama.cpp"] == 900.0
    assert engine_for(faulty.url, timeout=0.0, server_kind="vllm")._chat.timeout == 300.0
    assert engine_for(faulty.url, timeout=42.0, server_kind="llama.cpp")._chat.timeout == 42.0


@pytest.mark.slow  # waits while a wait is reported
def test_a_long_wait_is_reported_while_it_lasts(faulty: FaultyLLMServer, capsys, monkeypatch) -> None:
    from fedtextgrad_core.llm import waiting

    monkeypatch.setattr(waiting, "REPORT_EVERY_SECONDS", 0.5)
    monkeypatch.setattr(waiting, "CHECK_EVERY_SECONDS", 0.1)
    faulty.mode = "ok"
    faulty.delay = 1.5
    engine_for(faulty.url, timeout=10.0).generate("Q?", system_prompt="p")
    said = capsys.readouterr().err
    assert f"waiting for LLM endpoint {faulty.url} (model m): 1 request(s) in flight" in said
    assert "timeout 10 s" in said
