"""Load-test one OpenAI-compatible endpoint at several concurrency levels.

Why: every client node runs next to its own LLM server (vLLM, Ollama, llama.cpp, …),
and ``llm-concurrency`` decides how many requests a client keeps in flight. The right
value depends on that server and its hardware, so a site measures it: the same chat
request is sent ``requests`` times at each level, and the table shows where requests/s
stop growing and latency starts to climb. The requests go through the same ``openai``
client and the same error sorting as a federated run (``openai_backend.py``), so what
fails here fails the same way there.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from fedtextgrad_core.errors import ConfigError, LLMError
from fedtextgrad_core.llm.openai_transport import OpenAIChat, classify

MAX_CONCURRENCY = 1024  # more threads than this on one client says more about the client than the server
DEFAULT_PROMPT = "Write a short paragraph about the sea."

Progress = Callable[[str], None]


def parse_concurrency(text: str, setting: str = "--concurrency") -> list[int]:
    """``"1,4,16,64"`` → ``[1, 4, 16, 64]``; anything else is refused naming what was wrong."""
    accepted = f"a comma-separated list of whole numbers from 1 to {MAX_CONCURRENCY}, e.g. 1,4,16,64"
    levels = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= MAX_CONCURRENCY:
            raise ConfigError(setting, text, accepted)
        levels.append(int(part))
    return levels


def percentile(values: list[float], share: float) -> float | None:
    """The ``share`` (0..1) percentile by linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LevelResult:
    """What one concurrency level measured. Token and latency figures are None when unknown, never 0."""

    concurrency: int
    requests: int
    errors: int
    wall_seconds: float
    requests_per_s: float  # successful requests per second of wall time
    completion_tokens: int | None  # None: the server sent no usage field
    completion_tokens_per_s: float | None
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    first_error: str = ""


