"""Prompt metrics: text statistics by hand, surprisal from a real llama.cpp server, graceful degradation."""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import string
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedtextgrad_core import text
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.method import prompt_metrics as pm
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
    tfidf_documents,
)
from fedtextgrad_core.text import REGEX_TOKENIZER, count_tokens, regex_tokens, split_sentences
from tests.support.llama_server import LlamaServer, missing_requirement, start_llama_server
from tests.support.settings_helpers import endpoint

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
    text._cached_tiktoken.__wrapped__()  # a cache miss means None (the regex fallback)...
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
    assert tfidf_documents("Why?\nBecause!  ...") == ["Why?", "Because!", "..."]


def test_tfidf_documents_are_plain_pieces_unlike_the_quote_aware_splitter() -> None:
    # the TF-IDF counts every '. ' as a document boundary, also inside quotes (its published
    # definition); the merge's splitter (text.py) never ends a sentence inside a quoted span
    prompt = "Finish with 'Answer: 3. Done.' on a line. Line two\nLine three"
    assert tfidf_documents(prompt) == ["Finish with 'Answer: 3.", "Done.' on a line.", "Line two", "Line three"]
    assert split_sentences(prompt) == ["Finish with 'Answer: 3. Done.' on a line.", "Line two Line three"]


def test_text_metrics_leave_surprisal_empty_not_zero() -> None:
    metrics = text_metrics("You will answer a reasoning question. Think step by step.")
    assert metrics.surprisal_mean is None and metrics.surprisal_max is None
    assert metrics.surprisal_variance is None and metrics.surprisal_model is None
    assert metrics.surprisal_tokens is None and metrics.surprisal_method is None and metrics.perplexity is None
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
    assert row.startswith("best.txt") and row.split()[-4:] == ["-", "-", "-", "-"]  # surprisal x3, perplexity
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
    client = SurprisalClient.from_endpoint(endpoint(backend="sim"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.surprisal("a prompt") is None
        assert analyze("a prompt", client).surprisal_mean is None
    assert len(warnings_of(caplog)) == 1
    assert "sim (simulated LLM, in-process) gives no token log-probabilities" in warnings_of(caplog)[0]


def test_an_unreachable_endpoint_costs_one_warning_not_one_per_prompt(caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.llama_server import free_port

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

    assert client._client is not None
    monkeypatch.setattr(client._client.completions, "create", create)
    return sent


def test_echoed_logprobs_become_bits_without_the_first_and_the_generated_token(monkeypatch) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="")
    tokens = ["A", " b", " c", "\n"]  # the last one is the generated token
    _scripted(monkeypatch, client, lambda _: _Echo(tokens, [None, -math.log(2), -math.log(4), -0.1],
                                                   [None, {" b": -0.69}, {" c": -1.4}, {"\n": -0.1}]))
    measured = client.measure("A b c")
    assert measured is not None and measured.tokens == 3
    assert measured.bits == [pytest.approx(1.0), pytest.approx(2.0)]
    metrics = analyze("A b c", client)
    assert (metrics.tokens, metrics.tokenizer) == (3, "endpoint:m")
    assert (metrics.surprisal_mean, metrics.surprisal_max) == (pytest.approx(1.5), pytest.approx(2.0))
    assert metrics.surprisal_variance == pytest.approx(0.25)
    assert metrics.surprisal_model == "m at http://127.0.0.1:9/v1"
    assert (metrics.surprisal_method, metrics.surprisal_tokens) == ("echo-logprobs", 2)
    assert metrics.perplexity == pytest.approx(2 ** 1.5)
    table = format_metrics_table([("p", metrics)])
    assert "m at http://127.0.0.1:9/v1 (echo-logprobs)" in table and "tokens scored per prompt" in table
    capped = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="", max_tokens=1)
    _scripted(monkeypatch, capped, lambda _: _Echo(tokens, [None, -math.log(2), -math.log(4), -0.1], [None] * 4))
    assert capped.measure("A b c") == pm.TokenSurprisal(tokens=3, bits=[1.0], method="echo-logprobs")


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


# --- the forced-next-token route, against a small stand-in for llama.cpp's server ------------

BOS_ID = 1
TOY_VOCAB = 300


def toy_logprob(context_length: int, token: int) -> float:
    """The stand-in's model: log p(token | any context of this length) = -(1 + (token + length) % 4) bits."""
    return -math.log(2) * (1 + (token + context_length) % 4)


def toy_bits(ids: list[int], first_context: int) -> list[float]:
    """The surprisal the client must report: token k is read after ``first_context + k`` tokens."""
    return [1.0 + (token + first_context + k) % 4 for k, token in enumerate(ids)]


class FakeLlamaCpp:
    """llama.cpp's native routes in miniature: one token per character, the toy model above.

    Records every request; knobs make it misbehave the way a real server might.
    """

    def __init__(self, owned_by: str = "llamacpp", add_bos: bool = False):
        self.owned_by, self.add_bos = owned_by, add_bos
        self.leaky = False  # report probabilities after the logit bias (what the client must refuse)
        self.slow_from: int | None = None  # contexts at least this long take longer than any client waits
        self.refuse: set[int] = set()  # tokens that a bias cannot force (the top-1 comes out instead)
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, {}))
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "toy", "object": "model", "owned_by": fake.owned_by}]})
                else:
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.requests.append((self.path, body))
                answer = {"/tokenize": fake.tokenize, "/completion": fake.complete,
                          "/v1/completions": fake.openai_completion}.get(self.path)
                if answer is None:
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})
                else:
                    self._send(200, answer(body))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (the timeout test)
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def tokenize(self, body: dict) -> dict:
        ids = [ord(c) % TOY_VOCAB for c in body["content"]]
        return {"tokens": ([BOS_ID] if self.add_bos and body.get("add_special") else []) + ids}

    def complete(self, body: dict) -> dict:
        context = body["prompt"]
        if self.slow_from is not None and len(context) >= self.slow_from:
            time.sleep(1.0)
        ranked = sorted(range(TOY_VOCAB), key=lambda t: (-toy_logprob(len(context), t), t))
        chosen = ranked[0]
        for token, bias in body.get("logit_bias", []):
            if bias > 0 and token not in self.refuse:
                chosen = token
        logprob = 0.0 if self.leaky and chosen != ranked[0] else toy_logprob(len(context), chosen)
        tops = [{"id": t, "token": chr(t), "logprob": toy_logprob(len(context), t)} for t in ranked[:body["n_probs"]]]
        return {"content": chr(chosen), "stop": True,
                "completion_probabilities": [{"id": chosen, "token": chr(chosen), "logprob": logprob, "top_logprobs": tops}]}

    def openai_completion(self, body: dict) -> dict:
        """What llama.cpp answers to echo + logprobs: the generated token only, chat-style."""
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "toy",
                "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                             "logprobs": {"content": [{"id": 120, "token": "x", "logprob": -1.0, "top_logprobs": []}]}}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1,
                          "total_tokens": len(body["prompt"]) + 1}}

    def completions(self) -> list[dict]:
        return [body for path, body in self.requests if path == "/completion"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_llamacpp() -> Iterator[FakeLlamaCpp]:
    fake = FakeLlamaCpp()
    yield fake
    fake.close()


def test_forced_route_scores_each_token_given_the_ids_before_it(fake_llamacpp: FakeLlamaCpp) -> None:
    client = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10)
    measured = client.measure("abcab")
    ids = [97, 98, 99, 97, 98]
    assert measured == pm.TokenSurprisal(tokens=5, bits=toy_bits(ids[1:], first_context=1),
                                         method=pm.FORCED_NEXT_TOKEN)  # no BOS: the first token has no context
    assert not any(path == "/v1/completions" for path, _ in fake_llamacpp.requests)  # known as llama.cpp: no echo try
    check, scoring = fake_llamacpp.completions()[:2], fake_llamacpp.completions()[2:]
    assert len(check) == 2 and "logit_bias" not in check[0] and check[1]["logit_bias"][0][1] == pm.FORCE_BIAS
    assert [body["prompt"] for body in scoring] == [ids[:k] for k in range(1, 5)]
    for k, body in enumerate(scoring, start=1):
        assert body["logit_bias"] == [[ids[k], 100.0]]
        assert (body["n_predict"], body["n_probs"], body["temperature"], body["cache_prompt"]) == (1, 1, 0.0, True)
        assert body["post_sampling_probs"] is False

    metrics = analyze("abcab", client)  # the route is known now: no second check
    assert len(fake_llamacpp.completions()) == 2 + 4 + 4
    assert (metrics.tokens, metrics.tokenizer, metrics.surprisal_method) == (5, "endpoint:toy", "forced-next-token")
    assert measured is not None and metrics.surprisal_mean is not None
    assert metrics.surprisal_tokens == 4 and metrics.surprisal_mean == pytest.approx(statistics.fmean(measured.bits))
    assert metrics.perplexity == pytest.approx(2 ** metrics.surprisal_mean)
    assert metrics.surprisal_variance == pytest.approx(statistics.pvariance(measured.bits))


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
    metrics = analyze(text, SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10, max_tokens=3))
    assert (metrics.tokens, metrics.surprisal_tokens) == (len(text), 3)
    assert len(fake_llamacpp.completions()) == 2 + 3
    with pytest.raises(ConfigError, match="max_tokens"):
        SurprisalClient(fake_llamacpp.base_url, "toy", max_tokens=0)
    with pytest.raises(ConfigError, match="surprisal method"):
        SurprisalClient(fake_llamacpp.base_url, "toy", method="guess")


