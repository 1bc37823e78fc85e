"""The server's side of a run, without Flower: global prompt, best prompt, rounds on disk.

The Flower strategy turns messages into ``ClientReply``/``ClientFailure`` records and
calls this class; keeping the bookkeeping here lets it be tested and reused without
a SuperLink, and keeps "where prompts are merged" in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import report
from .errors import FedTextGradError
from .llm import ChatEngine
from .merging import MergeResult, merge_prompts
from .prompt_metrics import SurprisalClient, analyze
from .results import RunRecorder
from .settings import RunSettings

log = logging.getLogger(__name__)


class RoundFailed(FedTextGradError):
    """Too few clients answered a round; the message carries their errors."""


@dataclass(frozen=True)
class ClientReply:
    label: str
    prompt: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientFailure:
    label: str
    reason: str


@dataclass(frozen=True)
class EvalReply:
    label: str
    correct: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


def weighted_accuracy(replies: Sequence[EvalReply]) -> float | None:
    total = sum(r.total for r in replies)
    return sum(r.correct for r in replies) / total if total else None


def require_enough(stage: str, server_round: int, ok: int, failures: Sequence[ClientFailure], required: int) -> None:
    """Fail the round loudly, with every client's error, when fewer than ``required`` answered."""
    if ok >= required:
        return
    reasons = "; ".join(f"client {f.label}: {f.reason}" for f in failures) or "no replies arrived"
    raise RoundFailed(
        f"round {server_round} {stage}: only {ok} client(s) succeeded, at least {required} required "
        f"(min-train-clients). Errors: {reasons}"
    )


