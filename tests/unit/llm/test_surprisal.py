"""The surprisal client (fedtextgrad_core.llm.surprisal): both routes against stand-ins, and graceful degradation.

Against a real llama.cpp server: tests/integration/test_surprisal.py. What analyze() makes of
the numbers: tests/unit/method/test_prompt_metrics.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm import surprisal as sp
from fedtextgrad_core.llm.surprisal import SurprisalClient
from tests.support.llama_server import free_port
from tests.support.settings_helpers import endpoint
from tests.support.surprisal_fakes import BOS_ID, Echo, FakeLlamaCpp, scripted, toy_bits

LOGGER = "fedtextgrad_core.llm.surprisal"


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    """What a process learned about endpoints (probes, warnings) must not leak between tests."""
    sp.forget_endpoints()
    yield
    sp.forget_endpoints()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- endpoints that cannot give log-probabilities -----------------------------------------


def test_sim_http_endpoint_has_no_completions_so_surprisal_is_none_with_one_warning(
        sim_http: str, caplog: pytest.LogCaptureFixture) -> None:
    client = SurprisalClient(sim_http, "sim", timeout=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("Think step by step.") is None
        assert client.measure("Think step by step. Count carefully.") is None
        assert SurprisalClient(sim_http, "sim").surprisal("again") is None  # a new client, same endpoint
    warned = warnings_of(caplog)
    assert warned == [warned[0]]
    assert warned[0].startswith(f"sim at {sim_http} gives no token log-probabilities; surprisal fields are left empty")
    assert "404" in warned[0]


def test_sim_backend_endpoint_gives_none_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    client = SurprisalClient.from_endpoint(endpoint(backend="sim"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("a prompt") is None
        assert client.measure("a prompt") is None
    assert len(warnings_of(caplog)) == 1
    assert "sim (simulated LLM, in-process) gives no token log-probabilities" in warnings_of(caplog)[0]


def test_an_unreachable_endpoint_costs_one_warning_not_one_per_prompt(caplog: pytest.LogCaptureFixture) -> None:
    client = SurprisalClient(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=5, bos_text="")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("one") is None and client.surprisal("two") is None
    assert len(warnings_of(caplog)) == 1 and "unreachable" in warnings_of(caplog)[0]


def test_an_unreachable_llamacpp_endpoint_on_the_forced_route_costs_one_warning(caplog) -> None:
    client = SurprisalClient(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=5, method=sp.FORCED_NEXT_TOKEN)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("one") is None and client.surprisal("two") is None
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "POST /tokenize at http://127.0.0.1:" in warned[0] and "unreachable" in warned[0]


# --- the echo route, with scripted answers --------------------------------------------------


def test_echoed_logprobs_become_bits_without_the_first_and_the_generated_token(monkeypatch) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="")
    tokens = ["A", " b", " c", "\n"]  # the last one is the generated token
    scripted(monkeypatch, client, lambda _: Echo(tokens, [None, -math.log(2), -math.log(4), -0.1],
                                                 [None, {" b": -0.69}, {" c": -1.4}, {"\n": -0.1}]))
    measured = client.measure("A b c")
    assert measured is not None and measured.tokens == 3
    assert measured.bits == [pytest.approx(1.0), pytest.approx(2.0)]
    assert measured.method == "echo-logprobs" and client.tokenizer == "endpoint:m"
    assert client.endpoint == "m at http://127.0.0.1:9/v1"
    capped = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="", max_tokens=1)
    scripted(monkeypatch, capped, lambda _: Echo(tokens, [None, -math.log(2), -math.log(4), -0.1], [None] * 4))
    assert capped.measure("A b c") == sp.TokenSurprisal(tokens=3, bits=[1.0], method="echo-logprobs")


def test_a_shift_that_no_bos_fixes_leaves_surprisal_empty(monkeypatch, caplog) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m")
    probe = ["1", ",", " 2", ",", " 3", ",", " 4", ",", " 5"]

    def shifted(prompt: str) -> Echo:  # each top-1 guess is the *next* token: scored one token off
        tops = [None] + [{probe[i + 1] if i + 1 < len(probe) else "\n": -0.1} for i in range(1, len(probe))]
        return Echo(probe, [None] + [-9.0] * (len(probe) - 1), tops, completion=0)

    sent = scripted(monkeypatch, client, shifted)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("Think step by step.") is None
        assert client.surprisal("again") is None
    assert sent[0] == sp.ALIGNMENT_PROBE and len(sent) == 1 + len(sp.BOS_CANDIDATES)  # probed, never measured
    assert len(warnings_of(caplog)) == 1 and "one token off" in warnings_of(caplog)[0]


# --- the forced-next-token route, against a small stand-in for llama.cpp's server ------------


@pytest.fixture
def fake_llamacpp() -> Iterator[FakeLlamaCpp]:
    fake = FakeLlamaCpp()
    yield fake
    fake.close()


def test_forced_route_scores_each_token_given_the_ids_before_it(fake_llamacpp: FakeLlamaCpp) -> None:
    client = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10)
    measured = client.measure("abcab")
    ids = [97, 98, 99, 97, 98]
    assert measured == sp.TokenSurprisal(tokens=5, bits=toy_bits(ids[1:], first_context=1),
                                         method=sp.FORCED_NEXT_TOKEN)  # no BOS: the first token has no context
    assert not any(path == "/v1/completions" for path, _ in fake_llamacpp.requests)  # known as llama.cpp: no echo try
    check, scoring = fake_llamacpp.completions()[:2], fake_llamacpp.completions()[2:]
    assert len(check) == 2 and "logit_bias" not in check[0] and check[1]["logit_bias"][0][1] == sp.FORCE_BIAS
    assert [body["prompt"] for body in scoring] == [ids[:k] for k in range(1, 5)]
    for k, body in enumerate(scoring, start=1):
        assert body["logit_bias"] == [[ids[k], 100.0]]
        assert (body["n_predict"], body["n_probs"], body["temperature"], body["cache_prompt"]) == (1, 1, 0.0, True)
        assert body["post_sampling_probs"] is False

    assert client.measure("abcab") == measured  # the route is known now: no second check
    assert len(fake_llamacpp.completions()) == 2 + 4 + 4


def test_forced_route_scores_the_first_token_after_the_bos_the_server_adds() -> None:
    fake = FakeLlamaCpp(add_bos=True)
    try:
        measured = SurprisalClient(fake.base_url, "toy", timeout=10).measure("abcab")
    finally:
        fake.close()
    ids = [97, 98, 99, 97, 98]
    assert measured is not None and measured.tokens == 5  # the text's own tokens: the BOS is not counted...
    assert measured.bits == toy_bits(ids, first_context=1)  # ...but it is the context of the first one
    assert [body["prompt"] for body in fake.completions()[2:]] == [[BOS_ID, *ids[:k]] for k in range(5)]


def test_max_tokens_caps_the_tokens_scored_and_so_the_requests(fake_llamacpp: FakeLlamaCpp) -> None:
    text = "The quick brown fox"
    measured = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10, max_tokens=3).measure(text)
    assert measured is not None and (measured.tokens, len(measured.bits)) == (len(text), 3)
    assert len(fake_llamacpp.completions()) == 2 + 3
    with pytest.raises(ConfigError, match="max_tokens"):
        SurprisalClient(fake_llamacpp.base_url, "toy", max_tokens=0)
    with pytest.raises(ConfigError, match="surprisal method"):
        SurprisalClient(fake_llamacpp.base_url, "toy", method="guess")


def test_a_server_that_reports_biased_probabilities_is_refused(fake_llamacpp, caplog) -> None:
    fake_llamacpp.leaky = True
    client = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10, method=sp.FORCED_NEXT_TOKEN)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("Think step by step.") is None
        assert client.surprisal("again") is None
    assert len(fake_llamacpp.completions()) == 2  # the check only; nothing scored with a leaking bias
    assert len(warnings_of(caplog)) == 1 and "include the bias" in warnings_of(caplog)[0]


def test_a_slow_request_or_an_unforceable_token_costs_that_text_only(fake_llamacpp, caplog) -> None:
    client = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=0.3)
    text = "abcdefghijklmnopqrstuvwxyz"
    fake_llamacpp.slow_from = 20  # the route check (15 tokens of context) passes; the 20th token times out
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.measure(text) is None
        fake_llamacpp.slow_from = None
        fake_llamacpp.refuse = {ord("e")}
        assert client.measure(text) is None
        fake_llamacpp.refuse = set()
        measured = client.measure(text)
    assert measured is not None and len(measured.bits) == len(text) - 1
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "did not answer within 0.3 s" in warned[0]  # one warning for passing failures


def test_auto_switches_to_the_forced_route_when_echo_gives_no_prompt_logprobs(caplog) -> None:
    fake = FakeLlamaCpp(owned_by="me")  # not recognisable as llama.cpp, so the echo route is tried first
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            measured = SurprisalClient(fake.base_url, "toy", timeout=10, bos_text="").measure("abc")
    finally:
        fake.close()
    assert measured is not None
    assert measured.method == sp.FORCED_NEXT_TOKEN and measured.bits == toy_bits([98, 99], first_context=1)
    assert [path for path, _ in fake.requests if path.startswith("/v1/completions")] == ["/v1/completions"]
    assert any("no logprobs of prompt tokens" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_the_forced_route_sends_the_api_key_to_the_endpoint_it_was_given(fake_llamacpp, monkeypatch) -> None:
    monkeypatch.setenv("FTG_SURPRISAL_TEST_KEY", "sk-site-secret")
    client = SurprisalClient(fake_llamacpp.base_url, "toy", "FTG_SURPRISAL_TEST_KEY", timeout=10)
    assert client.measure("abc") is not None
    native = [headers for path, headers in fake_llamacpp.headers if path in ("/tokenize", "/completion")]
    assert native and all(h.get("Authorization") == "Bearer sk-site-secret" for h in native)