def test_a_server_that_reports_biased_probabilities_is_refused(fake_llamacpp, caplog) -> None:
    fake_llamacpp.leaky = True
    client = SurprisalClient(fake_llamacpp.base_url, "toy", timeout=10, method=pm.FORCED_NEXT_TOKEN)
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
    assert measured.method == pm.FORCED_NEXT_TOKEN and measured.bits == toy_bits([98, 99], first_context=1)
    assert [path for path, _ in fake.requests if path.startswith("/v1/completions")] == ["/v1/completions"]
    assert any("no logprobs of prompt tokens" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_perplexity_is_two_to_the_mean_surprisal() -> None:
    assert pm.perplexity_from_bits(3.0) == 8.0
    assert pm.perplexity_from_bits(None) is None
    assert pm.perplexity_from_bits(5000.0) == math.inf
    assert text_metrics("Think.").perplexity is None


# --- a real model: llama.cpp's server (fedtextgrad serve) with SmolLM2-135M ----------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    server = start_llama_server(tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        yield server
    finally:
        server.stop()


def _native(llama: LlamaServer, path: str, body: dict) -> dict:
    """One POST to llama.cpp's native API, as plainly as possible (the test's own view, not the client's)."""
    request = urllib.request.Request(llama.base_url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


@pytest.mark.slow
@pytest.mark.real_llm
def test_real_model_surprisal_is_lower_for_a_repeated_sentence_than_for_random_characters(llama) -> None:
    client = SurprisalClient(llama.base_url, llama.alias, timeout=60)
    repeated = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."
    rng = random.Random(0)  # one generator: a new Random(0) per character would repeat one character 30 times
    noise = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(30))
    started = time.perf_counter()
    calm = analyze(repeated, client)
    wild = analyze(noise, client)
    seconds = time.perf_counter() - started
    for metrics in (calm, wild):
        assert metrics.surprisal_method == "forced-next-token"
        assert metrics.tokenizer == "endpoint:smollm2" and metrics.surprisal_model == f"smollm2 at {llama.base_url}"
        # SmolLM2 puts no BOS before a text, so every token but the first is scored
        assert metrics.surprisal_tokens == metrics.tokens - 1 > 5
        mean, peak, variance = metrics.surprisal_mean, metrics.surprisal_max, metrics.surprisal_variance
        assert mean is not None and peak is not None and variance is not None
        assert metrics.perplexity == pytest.approx(2 ** mean)
        assert peak >= mean > 0 and variance > 0
    print(f"\nsurprisal bits/token: repeated sentence mean {calm.surprisal_mean:.2f} var {calm.surprisal_variance:.2f} "
          f"ppl {calm.perplexity:.1f} ({calm.surprisal_tokens} of {calm.tokens} tokens); random characters "
          f"{noise!r} mean {wild.surprisal_mean:.2f} var {wild.surprisal_variance:.2f} ppl {wild.perplexity:.1f} "
          f"({wild.surprisal_tokens} of {wild.tokens} tokens); {seconds:.2f} s with the route check")
    assert calm.surprisal_mean is not None and wild.surprisal_mean is not None
    assert calm.surprisal_mean < wild.surprisal_mean
    # aligned scores: the third copy of the sentence is nearly certain (scored one token off, > 10 bits)
    bits = client.surprisal(repeated)
    assert bits is not None and sum(bits[-7:]) / 7 < 2.5


@pytest.mark.slow
@pytest.mark.real_llm
def test_real_model_forced_logprob_is_the_unforced_one(llama) -> None:
    """The bias must not leak into the reported probability: forcing the model's own first choice
    (or its second) gives back exactly what the unforced request listed for that token."""
    ids = _native(llama, "/tokenize", {"content": "The cat sat on the mat.", "add_special": True})["tokens"]
    client = SurprisalClient(llama.base_url, llama.alias, timeout=60)
    bits = client.surprisal("The cat sat on the mat.")
    assert bits is not None and len(bits) == len(ids) - 1
    matched = 0
    for i in range(1, len(ids)):
        free = _native(llama, "/completion", {"prompt": ids[:i], "n_predict": 1, "n_probs": 20, "temperature": 0})
        tops = free["completion_probabilities"][0]["top_logprobs"]
        for top in tops[:2]:
            forced = _native(llama, "/completion", {"prompt": ids[:i], "n_predict": 1, "n_probs": 1, "temperature": 0,
                                                    "logit_bias": [[top["id"], 100]]})["completion_probabilities"][0]
            assert forced["id"] == top["id"]
            assert forced["logprob"] == pytest.approx(top["logprob"], abs=1e-3)
        listed = {top["id"]: top["logprob"] for top in tops}
        if ids[i] in listed:  # the client's number for the real next token is the unforced log-probability
            assert bits[i - 1] == pytest.approx(-listed[ids[i]] / math.log(2), abs=2e-3)
            matched += 1
    assert matched >= 3
