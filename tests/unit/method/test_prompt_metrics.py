"""Prompt metrics: text statistics by hand, and what analyze() makes of a surprisal client's answer.

The client itself (its routes, checks and failures) is tested in tests/unit/llm/test_surprisal.py,
against a real llama.cpp server in tests/integration/test_surprisal.py."""

from __future__ import annotations

import math
import random
import statistics
import string
import zlib
from collections.abc import Iterator

import pytest

from fedtextgrad_core import text
from fedtextgrad_core.llm import surprisal
from fedtextgrad_core.llm.surprisal import SurprisalClient
from fedtextgrad_core.method import prompt_metrics as pm
from fedtextgrad_core.method.prompt_metrics import (
    PromptMetrics,
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
from tests.support.settings_helpers import endpoint
from tests.support.surprisal_fakes import Echo, FakeLlamaCpp, scripted, toy_bits


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    """What a process learned about endpoints (probes, warnings) must not leak between tests."""
    surprisal.forget_endpoints()
    yield
    surprisal.forget_endpoints()


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


def test_perplexity_is_two_to_the_mean_surprisal() -> None:
    assert pm.perplexity_from_bits(3.0) == 8.0
    assert pm.perplexity_from_bits(None) is None
    assert pm.perplexity_from_bits(5000.0) == math.inf
    assert text_metrics("Think.").perplexity is None


# --- analyze() with a surprisal client ----------------------------------------------------------


def test_analyze_keeps_the_text_metrics_when_the_endpoint_gives_no_surprisal(sim_http: str) -> None:
    text_ = "Think step by step. Count carefully."
    assert analyze(text_, SurprisalClient(sim_http, "sim", timeout=10)) == text_metrics(text_)  # fallback tokens too
    assert analyze(text_, SurprisalClient.from_endpoint(endpoint(backend="sim"))) == text_metrics(text_)


def test_analyze_fills_the_record_from_echoed_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    client = SurprisalClient("http://127.0.0.1:9/v1", "m", bos_text="")
    tokens = ["A", " b", " c", "\n"]  # the last one is the generated token
    scripted(monkeypatch, client, lambda _: Echo(tokens, [None, -math.log(2), -math.log(4), -0.1],
                                                 [None, {" b": -0.69}, {" c": -1.4}, {"\n": -0.1}]))
    metrics = analyze("A b c", client)
    assert (metrics.tokens, metrics.tokenizer) == (3, "endpoint:m")
    assert (metrics.surprisal_mean, metrics.surprisal_max) == (pytest.approx(1.5), pytest.approx(2.0))
    assert metrics.surprisal_variance == pytest.approx(0.25)
    assert metrics.surprisal_model == "m at http://127.0.0.1:9/v1"
    assert (metrics.surprisal_method, metrics.surprisal_tokens) == ("echo-logprobs", 2)
    assert metrics.perplexity == pytest.approx(2 ** 1.5)
    table = format_metrics_table([("p", metrics)])
    assert "m at http://127.0.0.1:9/v1 (echo-logprobs)" in table and "tokens scored per prompt" in table


def test_analyze_fills_the_record_from_forced_next_tokens() -> None:
    fake = FakeLlamaCpp()
    try:
        client = SurprisalClient(fake.base_url, "toy", timeout=10)
        measured = client.measure("abcab")
        metrics = analyze("abcab", client)  # the route is known now: no second check
        completions = len(fake.completions())
        text_ = "The quick brown fox"
        capped = analyze(text_, SurprisalClient(fake.base_url, "toy", timeout=10, max_tokens=3))
        capped_completions = len(fake.completions()) - completions
    finally:
        fake.close()
    assert completions == 2 + 4 + 4
    assert measured is not None and measured.bits == toy_bits([98, 99, 97, 98], first_context=1)
    assert (metrics.tokens, metrics.tokenizer, metrics.surprisal_method) == (5, "endpoint:toy", "forced-next-token")
    assert metrics.surprisal_mean is not None
    assert metrics.surprisal_tokens == 4 and metrics.surprisal_mean == pytest.approx(statistics.fmean(measured.bits))
    assert metrics.perplexity == pytest.approx(2 ** metrics.surprisal_mean)
    assert metrics.surprisal_variance == pytest.approx(statistics.pvariance(measured.bits))
    assert (capped.tokens, capped.surprisal_tokens) == (len(text_), 3)
    assert capped_completions == 3  # same endpoint and route: no second check, one request per scored token
