"""Surprisal from a real model: llama.cpp's server (fedtextgrad serve) with SmolLM2-135M, on loopback.

The server is started once for this module (tests/support/llama_server.py) and stopped by its
PID. The client against stand-ins: tests/unit/llm/test_surprisal.py.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
import urllib.request
from collections.abc import Iterator

import pytest

from fedtextgrad_core.llm import surprisal
from fedtextgrad_core.llm.surprisal import SurprisalClient
from fedtextgrad_core.method.prompt_metrics import analyze
from tests.support.llama_server import LlamaServer, missing_requirement, start_llama_server


@pytest.fixture(autouse=True)
def fresh_endpoints() -> Iterator[None]:
    """What a process learned about endpoints (probes, warnings) must not leak between tests."""
    surprisal.forget_endpoints()
    yield
    surprisal.forget_endpoints()


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
