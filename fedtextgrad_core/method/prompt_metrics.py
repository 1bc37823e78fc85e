"""Information-density metrics of a prompt: the measurements behind the UID merge.

The Uniform Information Density (UID) merge asks the summariser to spread information
evenly over the prompt. These metrics make that measurable, per prompt and per round:

Text statistics (pure Python, no LLM), from :func:`text_metrics`:

- ``chars``: Unicode characters of the text as given.
- ``words``: whitespace-separated words (``len(text.split())``).
- ``tokens`` / ``tokenizer``: the token count and what counted it. Without an LM endpoint
  this is tiktoken's ``cl100k_base`` *only if* its BPE file is already in tiktoken's local
  cache (tiktoken downloads it on first use; this module never lets it), otherwise the
  regex word-piece split ``\\w+|[^\\w\\s]`` (runs of word characters, and each other
  non-space character on its own), named ``regex:\\w+|[^\\w\\s]``. With an LM endpoint
  (:func:`analyze` with a :class:`SurprisalClient`) it is the endpoint's own count of the
  prompt's tokens, named ``endpoint:<model>``. Compare token counts only between
  prompts that share a ``tokenizer``.
- ``char_entropy``: Shannon entropy of the character distribution, in **bits per
  character**: ``-sum(p(c) * log2 p(c))`` over the distinct characters ``c`` (whitespace
  and case kept), with ``p(c)`` = count of ``c`` / ``chars``. "aabb" → 1.0, "aaaa" → 0.0.
- ``compression_ratio``: ``len(zlib.compress(utf8, 9)) / len(utf8)``, the zlib-compressed
  size over the UTF-8 size. **Lower means more redundant** (repetitive text compresses
  well); near or above 1 means little redundancy. zlib adds about 11 bytes of header and
  checksum, so very short texts can score above 1.
- ``sentences`` / ``avg_tfidf``: TF-IDF with the prompt's own sentences as the documents
  (no outside corpus). Sentences: the text split after ``.``, ``!`` or ``?`` followed by
  whitespace, and at line breaks; empty pieces dropped. Terms: lower-cased ``\\w+`` runs.
  For a term ``t`` in sentence ``d`` among ``N`` sentences:
  ``tf(t, d) = count(t in d) / terms in d``, ``idf(t) = 1 + ln(N / df(t))`` where ``df(t)``
  is the number of sentences holding ``t``. ``avg_tfidf`` is the mean of ``tf * idf`` over
  every (sentence, distinct term of that sentence) pair. A single sentence gives the mean
  relative term frequency; words repeated across sentences pull the average down, words
  particular to one sentence pull it up. 0.0 for a text without terms.

LM surprisal, from :class:`SurprisalClient`: the surprisal of each prompt token given the
tokens before it, ``-log2 p(token | tokens before it)`` in **bits per token**, from the
endpoint's own model. ``surprisal_mean``, ``surprisal_max`` and ``surprisal_variance``
(population variance, the "uniformity level": lower = information spread more evenly)
summarise it; ``surprisal_tokens`` says how many token surprisals they summarise,
``surprisal_method`` which of the two routes below measured them, and ``perplexity`` is
``2 ** surprisal_mean`` (per-token perplexity from the same surprisals). A token is scored
only when something precedes it: the first token of the text only when the model puts a
BOS token before every text (``/tokenize`` with ``add_special``: true shows whether it does);
a model that adds none (SmolLM2) reads the first token of a prompt without context, so it
is left out rather than scored after a BOS the model never sees there (SmolLM2's declared
BOS ``<|im_start|>`` opens a chat turn, before a role name; measured after it, "The" cost
11.9 bits). Only the first ``max_tokens`` scored tokens count (default
:data:`DEFAULT_MAX_TOKENS`, 512) so that the two routes measure the same thing and the
forced route's cost stays bounded; ``tokens`` still counts the whole text. Every
surprisal field is ``None`` — never 0 — when no endpoint was given or it cannot give
log-probabilities; when it answered but the text has no scored token (one token, no BOS),
``surprisal_tokens`` is 0 and the statistics are ``None``. ``perplexity`` is ``None``
exactly when ``surprisal_mean`` is.

The two routes (``surprisal_method``):

- ``"echo-logprobs"``: one ``POST /v1/completions`` with ``echo=True, logprobs=1``; the
  echoed prompt tokens carry their log-probabilities (vLLM, llama-cpp-python's server).
- ``"forced-next-token"``: for llama.cpp's own server (``fedtextgrad serve``, xllamacpp),
  which ignores ``echo`` and returns log-probabilities of generated tokens only. The text
  is tokenized with ``POST /tokenize``; then, for each scored token ``t_i``, one
  ``POST /completion`` with ``prompt`` = the token ids before it, ``n_predict`` 1,
  ``logit_bias`` ``[[t_i, 100]]`` (so ``t_i`` is what the server "generates"),
  ``n_probs`` 1, ``temperature`` 0 and ``cache_prompt`` true. llama.cpp computes the
  reported ``logprob`` from the raw logits, before the sampler chain where the bias acts,
  so it is the model's unbiased ``log p(t_i | t_<i)``; the client checks that once per
  endpoint (a forced second choice must come back with its unforced log-probability).
  The prompt cache makes each request evaluate one new token (``timings.prompt_n`` 1),
  so a request costs one decoding step plus HTTP: measured on SmolLM2-135M with one CPU
  thread, 12 ms of model time and ~15 ms in all per token, 1.5 s for a 100-token prompt,
  8.3 s for 512 tokens. Requests run one after another, each extending the cached prefix
  of the one before; two prompts measured at once on two slots took 2.74 s instead of
  2.85 s, too little to be worth the complication. ``timeout`` bounds each request. A
  larger model costs proportionally more per token (one decoding step each).

``SurprisalClient`` picks the route by itself: the forced route for a server that
``server_kind.probe_kind`` recognises as llama.cpp, the echo route otherwise, and the other
route when the first one turns out not to work on that endpoint.

How this differs from the reference code's script (``utils/prompt_complexity.py`` of
ubc-tea/FedTextGrad, ``compute_uniformity_level`` and ``calculate_perplexity``):

- Model: it loads ``gpt2-xl`` through Hugging Face (truncating at 1,024 tokens); here it is
  the endpoint's own model, whatever that serves.
- Units: it reports natural-log surprisal (**nats**); here **bits**.
  ``nats = bits × ln 2`` (``bits = nats / ln 2``), for the mean and max; the variance
  scales by ``(ln 2)²``.
- Variance: it takes torch's ``.var()``, the unbiased estimator (divides by N-1); here the
  population variance (divides by N). ``unbiased = population × N / (N-1)``.
- Alignment: it indexes the log-softmax at position *i* with token *i* itself, but the
  logits at position *i* are the model's prediction of token *i+1*; its "surprisal" of a
  token is therefore how surprised the model would be to see that token *repeated* next,
  not the next-token surprisal, and its first token gets a value with no context. Here
  each token is scored given the tokens before it (the first only after a BOS), so the two
  numbers do not convert into each other; only the definitions above do.
- Perplexity: it computes perplexity separately, with the small ``gpt2`` model and a
  sliding window (stride 512, 1,024 positions), as ``exp`` of the mean next-token NLL;
  here ``perplexity = 2 ** surprisal_mean`` from the same surprisals (equal to
  ``exp(mean nats)``: the base cancels), over the same ``max_tokens`` tokens.

A fact about llama-cpp-python (checked with 0.3.36 and SmolLM2-135M), for the echo route:
its server returns echoed prompt log-probabilities shifted by one token (token *i* is
scored with the distribution for token *i+1*) when the model adds no BOS token. The client
detects this once per endpoint with a short probe and then sends the text behind the
model's BOS token, which that server strips before scoring, giving the correct alignment;
see :class:`SurprisalClient`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import threading
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fedtextgrad_core.errors import ConfigError, LLMError
from fedtextgrad_core.llm.openai_transport import LLMTimeout, TransientLLMError, api_key_for, classify
from fedtextgrad_core.llm.server_kind import probe_kind
from fedtextgrad_core.text import count_tokens

log = logging.getLogger(__name__)

_TERM_RE = re.compile(r"\w+")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class PromptMetrics:
    """Information-density measurements of one prompt (see the module doc for each definition)."""

    chars: int
    words: int
    tokens: int
    tokenizer: str
    char_entropy: float  # bits per character
    compression_ratio: float  # zlib level-9 bytes / UTF-8 bytes; lower = more redundant
    sentences: int  # the documents of the TF-IDF
    avg_tfidf: float
    surprisal_mean: float | None = None  # bits per token
    surprisal_max: float | None = None  # bits
    surprisal_variance: float | None = None  # bits², population variance: the "uniformity level"
    surprisal_model: str | None = None  # "<model> at <base_url>" that gave the surprisal
    surprisal_tokens: int | None = None  # how many token surprisals the three numbers above summarise
    surprisal_method: str | None = None  # "echo-logprobs" or "forced-next-token" (see the module doc)
    perplexity: float | None = None  # 2 ** surprisal_mean: per-token perplexity from the same surprisals

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --- text statistics ---------------------------------------------------------------


def char_entropy(text: str) -> float:
    """Shannon entropy of the character distribution of ``text``, in bits per character."""
    if not text:
        return 0.0
    total = len(text)
    entropy = -sum((n / total) * math.log2(n / total) for n in Counter(text).values())
    return entropy + 0.0  # -0.0 → 0.0 for a single repeated character


def compression_ratio(text: str) -> float:
    """zlib (level 9) compressed bytes / UTF-8 bytes; lower = more redundant; 0.0 for ''."""
    data = text.encode("utf-8")
    return len(zlib.compress(data, 9)) / len(data) if data else 0.0


def tfidf_documents(text: str) -> list[str]:
    """The TF-IDF documents: pieces after '.', '!' or '?' + whitespace, and at line breaks."""
    return [piece.strip() for piece in _SENTENCE_SPLIT_RE.split(text) if piece.strip()]


def average_tfidf(text: str) -> tuple[float, int]:
    """(mean tf·idf over every (sentence, distinct term) pair, number of sentences).

    tf = count / terms in the sentence; idf = 1 + ln(N / df); sentences as documents.
    """
    documents = [Counter(_TERM_RE.findall(sentence.lower())) for sentence in tfidf_documents(text)]
    documents = [terms for terms in documents if terms]
    if not documents:
        return 0.0, 0
    n_docs = len(documents)
    doc_freq = Counter(term for terms in documents for term in terms)
    values = []
    for terms in documents:
        length = sum(terms.values())
        for term, count in terms.items():
            values.append((count / length) * (1.0 + math.log(n_docs / doc_freq[term])))
    return sum(values) / len(values), n_docs


def text_metrics(text: str) -> PromptMetrics:
    """Every metric that needs no language model; the surprisal fields are ``None``."""
    tokens, tokenizer = count_tokens(text)
    tfidf, sentences = average_tfidf(text)
    return PromptMetrics(
        chars=len(text),
        words=len(text.split()),
        tokens=tokens,
        tokenizer=tokenizer,
        char_entropy=char_entropy(text),
        compression_ratio=compression_ratio(text),
        sentences=sentences,
        avg_tfidf=tfidf,
    )


# --- surprisal from an LM endpoint ------------------------------------------------------

ECHO_LOGPROBS = "echo-logprobs"
FORCED_NEXT_TOKEN = "forced-next-token"
METHODS = ("auto", ECHO_LOGPROBS, FORCED_NEXT_TOKEN)
# Scored tokens per prompt: the forced route costs one request per token (8.3 s for 512 tokens
# on SmolLM2 with one CPU thread), and merged prompts may run to a few thousand tokens.
DEFAULT_MAX_TOKENS = 512
# Added by llama.cpp to the forced token's logit. A small model's logits span a few tens, so
# +100 makes that token the one "generated"; its reported probability is computed before the bias.
FORCE_BIAS = 100.0
# How far (nats) a forced token's log-probability may sit from its unforced one. The prompt
# cache evaluates a token in a batch of another size than a fresh prompt would, which moves the
# last digits (measured: 2e-7); a bias that leaked into the number would move it by whole nats.
FORCE_TOLERANCE_NATS = 0.05


@dataclass(frozen=True)
class TokenSurprisal:
    """What the endpoint said about one text."""

    tokens: int  # tokens of the text as the endpoint split it (the echo route may count a BOS the server adds)
    bits: list[float]  # -log2 p(token | tokens before it) of each scored token, at most max_tokens of them
    method: str = ECHO_LOGPROBS  # the route that measured them


# Texts sent before the prompt to put a BOS token in front of it on a server that scores
# echoed prompts one token off (llama-cpp-python with a model that adds no BOS). Each is
# tried once per such endpoint, and kept only if the probe then comes back aligned and
# the BOS was stripped (the echoed tokens spell exactly the probe text).
BOS_CANDIDATES = ("<|im_start|>", "<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>")
# A text whose next tokens any LM predicts well: used to tell aligned from shifted scores,
# and as the context of the forced route's check.
ALIGNMENT_PROBE = "1, 2, 3, 4, 5, 6"
PROBE_TIMEOUT_SECONDS = 2.0


class _Unsupported(Exception):
    """This endpoint cannot give prompt log-probabilities this way (a lasting condition)."""


@dataclass
class _EndpointState:
    lock: threading.Lock
    method: str | None = None  # the route that works here; None: not chosen yet
    prefix: str | None = None  # echo route: text sent before each prompt; None: not probed yet
    unsupported: str = ""  # why no route works, once known
    warned: set[str] = field(default_factory=set)  # "unsupported" / "failed": each logged once


_endpoints: dict[tuple[str, str, str], _EndpointState] = {}
_endpoints_lock = threading.Lock()


def _state(key: tuple[str, str, str]) -> _EndpointState:
    with _endpoints_lock:
        return _endpoints.setdefault(key, _EndpointState(threading.Lock()))


def forget_endpoints() -> None:
    """Drop what this process learned about endpoints (routes, probes, warnings): for tests."""
    with _endpoints_lock:
        _endpoints.clear()


def _server_root(base_url: str) -> str:
    """llama.cpp's native routes (/tokenize, /completion) live at the server root, not under /v1."""
    return (base_url or "").rstrip("/").removesuffix("/v1")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _added_before(with_special: list[int], plain: list[int]) -> list[int]:
    """The tokens a server puts before every text (its BOS), from the text tokenized with and without them.

    Found as what precedes ``plain`` inside ``with_special`` (an EOS some models append is
    ignored); nothing when the two do not line up, so a doubtful BOS is never scored after.
    """
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def _top_logprobs(entry: dict[str, Any]) -> list[tuple[int, float]]:
    """(token id, log-probability) of llama.cpp's ``top_logprobs`` list, best first; malformed items skipped."""
    tops = entry.get("top_logprobs")
    if not isinstance(tops, list):
        return []
    return [(item["id"], float(item["logprob"])) for item in tops
            if isinstance(item, dict) and isinstance(item.get("id"), int) and _finite(item.get("logprob"))]


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """llama.cpp's ``{"error": {"message": ...}}``, or the start of whatever body came back."""
    try:
        body = exc.read(2000).decode("utf-8", errors="replace")
    except OSError:
        return str(exc.reason)
    try:
        message = json.loads(body).get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else (body.strip()[:200] or str(exc.reason))


