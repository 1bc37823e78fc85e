"""Prompt metrics: text statistics by hand, surprisal from a real llama.cpp server, graceful degradation."""

from __future__ import annotations

import logging
import math
import random
import string
import zlib
from collections.abc import Iterator

import pytest

from fedtextgrad_core import text as pm
from fedtextgrad_core.text import REGEX_TOKENIZER, count_tokens, regex_tokens
from fedtextgrad_core.llm.engine import EndpointSettings
from fedtextgrad_core.method.prompt_metrics import (
    PromptMetrics,
    SurprisalClient,
    analyze,
    average_tfidf,
    char_entropy,
    compression_ratio,
    format_metrics_table,
    summarize_surprisal,
    text_metrics,
)

from tests.llama_server import LlamaServer, missing_requirement, start_llama_server

LOGGER = "fedtextgrad_core.method.prompt_metrics"


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    """What a process learned about endpoints (probes, warnings) must not leak between tests."""
    pm.forget_endpoints()
    yield
    pm.forget_endpoints()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- text statistics, against values worked out by hand ----------------------------------


def test_character_entropy_in_bits_per_character() -> None:
    assert char_entropy("aabb") == pytest.approx(1.0)
    assert char_entropy("aaaa") == 0.0
    assert char_entropy("abcd") == pytest.approx(2.0)
    # p(a)=1/2, p(b)=p(c)=1/4: 0.5*1 + 2*0.25*2 = 1.5 bits
    assert char_entropy("aabc") == pytest.approx(1.5)
    assert char_entropy("") == 0.0


def test_compression_ratio_is_compressed_over_raw_so_lower_means_more_redundant() -> None:
    repeated = "List every item. " * 40
    rng = random.Random(7)
    noise = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(len(repeated)))
    assert compression_ratio(repeated) == len(zlib.compress(repeated.encode(), 9)) / len(repeated.encode())
    assert compression_ratio(repeated) < 0.1
    assert compression_ratio(noise) > 0.7
    assert compression_ratio("") == 0.0


def test_words_chars_and_the_regex_fallback_tokenizer() -> None:
    text = "Hello,  world!\nDon't stop."
    metrics = text_metrics(text)
    assert metrics.chars == 26
    assert metrics.words == 4  # whitespace-separated: "Hello," "world!" "Don't" "stop."
    assert regex_tokens(text) == ["Hello", ",", "world", "!", "Don", "'", "t", "stop", "."]
    tokens, tokenizer = count_tokens(text)
    assert (tokens, tokenizer) == (metrics.tokens, metrics.tokenizer)
    if tokenizer == REGEX_TOKENIZER:  # tiktoken's vocabulary is not cached on this machine
        assert tokens == 9
    else:
        assert tokenizer == "tiktoken:cl100k_base"