@dataclass
class EndpointBenchReport:
    base_url: str
    model: str
    requests_per_level: int
    max_tokens: int
    prompt: str
    levels: list[LevelResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Outcome:
    seconds: float
    completion_tokens: int | None = None  # None: no usage field in the answer
    error: str = ""


class EndpointBench:
    """One endpoint, one request shape; :meth:`run` measures the given concurrency levels."""

    def __init__(self, base_url: str, model: str, api_key: str, *, max_tokens: int = 64,
                 prompt: str = DEFAULT_PROMPT, timeout: float = 120.0, temperature: float = 0.0):
        if max_tokens < 1:
            raise ConfigError("--max-tokens", max_tokens, "a whole number of at least 1")
        if not prompt.strip():
            raise ConfigError("--prompt", prompt, "a non-empty message to send")
        if not timeout > 0:
            raise ConfigError("--timeout", timeout, "a number of seconds above 0")
        self.chat = OpenAIChat(base_url, model, api_key, temperature, max_tokens, timeout)
        self.prompt = prompt

    def check(self) -> None:
        """Fail in seconds, with one line, when the URL is wrong or the model refuses a chat request.

        A ``GET /models`` first, then one chat request that is not timed (it also opens the
        connection and warms the server), so a 404 or a wrong model name stops the
        benchmark before the table instead of filling it with errors.
        """
        self.chat.check("--base-url")
        outcome = self._one_request()
        if outcome.error:
            raise LLMError(f"the first request failed: {outcome.error}")

    def _one_request(self) -> _Outcome:
        messages = [{"role": "user", "content": self.prompt}]
        started = time.perf_counter()
        try:
            response = self.chat.client.chat.completions.create(
                model=self.chat.model, messages=messages,
                temperature=self.chat.temperature, max_tokens=self.chat.max_tokens, timeout=self.chat.timeout,
            )
        except Exception as exc:
            return _Outcome(time.perf_counter() - started, error=str(classify(exc, self.chat.base_url, self.chat.model)))
        seconds = time.perf_counter() - started
        choices = getattr(response, "choices", None)
        if not choices or getattr(getattr(choices[0], "message", None), "content", None) is None:
            return _Outcome(seconds, error=f"LLM endpoint {self.chat.base_url} returned a reply without message text")
        usage = getattr(response, "usage", None)
        tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
        return _Outcome(seconds, completion_tokens=tokens)

    def measure(self, concurrency: int, requests: int, progress: Progress | None = None) -> LevelResult:
        """Send ``requests`` requests with at most ``concurrency`` in flight; wall time covers them all."""
        done = 0
        lock = threading.Lock()
        step = max(1, requests // 4)

        def task(_: int) -> _Outcome:
            nonlocal done
            outcome = self._one_request()
            with lock:
                done += 1
                if progress and done % step == 0 and done < requests:
                    progress(f"  concurrency {concurrency}: {done}/{requests} requests done")
            return outcome

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="endpoint-bench") as pool:
            outcomes = list(pool.map(task, range(requests)))
        wall = time.perf_counter() - started
        return summarise(concurrency, outcomes, wall)

    def run(self, levels: list[int], requests: int, progress: Progress | None = None) -> EndpointBenchReport:
        if requests < 1:
            raise ConfigError("--requests", requests, "a whole number of at least 1")
        report = EndpointBenchReport(self.chat.base_url, self.chat.model, requests, self.chat.max_tokens, self.prompt)
        if progress:
            progress(f"checking {self.chat.base_url} (model {self.chat.model}) ...")
        self.check()
        for level in levels:
            if progress:
                note = f" (only {requests} requests: at most {requests} in flight)" if requests < level else ""
                progress(f"concurrency {level}: sending {requests} requests{note} ...")
            result = self.measure(level, requests, progress)
            report.levels.append(result)
            if progress:
                progress(f"concurrency {level}: {result.requests_per_s:.2f} requests/s, {result.errors} errors, "
                         f"{result.wall_seconds:.2f} s")
        return report


def summarise(concurrency: int, outcomes: list[_Outcome], wall: float) -> LevelResult:
    ok = [o for o in outcomes if not o.error]
    latencies = [1000 * o.seconds for o in ok]
    # tokens/s only when every successful answer carried a usage field: a partial sum would understate it
    tokens = sum(o.completion_tokens or 0 for o in ok) if ok and all(o.completion_tokens is not None for o in ok) else None
    first_error = next((o.error for o in outcomes if o.error), "")
    return LevelResult(
        concurrency=concurrency, requests=len(outcomes), errors=len(outcomes) - len(ok), wall_seconds=wall,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        completion_tokens=tokens,
        completion_tokens_per_s=tokens / wall if tokens is not None and wall > 0 else None,
        latency_p50_ms=percentile(latencies, 0.50), latency_p90_ms=percentile(latencies, 0.90),
        latency_p99_ms=percentile(latencies, 0.99), first_error=first_error,
    )


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(report: EndpointBenchReport) -> str:
    header = (f"{'concurrency':>11}  {'requests':>8}  {'errors':>6}  {'wall s':>7}  {'req/s':>7}  "
              f"{'compl tok/s':>11}  {'p50 ms':>7}  {'p90 ms':>7}  {'p99 ms':>7}")
    title = (f"{report.base_url} (model {report.model}), {report.requests_per_level} requests per level, "
             f"max_tokens {report.max_tokens}")
    lines = [title, header]
    for row in report.levels:
        lines.append(
            f"{row.concurrency:>11}  {row.requests:>8}  {row.errors:>6}  {row.wall_seconds:>7.2f}  "
            f"{row.requests_per_s:>7.2f}  {_cell(row.completion_tokens_per_s, 1):>11}  "
            f"{_cell(row.latency_p50_ms, 0):>7}  {_cell(row.latency_p90_ms, 0):>7}  {_cell(row.latency_p99_ms, 0):>7}")
    errors = [f"concurrency {row.concurrency}: {row.first_error}" for row in report.levels if row.first_error]
    if errors:
        lines.append("first error per level:")
        lines.extend(f"  {line}" for line in errors)
    return "\n".join(lines)
