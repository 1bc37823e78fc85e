"""The server's side of a run, without Flower: global prompt, best prompt, rounds on disk.

The Flower strategy turns messages into ``ClientReply``/``ClientFailure`` records and
calls this class; keeping the bookkeeping here lets it be tested and reused without
a SuperLink, and keeps "where prompts are merged" in one place.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtextgrad_core.run import report
from fedtextgrad_core.run.checkpoint import Checkpoint, rng_state, save_checkpoint
from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.llm.engine import ChatEngine, Usage, make_engine
from fedtextgrad_core.method.merging import MergeResult, merge_prompts
from fedtextgrad_core.method.prompt_metrics import SurprisalClient, analyze
from fedtextgrad_core.run.recorder import RunRecorder, default_run_name
from fedtextgrad_core.method.robust_merge import RobustDecision, select_uploads
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.method.upload_checks import upload_problem

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
                 surprisal: SurprisalClient | None = None, run_config: Mapping[str, object] | None = None):
        self.settings = settings
        self.run_config = dict(run_config or {})  # as given, saved with each checkpoint for resume-from
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
        # samples the clients of every round; part of the checkpoint, so a resumed run
        # asks the same clients as an uninterrupted one
        self.rng = random.Random(settings.seed)
        self.resumed_after: list[int] = []
        self.test_failures: list[dict] = []
        self._round_started = time.perf_counter()
        self._round_started_at = time.time()
        self._drawing: threading.Thread | None = None  # the figures of the last finished round
        self._pending: dict = {}
        self.error = ""
        recorder.save_prompt("round-000-initial", self.global_prompt)
        self.initial_metrics = self._prompt_metrics(self.global_prompt, with_surprisal=True)

    @classmethod
    def open(cls, settings: RunSettings, run_config: Mapping[str, object], merger: ChatEngine | None,
             resume: tuple[Path, Checkpoint] | None = None, echo=print) -> PromptFederation:
        """A new run in a new folder, or (``resume``) the interrupted run continued in its own folder."""
        if resume is None:
            name = settings.run_name or default_run_name("+".join(settings.tasks), settings.partitioning, settings.merge)
            recorder = RunRecorder(Path(settings.results_dir), name,
                                   {"run_config": dict(run_config), "settings": settings.as_dict()})
        else:
            recorder = RunRecorder.reopen(resume[0], resume[1].round)
        echo(f"results folder: {recorder.path}")
        federation = cls(settings, recorder, merger, echo=echo, run_config=run_config)
        if resume is not None:
            federation.restore(resume[1])
        return federation

    # --- checkpoint and resume ---------------------------------------------------------
    @property
    def finished_rounds(self) -> int:
        return int(self.rounds[-1]["round"]) if self.rounds else 0

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: the rounds on disk are the run's history, not redone."""
        self.global_prompt = checkpoint.global_prompt
        self.best_prompt = checkpoint.best_prompt
        self.best_accuracy = checkpoint.best_accuracy
        self.best_round = checkpoint.best_round
        self.initial_accuracy = checkpoint.initial_accuracy
        self.rng = checkpoint.random()
        self.rounds = [r for r in self.recorder.read_rounds() if int(r["round"]) <= checkpoint.round]
        self.resumed_after = [*checkpoint.resumed_after, checkpoint.round]
        self.echo(f"resuming {self.recorder.path} after round {checkpoint.round}: "
                  f"validation accuracy {report.percent(self.best_accuracy)} (best, round {self.best_round}) so far")
        self.echo(report.header())

    def _checkpoint(self, finished_round: int) -> None:
        save_checkpoint(self.recorder.path, Checkpoint(
            round=finished_round,
            global_prompt=self.global_prompt,
            best_prompt=self.best_prompt,
            best_accuracy=self.best_accuracy,
            best_round=self.best_round,
            initial_accuracy=self.initial_accuracy,
            rng_state=rng_state(self.rng),
            run_config=dict(self.run_config),
            resumed_after=list(self.resumed_after),
        ))

    # --- round 0 -----------------------------------------------------------------
    def record_initial(self, replies: Sequence[EvalReply]) -> float | None:
        self.initial_accuracy = weighted_accuracy(replies)
        self.best_accuracy = self.initial_accuracy
        self.echo(f"initial prompt: validation accuracy {report.percent(self.initial_accuracy)} "
                  f"on {sum(r.total for r in replies)} examples")
        self.echo(report.header())
        self._write_summary(test_accuracy=None, finished=False)
        self._checkpoint(0)
        return self.initial_accuracy

    # --- training and merging -------------------------------------------------------
    def start_round(self, server_round: int) -> None:
        """The round's clock starts when its training messages go out."""
        self._round_started, self._round_started_at = time.perf_counter(), time.time()

    def merge(self, server_round: int, replies: Sequence[ClientReply], failures: Sequence[ClientFailure]) -> MergeResult:
        replies, rejected = self._checked_uploads(replies)
        for reply in replies:
            self.echo(report.client_row(server_round, reply.label, reply.metrics, reply.prompt))
        for failure in failures:
            self.echo(report.failure_row(server_round, failure.label, failure.reason))
        for failure in rejected:
            self.echo(report.failure_row(server_round, failure.label, f"(upload rejected) {failure.reason}"))
        if rejected:  # the strategy counted these clients as successes; they are not
            answered = len(replies) + len(failures) + len(rejected)
            require_enough("upload check", server_round, len(replies), [*failures, *rejected],
                           min(self.settings.clients_needed, max(1, answered)))
        robust, scoring_usage = self._robust_decision(server_round, replies)
        clients = []
        for reply in replies:
            path = self.recorder.save_prompt(f"round-{server_round:03d}-client-{reply.label}", reply.prompt)
            entry = {"label": reply.label, "num_examples": reply.num_examples,
                     "metrics": reply.metrics, "prompt": reply.prompt, "prompt_file": path,
                     "prompt_metrics": self._prompt_metrics(reply.prompt, with_surprisal=False)}
            if robust is not None:
                entry.update(holdout_accuracy=robust.scores[reply.label], left_out=reply.label in robust.left_out)
            clients.append(entry)
        kept = [r for r in replies if robust is None or r.label not in robust.left_out]
        merged = merge_prompts([r.prompt for r in kept], self.settings.merge,
                               self.settings.format_instruction, self.merger, self.settings.merge_token_budget)
        if merged.fallback_reason:
            self.echo(f"round {server_round}: merge fell back to concatenation: {merged.fallback_reason}")
        if merged.dropped_sentences:
            self.echo(f"round {server_round}: merge left out {len(merged.dropped_sentences)} sentence(s) to stay "
                      f"within merge-token-budget={merged.token_budget} (listed in rounds.jsonl)")
        self.global_prompt = merged.prompt
        server_usage = Usage()  # everything the server's LLM spent this round: merging and scoring
        for spent in (self.merger.take_usage() if self.merger else None, scoring_usage):
            if spent is not None:
                server_usage.add(spent)
        self._pending = {
            "round": server_round,
            "clients": clients,
            "failures": [{"label": f.label, "stage": "train", "reason": f.reason} for f in failures]
                        + [{"label": f.label, "stage": "upload", "reason": f.reason} for f in rejected],
            "merge_method": merged.method,
            "merge_fallback_reason": merged.fallback_reason,
            "merge_format_repaired": merged.format_repaired,
            **merged.budget_record(),
            "merged_prompt": merged.prompt,
            "merged_prompt_file": self.recorder.save_prompt(f"round-{server_round:03d}-merged", merged.prompt),
            "merged_prompt_metrics": self._prompt_metrics(merged.prompt, with_surprisal=True),
            "server_llm": server_usage.as_metrics() if self.merger or scoring_usage is not None else {},
            "robust_merge": None if robust is None else {**robust.as_record(), "llm": scoring_usage.as_metrics()},
        }
        return merged

    def _checked_uploads(self, replies: Sequence[ClientReply]) -> tuple[list[ClientReply], list[ClientFailure]]:
        """Uploads fit to merge, and the rejected ones as failures with their reason (upload_checks.py)."""
        accepted, rejected = [], []
        for reply in replies:
            problem = upload_problem(reply.prompt, self.settings.max_prompt_chars)
            if problem is None:
                accepted.append(reply)
            else:
                rejected.append(ClientFailure(reply.label, problem))
        return accepted, rejected

    def _robust_decision(self, server_round: int, replies: Sequence[ClientReply]
                         ) -> tuple[RobustDecision | None, Usage | None]:
        """With robust-merge on: each upload's held-out accuracy and the outliers to leave out
        (robust_merge.py), scored with the server's own LLM; and what that scoring cost."""
        if not self.settings.robust_merge or not replies:
            return None, None
        engine = self.merger or make_engine(self.settings.server, "server-api-key-env")  # concat has no merger
        earlier = engine.take_usage()  # count the scoring alone...
        decision = select_uploads(engine, self.settings, {r.label: r.prompt for r in replies})
        spent = engine.take_usage()
        engine.usage.add(earlier)  # ...and leave what was spent before on the engine's count
        scores = ", ".join(f"client {label} {report.percent(score)}" for label, score in decision.scores.items())
        self.echo(f"round {server_round}: robust merge, held-out accuracy of each upload on "
                  f"{decision.holdout_examples} server examples: {scores}")
        for label in decision.left_out:
            self.echo(f"round {server_round}: robust merge left out client {label}: held-out accuracy "
                      f"{report.percent(decision.scores[label])}, more than {100 * decision.margin:.0f} points "
                      f"below the median {report.percent(decision.median)}")
        return decision, spent

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
            "seconds": time.perf_counter() - self._round_started,  # training, merging and evaluation
            "started_at": self._round_started_at,
            "ended_at": time.time(),
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
        self._checkpoint(server_round)
        self._draw_figures()
        return record

    # --- the end -------------------------------------------------------------------
    def finish(self, test_replies: Sequence[EvalReply], failures: Sequence[ClientFailure] = ()) -> dict:
        """The best prompt's test accuracy, over the clients that answered (the others are listed)."""
        test_accuracy = weighted_accuracy(test_replies)
        self.recorder.save_prompt("best", self.best_prompt)
        for failure in failures:
            self.echo(report.failure_row(self.settings.num_rounds + 1, failure.label, f"(test) {failure.reason}"))
        self.test_failures = [{"label": f.label, "stage": "test", "reason": f.reason} for f in failures]
        summary = self._write_summary(test_accuracy=test_accuracy, finished=True,
                                      test_examples=sum(r.total for r in test_replies))
        self._figures_done()
        self.echo(f"best prompt (round {self.best_round}): validation {report.percent(self.best_accuracy)}, "
                  f"test {report.percent(test_accuracy)}")
        self.echo(f"results: {self.recorder.path}")
        return summary

    def record_error(self, error: BaseException) -> None:
        """Keep what was done and say why the run stopped, before the error propagates."""
        self.error = f"{type(error).__name__}: {error}"
        self.recorder.save_prompt("best", self.best_prompt)
        self._write_summary(test_accuracy=None, finished=False)
        self._figures_done()
        self.echo(f"run stopped: {self.error}")
        self.echo(f"results so far: {self.recorder.path}")

    def _write_summary(self, test_accuracy: float | None, finished: bool, test_examples: int = 0) -> dict:
        summary = {
            "finished": finished,
            "error": self.error,
            "rounds": len(self.rounds),
            "rounds_planned": self.settings.num_rounds,
            "resumed_after_rounds": self.resumed_after,
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
            "test_failures": self.test_failures,
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

    def _draw_figures(self) -> None:
        """Draw accuracy.png and prompt_metrics.png in the background, while the next round
        waits on its clients: drawing takes about a second of CPU on a small machine, which on
        the server's critical path would be the largest cost it adds to a round."""
        self._figures_done()
        rounds, initial = list(self.rounds), self.initial_accuracy
        self._drawing = threading.Thread(target=self._draw, args=(rounds, initial), name="figures", daemon=True)
        self._drawing.start()

    def _figures_done(self) -> None:
        """Wait for the figures being drawn; at the end of a run, they are complete then."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None

    def _draw(self, rounds: list[dict], initial_accuracy: float | None) -> None:
        try:
            self.recorder.plot_accuracy(rounds, initial_accuracy)
        except Exception as exc:  # a figure must never cost the run its results
            log.warning("could not draw accuracy.png: %s", exc)
        try:
            self.recorder.plot_prompt_metrics(rounds, initial_accuracy, self.settings.start_prompt, self.initial_metrics)
        except Exception as exc:
            log.warning("could not draw prompt_metrics.png: %s", exc)