def test_tiktoken_is_never_allowed_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken_load = pytest.importorskip("tiktoken.load")
    fetched: list[str] = []

    def network(blobpath: str) -> bytes:
        fetched.append(blobpath)
        raise AssertionError("tiktoken tried to download " + blobpath)

    monkeypatch.setattr(tiktoken_load, "read_file", network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-fedtextgrad-cache")  # force a cache miss
    pm._cached_tiktoken.__wrapped__()  # a cache miss means None (the regex fallback)...
    assert fetched == []  # ...and never a request
    assert tiktoken_load.read_file is network  # the guard puts the real function back


def test_average_tfidf_with_sentences_as_documents() -> None:
    # d1 = [the, cat, sat], d2 = [the, dog, ran]; N = 2; tf = 1/3 for each term
    # idf(the) = 1 + ln(2/2) = 1; idf(other) = 1 + ln 2
    # mean over 6 (sentence, term) pairs = (2 * 1/3 + 4 * (1 + ln 2)/3) / 6 = 1/3 + (2/9) ln 2
    value, sentences = average_tfidf("The cat sat. The dog ran.")
    assert sentences == 2
    assert value == pytest.approx(1 / 3 + (2 / 9) * math.log(2))
    # one sentence: idf = 1, so the mean relative frequency of its distinct terms: (2/3 + 1/3) / 2
    assert average_tfidf("a a b") == (pytest.approx(0.5), 1)
    # line breaks and '?' / '!' end sentences too; punctuation-only pieces are no documents
    assert average_tfidf("Why?\nBecause!  ...")[1] == 2
    assert average_tfidf("") == (0.0, 0)


def test_text_metrics_leave_surprisal_empty_not_zero() -> None:
    metrics = text_metrics("You will answer a reasoning question. Think step by step.")
    assert metrics.surprisal_mean is None and metrics.surprisal_max is None
    assert metrics.surprisal_variance is None and metrics.surprisal_model is None
    assert analyze("You will answer a reasoning question. Think step by step.") == metrics
    as_dict = metrics.as_dict()
    assert set(as_dict) == {f for f in PromptMetrics.__dataclass_fields__}
    assert as_dict["sentences"] == 2 and as_dict["surprisal_variance"] is None


def test_surprisal_summary_is_mean_max_and_population_variance() -> None:
    assert summarize_surprisal([1.0, 2.0, 3.0]) == (pytest.approx(2.0), 3.0, pytest.approx(2 / 3))
    assert summarize_surprisal([]) == (None, None, None)


def test_metrics_table_prints_a_dash_for_what_is_missing() -> None:
    table = format_metrics_table([("best.txt", text_metrics("Think step by step."))])
    row = table.splitlines()[2]
    assert row.startswith("best.txt") and row.split()[-3:] == ["-", "-", "-"]
    assert "no endpoint that gives token log-probabilities" in table


# --- endpoints that cannot give log-probabilities -----------------------------------------


def test_sim_http_endpoint_has_no_completions_so_surprisal_is_none_with_one_warning(
        sim_http: str, caplog: pytest.LogCaptureFixture) -> None:
    client = SurprisalClient(sim_http, "sim", timeout=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("Think step by step.") is None
        metrics = analyze("Think step by step. Count carefully.", client)
        assert SurprisalClient(sim_http, "sim").surprisal("again") is None  # a new client, same endpoint
    assert metrics == text_metrics("Think step by step. Count carefully.")  # the fallback tokens, no surprisal
    warned = warnings_of(caplog)
    assert warned == [warned[0]]
    assert warned[0].startswith(f"sim at {sim_http} gives no token log-probabilities; surprisal fields are left empty")
    assert "404" in warned[0]


def test_sim_backend_endpoint_gives_none_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    client = SurprisalClient.from_endpoint(EndpointSettings(backend="sim"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("a prompt") is None
        assert analyze("a prompt", client).surprisal_mean is None
    assert len(warnings_of(caplog)) == 1
    assert "sim (simulated LLM, in-process) gives no token log-probabilities" in warnings_of(caplog)[0]


def test_an_unreachable_endpoint_costs_one_warning_not_one_per_prompt(caplog: pytest.LogCaptureFixture) -> None:
    from tests.llama_server import free_port

    client = SurprisalClient(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=5, bos_text="")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("one") is None and client.surprisal("two") is None
    assert len(warnings_of(caplog)) == 1 and "unreachable" in warnings_of(caplog)[0]


class _Echo:
    """A completions answer as the openai client parses it."""

    def __init__(self, tokens: list[str], values: list[float | None], tops: list[dict | None], completion: int = 1):
        logprobs = type("L", (), {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops})
        self.choices = [type("C", (), {"logprobs": logprobs})]
        self.usage = type("U", (), {"completion_tokens": completion})


def _scripted(monkeypatch: pytest.MonkeyPatch, client: SurprisalClient, answer) -> list[str]:
    sent: list[str] = []

    def create(**request):
        sent.append(request["prompt"])
        assert request["echo"] is True and request["logprobs"] == 1 and request["max_tokens"] == 1
        return answer(request["prompt"])

    monkeypatch.setattr(client._client.completions, "create", create)
    return sent


def test_echoed_logprobs_become_bits_without_the_first_and_the_generated_token(monkeypatch) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="")
    tokens = ["A", " b", " c", "\n"]  # the last one is the generated token
    _scripted(monkeypatch, client, lambda _: _Echo(tokens, [None, -math.log(2), -math.log(4), -0.1],
                                                   [None, {" b": -0.69}, {" c": -1.4}, {"\n": -0.1}]))
    measured = client.measure("A b c")
    assert measured.tokens == 3
    assert measured.bits == [pytest.approx(1.0), pytest.approx(2.0)]
    metrics = analyze("A b c", client)
    assert (metrics.tokens, metrics.tokenizer) == (3, "endpoint:m")
    assert (metrics.surprisal_mean, metrics.surprisal_max) == (pytest.approx(1.5), pytest.approx(2.0))
    assert metrics.surprisal_variance == pytest.approx(0.25)
    assert metrics.surprisal_model == "m at http://127.0.0.1:9/v1"


def test_a_shift_that_no_bos_fixes_leaves_surprisal_empty(monkeypatch, caplog) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m")
    probe = ["1", ",", " 2", ",", " 3", ",", " 4", ",", " 5"]

    def shifted(prompt: str) -> _Echo:  # each top-1 guess is the *next* token: scored one token off
        tops = [None] + [{probe[i + 1] if i + 1 < len(probe) else "\n": -0.1} for i in range(1, len(probe))]
        return _Echo(probe, [None] + [-9.0] * (len(probe) - 1), tops, completion=0)

    sent = _scripted(monkeypatch, client, shifted)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("Think step by step.") is None
        assert client.surprisal("again") is None
    assert sent[0] == pm.ALIGNMENT_PROBE and len(sent) == 1 + len(pm.BOS_CANDIDATES)  # probed, never measured
    assert len(warnings_of(caplog)) == 1 and "one token off" in warnings_of(caplog)[0]


# --- a real model: llama.cpp's server with SmolLM2-135M --------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    # prompt log-probabilities need per-token logits (the helper turns them off for speed, and
    # llama-cpp-python's server default is on); no KV cache, so every prompt is scored afresh
    server = start_llama_server(tmp_path_factory.mktemp("llama") / "llama-server.log",
                                extra_args=("--logits_all", "True", "--cache", "False"))
    try:
        yield server
    finally:
        server.stop()


def test_real_model_surprisal_is_lower_for_a_repeated_sentence_than_for_random_characters(llama) -> None:
    client = SurprisalClient(llama.base_url, llama.alias, timeout=180)
    repeated = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."
    noise = "".join(random.Random(0).choice(string.ascii_letters + string.digits) for _ in range(30))
    measured = client.measure(repeated)
    calm_mean, _, calm_variance = summarize_surprisal(measured.bits)
    wild = analyze(noise, client)
    print(f"\nsurprisal bits/token: repeated sentence mean {calm_mean:.2f} var {calm_variance:.2f} "
          f"({measured.tokens} tokens); random characters mean {wild.surprisal_mean:.2f} "
          f"var {wild.surprisal_variance:.2f} ({wild.tokens} tokens); text sent behind {client._state.prefix!r}")
    assert len(measured.bits) == measured.tokens - 1 > 5  # every token but the first
    assert all(bit >= 0 for bit in measured.bits)
    assert wild.tokenizer == "endpoint:smollm2" and wild.tokens > 5
    assert wild.surprisal_model == f"smollm2 at {llama.base_url}"
    assert wild.surprisal_max >= wild.surprisal_mean > 0 and wild.surprisal_variance > 0
    assert calm_mean < wild.surprisal_mean
    # aligned scores: the third copy of the sentence is nearly certain (scored one token off, > 10 bits)
    assert sum(measured.bits[-7:]) / 7 < 2.5
    # llama-cpp-python scores SmolLM2 (no BOS token) one token off; the client found the fix
    assert client._state.prefix == "<|im_start|>"
