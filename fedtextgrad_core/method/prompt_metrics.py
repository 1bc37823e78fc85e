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

LM surprisal (needs an OpenAI-compatible **completions** endpoint that echoes prompt
log-probabilities: vLLM, llama.cpp's servers; the sim and chat-only APIs cannot), from
:class:`SurprisalClient`: the surprisal of each prompt token given the tokens before it,
``-log2 p(token | prefix)`` in **bits per token**. The first token has no prefix and is
left out. ``surprisal_mean``, ``surprisal_max`` and ``surprisal_variance`` (population
variance, the "uniformity level": lower = information spread more evenly) summarise it.
They are ``None`` — never 0 — when no endpoint was given or it cannot give
log-probabilities, or when the text has fewer than two tokens.

A fact about llama-cpp-python (checked with 0.3.36 and SmolLM2-135M): its server returns
echoed prompt log-probabilities shifted by one token (token *i* is scored with the
distribution for token *i+1*) when the model adds no BOS token. The client detects this
once per endpoint with a short probe and then sends the text behind the model's BOS token,
which that server strips before scoring, giving the correct alignment; see
:class:`SurprisalClient`.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import threading
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

from fedtextgrad_core.errors import LLMError
from fedtextgrad_core.text import REGEX_TOKENIZER, count_tokens
from fedtextgrad_core.llm.openai_transport import TransientLLMError, api_key_for, classify

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


@dataclass(frozen=True)
class TokenSurprisal:
    """What the endpoint said about one text."""

    tokens: int  # prompt tokens as the endpoint's tokenizer split the text (may include a BOS it adds)
    bits: list[float]  # -log2 p(token | tokens before it), for every token that has a log-probability


# Texts sent before the prompt to put a BOS token in front of it on a server that scores
# echoed prompts one token off (llama-cpp-python with a model that adds no BOS). Each is
# tried once per such endpoint, and kept only if the probe then comes back aligned and
# the BOS was stripped (the echoed tokens spell exactly the probe text).
BOS_CANDIDATES = ("<|im_start|>", "<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>")
# A text whose next tokens any LM predicts well: used to tell aligned from shifted scores.
ALIGNMENT_PROBE = "1, 2, 3, 4, 5, 6"


class _Unsupported(Exception):
    """This endpoint cannot give prompt log-probabilities (a lasting condition)."""


@dataclass
class _EndpointState:
    lock: threading.Lock
    prefix: str | None = None  # None: not probed yet
    unsupported: str = ""  # why not, once known
    warned: set[str] = field(default_factory=set)  # "unsupported" / "failed": each logged once


_endpoints: dict[tuple[str, str], _EndpointState] = {}
_endpoints_lock = threading.Lock()


def _state(key: tuple[str, str]) -> _EndpointState:
    with _endpoints_lock:
        return _endpoints.setdefault(key, _EndpointState(threading.Lock()))


def forget_endpoints() -> None:
    """Drop what this process learned about endpoints (probes, warnings): for tests."""
    with _endpoints_lock:
        _endpoints.clear()


class SurprisalClient:
    """Per-token surprisal of a text from an OpenAI-compatible completions endpoint.

    One request per text: ``completions.create(prompt=text, echo=True, logprobs=1,
    max_tokens=1, temperature=0)``; the echoed prompt tokens carry their log-probabilities
    (the one generated token is dropped). ``max_tokens=1`` rather than 0: llama-cpp-python
    reads 0 as "no limit".

    ``bos_text``: ``None`` (default) probes the endpoint once per process for the
    one-token shift described in the module doc and fixes it with a BOS token from
    :data:`BOS_CANDIDATES`; ``""`` trusts the endpoint's alignment as it is; any other
    string is put in front of every text as the model's BOS token.

    An endpoint that cannot give log-probabilities (HTTP error, no ``logprobs`` in the
    answer, no echo, a shift that cannot be fixed, the sim backend) costs one warning per
    endpoint per process; :meth:`surprisal` then returns ``None`` without asking again.
    Passing errors (timeouts, 5xx) return ``None`` for that text only.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "", timeout: float = 120.0,
                 bos_text: str | None = None, *, key_setting: str = "server-api-key-env",
                 unsupported: str = ""):
        self.base_url, self.model, self.bos_text = base_url, model, bos_text
        self.endpoint = f"{model} at {base_url}" if base_url else model
        self._state = _state((base_url, model))
        if unsupported and not self._state.unsupported:
            self._state.unsupported = unsupported
        self._client = None
        if not self._state.unsupported:
            import openai

            self._client = openai.OpenAI(base_url=base_url, api_key=api_key_for(api_key_env, key_setting),
                                         timeout=timeout, max_retries=0)

    @classmethod
    def from_endpoint(cls, settings, key_setting: str = "server-api-key-env",
                      bos_text: str | None = None) -> SurprisalClient:
        """A client for an ``EndpointSettings``; the sim backend gives one that has no surprisal."""
        if settings.backend != "openai" or not settings.base_url:
            return cls("", settings.describe(), key_setting=key_setting,
                       unsupported="it is not an OpenAI-compatible completions endpoint")
        return cls(settings.base_url, settings.model, settings.api_key_env,
                   timeout=max(settings.timeout, 120.0), bos_text=bos_text, key_setting=key_setting)

    @property
    def tokenizer(self) -> str:
        return f"endpoint:{self.model}"

    # -- public

    def surprisal(self, text: str) -> list[float] | None:
        """Surprisal in bits of every token after the first, or ``None`` (see the class doc)."""
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
            prefix = self._prefix()
            return self._score(text, prefix)
        except _Unsupported as exc:
            self._state.unsupported = str(exc)
            self._warn_once()
            return None
        except LLMError as exc:  # a passing failure: no surprisal for this text only
            self._warn_once(reason=str(exc))
            return None

    # -- internals

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
            raise _Unsupported("the completions answer has no logprobs")
        usage = getattr(response, "usage", None)
        completion = getattr(usage, "completion_tokens", None) or 0
        tokens = list(getattr(logprobs, "tokens", None) or [])
        values = list(logprobs.token_logprobs)
        tops = list(getattr(logprobs, "top_logprobs", None) or [None] * len(values))
        keep = max(0, len(values) - completion)  # the echoed prompt; the generated token goes
        if keep == 0:
            raise _Unsupported("the answer does not echo the prompt's tokens")
        return tokens[:keep], values[:keep], tops[:keep]

    def _score(self, text: str, prefix: str) -> TokenSurprisal:
        _, values, _ = self._request(prefix + text)
        bits = [-float(v) / _LN2 for v in values if v is not None]
        return TokenSurprisal(tokens=len(values), bits=bits)

    def _prefix(self) -> str:
        """The text to send before each prompt; probes the endpoint the first time."""
        if self.bos_text is not None:
            return self.bos_text
        state = self._state
        with state.lock:
            if state.prefix is None:
                state.prefix = self._find_prefix()
            return state.prefix

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
                   surprisal_model=surprisal_client.endpoint)


# --- a table for people --------------------------------------------------------------

TABLE_COLUMNS = (
    ("prompt", 6), ("chars", 6), ("words", 6), ("tokens", 7), ("H bits/ch", 9), ("zlib", 5),
    ("sents", 5), ("tfidf", 6), ("surp mean", 9), ("surp max", 8), ("surp var", 8),
)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_metrics_table(named: Sequence[tuple[str, PromptMetrics]]) -> str:
    """One row per prompt; '-' where a metric is not available; the tokenizers and LM below.

    Columns: chars, words, tokens, char entropy (bits/char), zlib compression ratio,
    sentences, average TF-IDF, surprisal mean / max (bits per token) / variance (bits²).
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
            _number(m.surprisal_variance, 2),
        ]))
    tokenizers = sorted({m.tokenizer for _, m in named})
    sources = sorted({m.surprisal_model for _, m in named if m.surprisal_model})
    lines.append(f"tokens counted by: {', '.join(tokenizers) or '-'}")
    lines.append("surprisal (bits per token) from: "
                 f"{', '.join(sources) or '- (no endpoint that gives token log-probabilities)'}")
    return "\n".join(lines)