class SurprisalClient:
    """Per-token surprisal of a text from an OpenAI-compatible endpoint, by one of two routes.

    ``method``: ``"auto"`` (default) uses the forced route on a server that
    ``server_kind.probe_kind`` (or ``server_kind``, when given) says is llama.cpp and the echo
    route elsewhere, and switches to the other route once if the first cannot work on that
    endpoint; ``"echo-logprobs"`` or ``"forced-next-token"`` uses only that one. The route
    that works is found once per endpoint per process (a few requests) and then kept.

    Echo route: one request per text, ``completions.create(prompt=text, echo=True,
    logprobs=1, max_tokens=1, temperature=0)``; the echoed prompt tokens carry their
    log-probabilities (the one generated token is dropped). ``max_tokens=1`` rather than 0:
    llama-cpp-python reads 0 as "no limit". ``bos_text``: ``None`` (default) probes the
    endpoint once per process for the one-token shift described in the module doc and
    fixes it with a BOS token from :data:`BOS_CANDIDATES`; ``""`` trusts the endpoint's
    alignment as it is; any other string is put in front of every text as the model's BOS.

    Forced route (llama.cpp's own server): ``/tokenize``, then one ``/completion`` per
    scored token, one after another, as the module doc describes; before the first text
    it checks on a short probe that ``logit_bias`` really forces the token and that the
    reported log-probability is the unforced one.

    ``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`; ``None``: no limit) caps how many
    tokens of a text are scored, on both routes; ``timeout`` bounds each HTTP request.

    An endpoint that cannot give log-probabilities by either route (HTTP errors, no
    ``logprobs`` in the answer, no echo and no ``/tokenize``, a shift that cannot be fixed,
    the sim backend) costs one warning per endpoint per process; :meth:`surprisal` then
    returns ``None`` without asking again. Passing errors (timeouts, 5xx, one token that
    cannot be forced) return ``None`` for that text only.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout: float = 120.0,
                 bos_text: str | None = None, *, key_setting: str = "server-api-key-env",
                 unsupported: str = "", method: str = "auto", max_tokens: int | None = DEFAULT_MAX_TOKENS,
                 server_kind: str = "auto"):
        if method not in METHODS:
            raise ConfigError("surprisal method", method, "one of " + ", ".join(METHODS))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ConfigError("surprisal max_tokens", max_tokens, "a whole number of at least 1, or None for no limit")
        self.base_url, self.model, self.bos_text = base_url, model, bos_text
        self.method, self.max_tokens, self.timeout, self.server_kind = method, max_tokens, timeout, server_kind
        self.endpoint = f"{model} at {base_url}" if base_url else model
        self._root = _server_root(base_url)
        self._state = _state((base_url, model, method))
        if unsupported and not self._state.unsupported:
            self._state.unsupported = unsupported
        self._client = None
        self._api_key = ""
        if not self._state.unsupported:
            import openai

            self._api_key = api_key_for(api_key_env, key_setting)
            self._client = openai.OpenAI(base_url=base_url, api_key=self._api_key, timeout=timeout, max_retries=0)

    @classmethod
    def from_endpoint(cls, settings, key_setting: str = "server-api-key-env",
                      bos_text: str | None = None) -> SurprisalClient:
        """A client for an ``EndpointSettings``; the sim backend gives one that has no surprisal."""
        if settings.backend != "openai" or not settings.base_url:
            return cls("", settings.describe(), key_setting=key_setting,
                       unsupported="it is not an OpenAI-compatible completions endpoint")
        return cls(settings.base_url, settings.model, settings.api_key_env,
                   timeout=max(settings.timeout, 120.0), bos_text=bos_text, key_setting=key_setting,
                   server_kind=getattr(settings, "server_kind", "auto") or "auto")

    @property
    def tokenizer(self) -> str:
        return f"endpoint:{self.model}"

    # -- public

    def surprisal(self, text: str) -> list[float] | None:
        """Surprisal in bits of every scored token, or ``None`` (see the class doc)."""
        measured = self.measure(text)
        return measured.bits if measured is not None else None

    def measure(self, text: str) -> TokenSurprisal | None:
        """Token count and per-token surprisal of ``text``, or ``None``."""
        if not text:
            return None
        if self._state.unsupported:
            self._warn_once()
            return None
        try:
            return self._score(text, self._route())
        except _Unsupported as exc:
            self._state.unsupported = str(exc)
            self._warn_once()
            return None
        except LLMError as exc:  # a passing failure: no surprisal for this text only
            self._warn_once(reason=str(exc))
            return None

    # -- choosing a route

    def _route(self) -> str:
        """The route for this endpoint: chosen and checked by the first caller, then kept."""
        state = self._state
        with state.lock:
            if state.method is None:
                state.method = self._choose_route()
            return state.method

    def _choose_route(self) -> str:
        if self.method != "auto":
            self._prepare(self.method)
            return self.method
        first = FORCED_NEXT_TOKEN if self._is_llamacpp() else ECHO_LOGPROBS
        second = ECHO_LOGPROBS if first == FORCED_NEXT_TOKEN else FORCED_NEXT_TOKEN
        try:
            self._prepare(first)
            return first
        except _Unsupported as first_failure:
            try:
                self._prepare(second)
            except (_Unsupported, LLMError) as second_failure:
                raise _Unsupported(f"{first}: {first_failure}; {second}: {second_failure}") from first_failure
            log.info("%s: the %s route does not work here (%s); measuring surprisal by the %s route",
                     self.endpoint, first, first_failure, second)
            return second

    def _is_llamacpp(self) -> bool:
        """llama.cpp's own server, which needs the forced route: from the settings, or asked (a few GETs)."""
        if self.server_kind not in ("", "auto"):
            return self.server_kind == "llama.cpp"
        return probe_kind(self.base_url, self._api_key, timeout=min(self.timeout, PROBE_TIMEOUT_SECONDS)) == "llama.cpp"

    def _prepare(self, method: str) -> None:
        """Check that ``method`` works on this endpoint (raises ``_Unsupported`` if it cannot)."""
        if method == FORCED_NEXT_TOKEN:
            self._check_forcing()
        elif self.bos_text is None:
            if self._state.prefix is None:
                self._state.prefix = self._find_prefix()
        else:
            self._request(self.bos_text + ALIGNMENT_PROBE)  # fails here when this endpoint cannot echo

    # -- scoring

    def _score(self, text: str, method: str) -> TokenSurprisal:
        if method == FORCED_NEXT_TOKEN:
            return self._score_forced(text)
        prefix = self.bos_text if self.bos_text is not None else (self._state.prefix or "")
        _, values, _ = self._request(prefix + text)
        bits = [-float(v) / _LN2 for v in values if v is not None]
        if self.max_tokens is not None:
            bits = bits[: self.max_tokens]
        return TokenSurprisal(tokens=len(values), bits=bits, method=ECHO_LOGPROBS)

    def _score_forced(self, text: str) -> TokenSurprisal:
        """Each token scored given the ids before it: one forced one-token completion per token."""
        plain = self._tokenize(text, add_special=False)
        lead = _added_before(self._tokenize(text, add_special=True), plain)
        skip = 0 if lead else 1  # a first token with nothing before it has no next-token surprisal
        targets = plain[skip:]
        if self.max_tokens is not None:
            targets = targets[: self.max_tokens]
        sequence = lead + plain
        start = len(lead) + skip
        bits = [-self._forced_logprob(sequence[: start + k], target) / _LN2 for k, target in enumerate(targets)]
        return TokenSurprisal(tokens=len(plain), bits=bits, method=FORCED_NEXT_TOKEN)

    def _forced_logprob(self, context: list[int], target: int) -> float:
        """log p(target | context) in nats: ``target`` forced by logit_bias, its unbiased probability read back."""
        entry = self._complete(context, n_probs=1, force=target)
        if entry["id"] != target:
            raise LLMError(f"{self.endpoint} generated token {entry['id']} where a logit_bias of +{FORCE_BIAS:g} "
                           f"should have forced token {target}: that token is too unlikely to force, so this prompt "
                           f"gets no surprisal")
        logprob = entry["logprob"]
        if not _finite(logprob):
            raise LLMError(f"{self.endpoint} gave no finite log-probability for token {target} (got {logprob!r})")
        tops = _top_logprobs(entry)
        if tops and float(logprob) > tops[0][1] + FORCE_TOLERANCE_NATS:
            raise _Unsupported("it reported a token forced by logit_bias as more likely than the model's own first "
                               "choice, so its probabilities include the bias")
        return float(logprob)

    def _check_forcing(self) -> None:
        """Once per endpoint: the bias must force the token, and the reported log-probability must be unbiased.

        On a short probe, the model's second choice is forced; it must come back as the token
        generated, with the log-probability the unforced request listed for it. A server that
        reported probabilities after the bias would make every token look certain.
        """
        probe = self._tokenize(ALIGNMENT_PROBE, add_special=True)
        if len(probe) < 2:
            raise _Unsupported(f"POST /tokenize split {ALIGNMENT_PROBE!r} into fewer than two tokens")
        context = probe[:-1]
        unforced = _top_logprobs(self._complete(context, n_probs=2, force=None))
        if len(unforced) < 2:
            raise _Unsupported("POST /completion with n_probs 2 listed fewer than two top_logprobs")
        second, expected = unforced[1]
        forced = self._complete(context, n_probs=2, force=second)
        if forced["id"] != second:
            raise _Unsupported(f"a logit_bias of +{FORCE_BIAS:g} did not force a token (asked for token {second}, "
                               f"got {forced['id']})")
        got = forced["logprob"]
        if not _finite(got) or abs(float(got) - expected) > FORCE_TOLERANCE_NATS:
            raise _Unsupported(f"the log-probability it reported for a token forced by logit_bias ({got!r}) is not "
                               f"the unforced one ({expected:.4f}), so its probabilities include the bias")

    # -- llama.cpp's native HTTP API

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what the model puts before every text (its BOS), if anything."""
        answer = self._post("/tokenize", {"content": text, "add_special": add_special})
        tokens = answer.get("tokens")
        if not isinstance(tokens, list) or not _token_ids(tokens):
            raise _Unsupported("POST /tokenize answered without a list of token ids in 'tokens'")
        return [int(token) for token in tokens]

    def _complete(self, context: list[int], n_probs: int, force: int | None) -> dict[str, Any]:
        """One token generated after ``context`` (token ids, no BOS added), ``force`` pushed by logit_bias.

        Returns ``completion_probabilities[0]``: the generated ``id``, its ``logprob`` and the
        ``top_logprobs``, all from the raw logits (``post_sampling_probs`` false).
        """
        body: dict[str, Any] = {"prompt": context, "n_predict": 1, "n_probs": n_probs, "temperature": 0.0,
                                "cache_prompt": True, "post_sampling_probs": False, "stream": False}
        if force is not None:
            body["logit_bias"] = [[force, FORCE_BIAS]]
        answer = self._post("/completion", body)
        probs = answer.get("completion_probabilities")
        entry = probs[0] if isinstance(probs, list) and probs else None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "logprob" not in entry:
            raise _Unsupported("POST /completion answered without completion_probabilities[0] holding the generated "
                               "token's id and logprob (n_probs not supported?)")
        return entry

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to the server root; errors sorted like the echo route's (lasting, passing, per text)."""
        where = f"POST {path} at {self._root}"
        request = urllib.request.Request(self._root + path, data=json.dumps(body).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code in (404, 405, 501):  # the route does not exist: not llama.cpp's server
                raise _Unsupported(f"{where} answered HTTP {exc.code}: {detail}") from exc
            if exc.code == 429 or exc.code >= 500:
                raise TransientLLMError(f"{where} answered HTTP {exc.code}: {detail}") from exc
            raise LLMError(f"{where} refused the request with HTTP {exc.code}: {detail}") from exc
        except TimeoutError as exc:
            raise LLMTimeout(f"{where} did not answer within {self.timeout:g} s") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise LLMTimeout(f"{where} did not answer within {self.timeout:g} s") from exc
            raise TransientLLMError(f"{where}: the server is unreachable ({reason})") from exc
        try:
            answer = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError as exc:
            raise LLMError(f"{where} answered with a body that is not JSON: {raw[:120]!r}") from exc
        if not isinstance(answer, dict):
            raise LLMError(f"{where} answered with JSON that is not an object: {str(answer)[:120]}")
        return answer

    # -- the echo route

    def _warn_once(self, reason: str = "") -> None:
        """One warning per endpoint that cannot score at all, one more if a call fails in passing."""
        kind = "failed" if reason else "unsupported"
        with _endpoints_lock:
            if kind in self._state.warned:
                return
            self._state.warned.add(kind)
        if reason:
            log.warning("%s gave no token log-probabilities for a prompt (%s); its surprisal fields are left "
                        "empty (further such failures are not logged)", self.endpoint, reason)
        else:
            log.warning("%s gives no token log-probabilities; surprisal fields are left empty (%s)",
                        self.endpoint, self._state.unsupported)

    def _request(self, prompt: str):
        assert self._client is not None  # built in __init__ for every endpoint that is asked
        try:
            response = self._client.completions.create(
                model=self.model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
        except Exception as exc:
            error = classify(exc, self.base_url, self.model)
            if "logits_all" in str(error):  # llama-cpp-python answers HTTP 500 for this lasting condition
                raise _Unsupported(f"{error}; start llama-cpp-python's server with --logits_all true") from exc
            if isinstance(error, TransientLLMError):
                raise error from exc
            raise _Unsupported(f"POST /completions with echo and logprobs failed: {error}") from exc
        choices = getattr(response, "choices", None) if not isinstance(response, str) else None
        logprobs = getattr(choices[0], "logprobs", None) if choices else None
        if logprobs is None or not getattr(logprobs, "token_logprobs", None):
            raise _Unsupported("the completions answer has no logprobs of prompt tokens")
        usage = getattr(response, "usage", None)
        completion = getattr(usage, "completion_tokens", None) or 0
        tokens = list(getattr(logprobs, "tokens", None) or [])
        values = list(logprobs.token_logprobs)
        tops = list(getattr(logprobs, "top_logprobs", None) or [None] * len(values))
        keep = max(0, len(values) - completion)  # the echoed prompt; the generated token goes
        if keep == 0:
            raise _Unsupported("the answer does not echo the prompt's tokens")
        return tokens[:keep], values[:keep], tops[:keep]

    def _find_prefix(self) -> str:
        if self._alignment(ALIGNMENT_PROBE, "") != "shifted":
            return ""
        for candidate in BOS_CANDIDATES:
            try:
                verdict = self._alignment(ALIGNMENT_PROBE, candidate)
            except _Unsupported:
                continue
            if verdict == "aligned":
                log.info("%s scores echoed prompts one token off; sending each text behind %r (BOS) fixes it",
                         self.endpoint, candidate)
                return candidate
        raise _Unsupported("it scores echoed prompt tokens one token off (llama-cpp-python with a model that "
                           "adds no BOS token?) and no BOS text fixed that; pass bos_text")

    def _alignment(self, probe: str, prefix: str) -> str:
        """'aligned', 'shifted' or 'unclear': whose next token the top-1 guesses match."""
        tokens, _, tops = self._request(prefix + probe)
        if prefix and "".join(tokens) != probe:
            return "unclear"  # the prefix was not consumed as a BOS token
        same = following = 0
        for i in range(1, len(tokens) - 1):
            top = tops[i] if i < len(tops) else None
            if not top:
                continue
            guess = max(top.items(), key=lambda item: item[1])[0]
            same += guess == tokens[i]
            following += guess == tokens[i + 1]
        if following > same and following >= 2:
            return "shifted"
        return "aligned" if same > following else "unclear"


def summarize_surprisal(bits: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, max, population variance) in bits, or three ``None`` for no values."""
    if not bits:
        return None, None, None
    return statistics.fmean(bits), max(bits), statistics.pvariance(bits)


def perplexity_from_bits(mean_bits: float | None) -> float | None:
    """Per-token perplexity ``2 ** mean surprisal`` (bits), or ``None``; equals ``exp(mean nats)``."""
    if mean_bits is None:
        return None
    try:
        return 2.0 ** mean_bits
    except OverflowError:  # a mean above ~1024 bits: no real model gets there, but never crash a run
        return math.inf


def analyze(text: str, surprisal_client: SurprisalClient | None = None) -> PromptMetrics:
    """Text statistics plus, given a client, the endpoint's token count and surprisal."""
    metrics = text_metrics(text)
    if surprisal_client is None:
        return metrics
    measured = surprisal_client.measure(text)
    if measured is None:
        return metrics
    mean, peak, variance = summarize_surprisal(measured.bits)
    return replace(metrics, tokens=measured.tokens, tokenizer=surprisal_client.tokenizer,
                   surprisal_mean=mean, surprisal_max=peak, surprisal_variance=variance,
                   surprisal_model=surprisal_client.endpoint, surprisal_tokens=len(measured.bits),
                   surprisal_method=measured.method, perplexity=perplexity_from_bits(mean))


# --- a table for people --------------------------------------------------------------

TABLE_COLUMNS = (
    ("prompt", 6), ("chars", 6), ("words", 6), ("tokens", 7), ("H bits/ch", 9), ("zlib", 5),
    ("sents", 5), ("tfidf", 6), ("surp mean", 9), ("surp max", 8), ("surp var", 8), ("ppl", 7),
)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_metrics_table(named: Sequence[tuple[str, PromptMetrics]]) -> str:
    """One row per prompt; '-' where a metric is not available; the tokenizers and LM below.

    Columns: chars, words, tokens, char entropy (bits/char), zlib compression ratio,
    sentences, average TF-IDF, surprisal mean / max (bits per token) / variance (bits²),
    perplexity (2 ** mean). Below: who counted the tokens, and which model and route gave
    the surprisal, with how many tokens it scored per prompt.
    """
    widths = [max(width, *(len(name) for name, _ in named)) if i == 0 else width
              for i, (_, width) in enumerate(TABLE_COLUMNS)] if named else [w for _, w in TABLE_COLUMNS]

    def row(cells: Sequence[object]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    head = row([name for name, _ in TABLE_COLUMNS])
    lines = [head, "-" * len(head)]
    for name, m in named:
        lines.append(row([
            name, m.chars, m.words, m.tokens, _number(m.char_entropy, 3), _number(m.compression_ratio, 3),
            m.sentences, _number(m.avg_tfidf, 3), _number(m.surprisal_mean, 2), _number(m.surprisal_max, 2),
            _number(m.surprisal_variance, 2), _number(m.perplexity, 1),
        ]))
    tokenizers = sorted({m.tokenizer for _, m in named})
    sources = sorted({f"{m.surprisal_model} ({m.surprisal_method})" for _, m in named if m.surprisal_model})
    scored = [str(m.surprisal_tokens) for _, m in named if m.surprisal_model]
    lines.append(f"tokens counted by: {', '.join(tokenizers) or '-'}")
    lines.append("surprisal (bits per token) from: "
                 f"{', '.join(sources) or '- (no endpoint that gives token log-probabilities)'}")
    if scored:
        lines.append(f"tokens scored per prompt (at most the client's max_tokens): {', '.join(scored)}")
    return "\n".join(lines)