class PromptFederation:
    """Holds the run's prompts and writes the run folder as the rounds go."""

    def __init__(self, settings: RunSettings, recorder: RunRecorder, merger: ChatEngine | None, echo=print,
                 surprisal: SurprisalClient | None = None):
        self.settings = settings
        # per-token surprisal of merged prompts from the server's own endpoint, when it is a real
        # one (the sim has no token probabilities); text metrics need no LLM and are always taken
        if surprisal is None and settings.server.backend == "openai":
            surprisal = SurprisalClient.from_endpoint(settings.server, "server-api-key-env")
        self.surprisal = surprisal
        self.recorder = recorder
        self.merger = merger
        self.echo = echo
        self.global_prompt = settings.start_prompt
        self.best_prompt = self.global_prompt
        self.best_accuracy: float | None = None
        self.best_round = 0
        self.initial_accuracy: float | None = None
        self.rounds: list[dict] = []
        self._round_started = time.perf_counter()
        self._pending: dict = {}
        self.error = ""
        recorder.save_prompt("round-000-initial", self.global_prompt)
        self.initial_metrics = self._prompt_metrics(self.global_prompt, with_surprisal=True)

    # --- round 0 -----------------------------------------------------------------
    def record_initial(self, replies: Sequence[EvalReply]) -> float | None:
        self.initial_accuracy = weighted_accuracy(replies)
        self.best_accuracy = self.initial_accuracy
        self.echo(f"initial prompt: validation accuracy {report.percent(self.initial_accuracy)} "
                  f"on {sum(r.total for r in replies)} examples")
        self.echo(report.header())
        self._write_summary(test_accuracy=None, finished=False)
        return self.initial_accuracy

    # --- training and merging -------------------------------------------------------
    def merge(self, server_round: int, replies: Sequence[ClientReply], failures: Sequence[ClientFailure]) -> MergeResult:
        self._round_started = time.perf_counter()
        clients = []
        for reply in replies:
            path = self.recorder.save_prompt(f"round-{server_round:03d}-client-{reply.label}", reply.prompt)
            clients.append({"label": reply.label, "num_examples": reply.num_examples,
                            "metrics": reply.metrics, "prompt": reply.prompt, "prompt_file": path,
                            "prompt_metrics": self._prompt_metrics(reply.prompt, with_surprisal=False)})
            self.echo(report.client_row(server_round, reply.label, reply.metrics, reply.prompt))
        for failure in failures:
            self.echo(report.failure_row(server_round, failure.label, failure.reason))
        merged = merge_prompts([r.prompt for r in replies], self.settings.merge,
                               self.settings.format_instruction, self.merger)
        if merged.fallback_reason:
            self.echo(f"round {server_round}: merge fell back to concatenation: {merged.fallback_reason}")
        self.global_prompt = merged.prompt
        merger_usage = self.merger.take_usage() if self.merger else None
        self._pending = {
            "round": server_round,
            "clients": clients,
            "failures": [{"label": f.label, "stage": "train", "reason": f.reason} for f in failures],
            "merge_method": merged.method,
            "merge_fallback_reason": merged.fallback_reason,
            "merge_format_repaired": merged.format_repaired,
            "merged_prompt": merged.prompt,
            "merged_prompt_file": self.recorder.save_prompt(f"round-{server_round:03d}-merged", merged.prompt),
            "merged_prompt_metrics": self._prompt_metrics(merged.prompt, with_surprisal=True),
            "server_llm": merger_usage.as_metrics() if merger_usage else {},
        }
        return merged

    # --- evaluation of the merged prompt ----------------------------------------------
    def finish_round(self, server_round: int, replies: Sequence[EvalReply], failures: Sequence[ClientFailure]) -> dict:
        accuracy = weighted_accuracy(replies)
        if accuracy is not None and (self.best_accuracy is None or accuracy > self.best_accuracy):
            self.best_accuracy, self.best_prompt, self.best_round = accuracy, self.global_prompt, server_round
        record = dict(self._pending)
        record.update({
            "val_accuracy": accuracy,
            "val_examples": sum(r.total for r in replies),
            "val_per_client": {r.label: r.metrics for r in replies},
            "best_val_accuracy": self.best_accuracy,
            "best_round": self.best_round,
            "seconds": time.perf_counter() - self._round_started,
        })
        record["failures"] = record.get("failures", []) + [
            {"label": f.label, "stage": "evaluate", "reason": f.reason} for f in failures
        ]
        for failure in failures:
            self.echo(report.failure_row(server_round, failure.label, f"(evaluation) {failure.reason}"))
        self.echo(report.merged_row(server_round, self.settings.merge, accuracy, self.best_accuracy,
                                    self.global_prompt, record["seconds"]))
        self.recorder.append_round(record)
        self.rounds.append(record)
        self._write_summary(test_accuracy=None, finished=False)
        self._plot()
        return record

    # --- the end -------------------------------------------------------------------
    def finish(self, test_replies: Sequence[EvalReply]) -> dict:
        test_accuracy = weighted_accuracy(test_replies)
        self.recorder.save_prompt("best", self.best_prompt)
        summary = self._write_summary(test_accuracy=test_accuracy, finished=True,
                                      test_examples=sum(r.total for r in test_replies))
        self._plot()
        self.echo(f"best prompt (round {self.best_round}): validation {report.percent(self.best_accuracy)}, "
                  f"test {report.percent(test_accuracy)}")
        self.echo(f"results: {self.recorder.path}")
        return summary

    def record_error(self, error: BaseException) -> None:
        """Keep what was done and say why the run stopped, before the error propagates."""
        self.error = f"{type(error).__name__}: {error}"
        self.recorder.save_prompt("best", self.best_prompt)
        self._write_summary(test_accuracy=None, finished=False)
        self.echo(f"run stopped: {self.error}")
        self.echo(f"results so far: {self.recorder.path}")

    def _write_summary(self, test_accuracy: float | None, finished: bool, test_examples: int = 0) -> dict:
        summary = {
            "finished": finished,
            "error": self.error,
            "rounds": len(self.rounds),
            "rounds_planned": self.settings.num_rounds,
            "task": self.settings.tasks,
            "partitioning": self.settings.partitioning,
            "merge": self.settings.merge,
            "initial_prompt": self.settings.start_prompt,
            "initial_prompt_metrics": self.initial_metrics,
            "initial_val_accuracy": self.initial_accuracy,
            "best_val_accuracy": self.best_accuracy,
            "best_round": self.best_round,
            "best_prompt": self.best_prompt,
            "final_prompt": self.global_prompt,
            "test_accuracy": test_accuracy,
            "test_examples": test_examples,
            "cost": self._cost(),
            "results_dir": str(self.recorder.path),
        }
        self.recorder.write_summary(summary)
        return summary

    def _cost(self) -> dict[str, dict[str, int]]:
        """LLM calls and tokens of the finished rounds, by where they were spent."""
        cost = {part: {"llm_calls": 0, "tokens": 0}
                for part in ("client_training", "client_evaluation", "server_merge", "total")}

        def add(part: str, calls: float, tokens: float) -> None:
            for key in (part, "total"):
                cost[key]["llm_calls"] += int(calls)
                cost[key]["tokens"] += int(tokens)

        for record in self.rounds:
            for client in record["clients"]:
                m = client["metrics"]
                add("client_training", m.get("llm_calls", 0), m.get("prompt_tokens", 0) + m.get("completion_tokens", 0))
                add("client_evaluation", m.get("eval_llm_calls", 0), m.get("eval_tokens", 0))
            for m in record.get("val_per_client", {}).values():
                add("client_evaluation", m.get("llm_calls", 0), m.get("tokens", 0))
            server = record.get("server_llm", {})
            add("server_merge", server.get("calls", 0), server.get("prompt_tokens", 0) + server.get("completion_tokens", 0))
        return cost

    def _prompt_metrics(self, prompt: str, with_surprisal: bool) -> dict | None:
        """Information-density metrics of a prompt (prompt_metrics.py); never fails the run."""
        try:
            return analyze(prompt, self.surprisal if with_surprisal else None).as_dict()
        except Exception as exc:
            log.warning("could not measure a prompt: %s: %s", type(exc).__name__, exc)
            return None

    def _plot(self) -> None:
        try:
            self.recorder.plot_accuracy(self.rounds, self.initial_accuracy)
        except Exception as exc:  # a plot must never cost the run its results
            log.warning("could not draw accuracy.png: %s", exc)
        try:
            self.recorder.plot_prompt_metrics(self.rounds, self.initial_accuracy, self.settings.start_prompt,
                                              self.initial_metrics)
        except Exception as exc:
            log.warning("could not draw prompt_metrics.png: %s", exc)
