"""Information-density metrics of a prompt: the measurements behind the UID merge.

Text statistics (characters, words, tokens, character entropy, zlib ratio, TF-IDF) in pure
Python, the :class:`PromptMetrics` record, :func:`analyze` (which adds the surprisal an
``llm.surprisal.SurprisalClient`` measures) and the table ``fedtextgrad analyze`` prints.
Every metric's definition, and how they differ from the reference code's: docs/prompt-metrics.md.
"""

from __future__ import annotations

import math
import re
import statistics
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from fedtextgrad_core.llm.surprisal import SurprisalClient
from fedtextgrad_core.text import count_tokens

_TERM_RE = re.compile(r"\w+")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


@dataclass(frozen=True)
class PromptMetrics:
    """Information-density measurements of one prompt (docs/prompt-metrics.md defines each)."""

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
    surprisal_method: str | None = None  # "echo-logprobs" or "forced-next-token" (docs/prompt-metrics.md)
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


# --- surprisal statistics (the numbers come from llm/surprisal.py) ----------------------


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
        return float(2.0 ** mean_bits)
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
