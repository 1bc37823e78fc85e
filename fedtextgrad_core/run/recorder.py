"""Everything a run leaves behind, as it goes: the console table, the run folder, the checkpoint, the figures.

The loop (federation.py) decides; the recorder only writes down what was decided, so
neither the round step nor the state ever prints or touches a file.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.llm.surprisal import SurprisalClient
from fedtextgrad_core.method.prompt_metrics import analyze
from fedtextgrad_core.run import figures, html_report, report, site_steps
from fedtextgrad_core.run.checkpoint import Checkpoint
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.records import ClientEvaluation, ClientUpload, Failure, RoundRecord, RunSummary
from fedtextgrad_core.run.round_step import RoundOutcome
from fedtextgrad_core.run.run_folder import RunFolder, default_run_name
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.run.state import FederationState
from fedtextgrad_core.run.tracking import NoTracker, Tracker, make_tracker
from fedtextgrad_core.stats import Interval, paired, wilson

log = logging.getLogger(__name__)
# figures while a run goes: redrawn after a round at most this often, always after the last round
REDRAW_EVERY_SECONDS = 30.0

Echo = Callable[[str], None]


@dataclass(frozen=True)
class FinalScore:
    """One prompt scored on the clients' test splits."""

    accuracy: float | None
    examples: int
    usage: Usage
    failures: tuple[Failure, ...] = ()
    evaluations: tuple[ClientEvaluation, ...] = ()  # per client, with per-example outcomes


def weighted_accuracy(evaluations: Sequence[ClientEvaluation]) -> float | None:
    total = sum(e.reply.scores.total for e in evaluations)
    return sum(e.reply.scores.correct for e in evaluations) / total if total else None


def examples_of(evaluations: Sequence[ClientEvaluation]) -> int:
    return sum(e.reply.scores.total for e in evaluations)


def changed(first: Sequence[ClientEvaluation], repeats: Sequence[Sequence[ClientEvaluation]]) -> int:
    """How many examples of ``first`` were scored otherwise in any of the ``repeats``."""
    base = outcomes_of(first)
    others = [outcomes_of(again) for again in repeats]
    return sum(1 for example, right in base.items() if any(o.get(example, right) != right for o in others))


def interval_of(evaluations: Sequence[ClientEvaluation]) -> Interval:
    """The clients' pooled accuracy with its n and 95% Wilson interval."""
    return wilson(sum(e.reply.scores.correct for e in evaluations), examples_of(evaluations))


def outcomes_of(evaluations: Sequence[ClientEvaluation]) -> dict[str, bool]:
    """Example id -> right, over every client. Clients hold different examples; an id two clients both
    claim is dropped (a paired comparison must not pair one example with another)."""
    seen: dict[str, bool] = {}
    clashing: set[str] = set()
    for evaluation in evaluations:
        for example, right in evaluation.reply.scores.outcomes().items():
            if example in seen:
                clashing.add(example)
            seen[example] = right
    return {example: right for example, right in seen.items() if example not in clashing}


def by_task(evaluations: Sequence[ClientEvaluation]) -> dict[str, Interval]:
    """The pooled accuracy of each task (an example id starts with its task), for runs with several."""
    counts: dict[str, list[int]] = {}
    for example, right in outcomes_of(evaluations).items():
        tally = counts.setdefault(example.split("/", 1)[0], [0, 0])
        tally[0] += right
        tally[1] += 1
    return {task: wilson(correct, n) for task, (correct, n) in sorted(counts.items())}


def usage_of(evaluations: Sequence[ClientEvaluation]) -> Usage:
    total = Usage()
    for evaluation in evaluations:
        total.add(evaluation.reply.usage)
    return total


class Recorder:
    """Writes one run: what it prints, its folder, its checkpoint and its figures."""

    def __init__(self, folder: RunFolder, settings: RunSettings, echo: Echo = print,
                 surprisal: SurprisalClient | None = None, history: Sequence[RoundRecord] = (),
                 tracker: Tracker | None = None):
        self.folder = folder
        self.settings = settings
        self.echo = echo
        self.tracker: Tracker = tracker or NoTracker()
        # per-token surprisal of merged prompts from the server's own endpoint, when it is a real
        # one (the sim has no token probabilities); text metrics need no LLM and are always taken
        if surprisal is None and settings.server.backend == "openai":
            surprisal = SurprisalClient.from_endpoint(settings.server, "server-api-key-env")
        self.surprisal = surprisal
        self.history: list[RoundRecord] = list(history)
        self.error = ""
        self.test_failures: tuple[Failure, ...] = ()
        self.client_llms: dict[str, str] = {}
        # whether each client's LLM is the simulator, as the client reported it: a SuperNode's node
        # config may give its client a real model where the run config says `sim`
        self.client_simulated: dict[str, bool] = {
            u.label: u.reply.simulated for record in self.history for u in record.uploads}
        self.tests: dict[str, FinalScore] = {}
        self.initial_interval: Interval | None = None  # the start prompt's validation (initial)
        self.initial_repeats: tuple[Interval, ...] = ()
        self.initial_changed: int | None = None
        self.opened = time.monotonic()
        self.seconds_before = 0.0  # wall time of the run before a resume
        self._drawing: threading.Thread | None = None
        self._drawn_at = self.opened  # when the figures were last drawn (or the run opened)
        self._figures_stale = False  # a round finished since the figures were last drawn
        self._figures_skipped = False  # said once that matplotlib is missing (a server installed as a site is)
        self.initial_metrics = self.prompt_metrics(settings.start_prompt, with_surprisal=True)

    @property
    def path(self) -> Path:
        return self.folder.path

    # --- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: RunSettings, run_config: Mapping[str, object],
             resume: tuple[Path, Checkpoint] | None = None, echo: Echo = print,
             surprisal: SurprisalClient | None = None) -> tuple[Recorder, FederationState]:
        """A new run in a new folder, or (``resume``) the interrupted run continued in its own folder."""
        if resume is None:
            name = settings.run_name or default_run_name("+".join(settings.tasks), settings.partitioning, settings.merge)
            folder = RunFolder.create(settings.results_dir, name,
                                      {"run_config": dict(run_config), "settings": settings.as_dict()})
            state = FederationState.start(settings.start_prompt, settings.seed, run_config)
            history: list[RoundRecord] = []
        else:
            folder = RunFolder.reopen(resume[0], resume[1].round)
            state = FederationState.resume(resume[1])
            history = state.check_history(folder.read_rounds())
        echo(f"results folder: {folder.path}")
        site_steps.announce(run_config, folder.path)  # where simulated clients keep their step logs
        tracker = make_tracker(settings.tracker, settings.tracking_uri, settings.tracking_experiment,
                               settings.tracking_parent_run, echo)
        recorder = cls(folder, settings, echo, surprisal, history, tracker)
        tracker.start(settings, run_config, folder.path)
        if resume is not None:
            try:
                before = folder.read_summary()
            except (OSError, ValueError, TypeError, MalformedRecord):
                before = None
            if before is not None:  # what the summary said of the start prompt stays said
                recorder.seconds_before = before.seconds
                recorder.initial_interval = before.initial_val_interval
                recorder.initial_repeats, recorder.initial_changed = before.initial_val_repeats, before.initial_val_changed
        if resume is None:
            folder.save_prompt("round-000-initial", state.global_prompt)
        else:
            echo(f"resuming {folder.path} after round {state.finished_round}: validation accuracy "
                 f"{report.percent(state.best_accuracy)} (best, round {state.best_round}) so far")
            echo(report.header())
        return recorder, state

    # --- what happens -----------------------------------------------------------------------------
    def initial(self, state: FederationState, evaluations: Sequence[ClientEvaluation],
                failures: Sequence[Failure], repeats: Sequence[Sequence[ClientEvaluation]] = ()) -> None:
        """The start prompt's validation, and ``repeats``: the same scored again by the same clients."""
        self.remember_llms(evaluations)
        self._failure_rows(0, [(f.label, f"(evaluation) {f.reason}") for f in failures])
        self.initial_interval = interval_of(evaluations)
        self.initial_repeats = tuple(interval_of(again) for again in repeats)
        self.initial_changed = changed(evaluations, repeats) if repeats else None
        self.echo(f"initial prompt: validation accuracy {self.initial_interval.shown()}")
        if repeats:
            scores = ", ".join(i.shown() for i in (self.initial_interval, *self.initial_repeats))
            self.echo(f"initial prompt scored {len(repeats) + 1} times by the same clients: {scores}; "
                      f"{self.initial_changed} of {self.initial_interval.n} examples were scored differently "
                      "(the LLM server's own noise; a reply cache makes repeats identical)")
        self.echo(report.header())
        self.write_summary(state, finished=False)
        state.save(self.path)
        self.tracker.log_initial(state.initial_accuracy)

    def uploads(self, outcome: RoundOutcome) -> tuple[ClientUpload, ...]:
        """Print the round's client rows and failures, save the uploads, and measure each one."""
        server_round = outcome.round
        labels = {u.client.key: u.label for u in outcome.accepted}
        for row in report.client_rows(server_round, [(u.label, u.reply) for u in outcome.accepted],
                                      clients=len(outcome.accepted) + len(outcome.failures)):
            self.echo(row)
        self._failure_rows(server_round, [
            (f.label, ("" if f.stage == "train" else f"({f.stage} rejected) ") + f.reason) for f in outcome.failures])
        if outcome.robust is not None:
            robust = outcome.robust
            if len(robust.scores) <= report.MAX_CLIENT_ROWS:
                scores = ", ".join(f"client {labels[key]} {report.percent(score)}"
                                   for key, score in robust.scores.items())
            else:
                values = sorted(robust.scores.values())
                scores = (f"min {report.percent(values[0])}, median {report.percent(statistics.median(values))}, "
                          f"max {report.percent(values[-1])} over {len(values)} uploads (each in rounds.jsonl)")
            self.echo(f"round {server_round}: robust merge, held-out accuracy of each upload on "
                      f"{robust.holdout_examples} server examples: {scores}")
            left_out = list(robust.left_out)
            if len(left_out) > report.MAX_FAILURE_ROWS:
                self.echo(f"round {server_round}: robust merge left out {len(left_out)} uploads, more than "
                          f"{100 * robust.margin:.0f} points below the median {report.percent(robust.median)}; the "
                          f"first {report.MAX_FAILURE_ROWS} below, all in rounds.jsonl")
                left_out = left_out[:report.MAX_FAILURE_ROWS]
            for key in left_out:
                self.echo(f"round {server_round}: robust merge left out client {labels[key]}: held-out accuracy "
                          f"{report.percent(robust.scores[key])}, more than {100 * robust.margin:.0f} points "
                          f"below the median {report.percent(robust.median)}")
        merged = outcome.merge
        if merged.fallback_reason:
            self.echo(f"round {server_round}: merge fell back to concatenation: {merged.fallback_reason}")
        if merged.dropped_sentences:
            self.echo(f"round {server_round}: merge left out {len(merged.dropped_sentences)} sentence(s) to stay "
                      f"within merge-token-budget={merged.token_budget} (listed in rounds.jsonl)")
        measured: dict[str, dict[str, Any] | None] = {}  # clients often upload the same text: measure it once

        def metrics_of(prompt: str) -> dict[str, Any] | None:
            if prompt not in measured:
                measured[prompt] = self.prompt_metrics(prompt, with_surprisal=False)
            found = measured[prompt]
            return dict(found) if found is not None else None

        uploads = tuple(
            ClientUpload(label=u.label, client=u.client, reply=u.reply,
                         prompt_metrics=metrics_of(u.reply.prompt),
                         holdout_accuracy=outcome.robust.scores[u.client.key] if outcome.robust else None,
                         left_out=outcome.left_out(u))
            for u in outcome.accepted)
        self.folder.save_client_prompts(server_round, [
            {"label": u.label, "node_id": u.client.node_id, "partition_id": u.client.partition_id,
             "left_out": u.left_out, "prompt": u.reply.prompt} for u in uploads])
        self.folder.save_prompt(f"round-{server_round:03d}-merged", outcome.merged_prompt)
        self.client_llms.update({u.label: u.reply.llm for u in uploads})
        self.client_simulated.update({u.label: u.reply.simulated for u in uploads})
        return uploads

    def round_done(self, record: RoundRecord, state: FederationState) -> None:
        self._failure_rows(record.round, [(f.label, f"(evaluation) {f.reason}") for f in record.failures
                                          if f.stage == "evaluate"])
        self.remember_llms(record.evaluations)
        self.echo(report.merged_row(record.round, record.merge.method, record.val_accuracy, record.val_examples,
                                    state.best_accuracy, record.merged_prompt, record.seconds)
                  + report.merged_note(record, self.settings.best_rule))
        self.folder.append_round(record)
        self.history.append(record)
        self.write_summary(state, finished=False)
        state.save(self.path)
        if record.round >= self.settings.num_rounds or time.monotonic() - self._drawn_at >= REDRAW_EVERY_SECONDS:
            self._draw_figures(state)
        else:
            self._figures_stale = True
        self.tracker.log_round(record)

    def finished(self, state: FederationState, tests: Mapping[str, FinalScore]) -> RunSummary:
        """The test accuracies of the best, last and start prompts (those the run tested), over the
        clients that answered; the others are listed as failures."""
        self.folder.save_prompt("best", state.best_prompt)
        failures = tuple(dict.fromkeys(f for result in tests.values() for f in result.failures))
        self._failure_rows(state.finished_round, [(f.label, f"(test) {f.reason}") for f in failures])
        self.test_failures = failures
        self.tests = dict(tests)
        summary = self.write_summary(state, finished=True)
        self._figures_done()
        sim = " (simulated LLM)" if self.simulated else ""
        shown = "; ".join(f"{name} prompt {summary.test_intervals[name].shown()}" for name in tests)
        self.echo(f"best prompt (round {state.best_round}): validation {report.percent(state.best_accuracy)}; "
                  f"test: {shown}{sim}")
        for name, comparison in summary.comparisons.items():
            self.echo(f"test, {name}: {comparison.shown()}{sim}")
        self.echo(f"results: {self.path}")
        self.write_report(summary)
        self.tracker.finish(summary, self.path)
        return summary

    def stopped(self, state: FederationState, error: BaseException) -> None:
        """Keep what was done and say why the run stopped, before the error propagates."""
        self.error = f"{type(error).__name__}: {error}"
        self.folder.save_prompt("best", state.best_prompt)
        self.write_summary(state, finished=False)
        if self._figures_stale:
            self._draw_figures(state)
        self._figures_done()
        self.echo(f"fedtextgrad: the run stopped: {error}")
        self.echo(f"results so far: {self.path}")
        self.write_report()
        self.tracker.fail(self.error, self.path)

    def write_report(self, summary: RunSummary | None = None) -> None:
        """report.html beside summary.json (html_report.py; ``summary``: as written); never fails the run."""
        try:
            path = html_report.write(self.path, summary or self.folder.read_summary(), self.history)
        except Exception as exc:
            log.warning("could not write %s: %s: %s", html_report.REPORT_FILE, type(exc).__name__, exc)
            return
        self.echo(f"report: {path}")

    def _failure_rows(self, server_round: int, failures: Sequence[tuple[str, str]]) -> None:
        for row in report.failure_rows(server_round, failures):
            self.echo(row)

    # --- the summary --------------------------------------------------------------------------------
    def write_summary(self, state: FederationState, finished: bool) -> RunSummary:
        s, tests = self.settings, self.tests
        test_usage = Usage()
        for result in {id(r): r for r in tests.values()}.values():  # a prompt tested once counts once
            test_usage.add(result.usage)
        best = tests.get("best")
        summary = RunSummary(
            finished=finished, error=self.error, rounds=len(self.history), rounds_planned=s.num_rounds,
            task=tuple(s.tasks), partitioning=s.partitioning, merge=s.merge, initial_prompt=s.start_prompt,
            initial_val_accuracy=state.initial_accuracy, best_val_accuracy=state.best_accuracy,
            best_round=state.best_round, best_prompt=state.best_prompt, final_prompt=state.global_prompt,
            results_dir=str(self.path), initial_prompt_metrics=self.initial_metrics,
            test_accuracy=best.accuracy if best else None,
            last_test_accuracy=tests["last"].accuracy if "last" in tests else None,
            initial_test_accuracy=tests["initial"].accuracy if "initial" in tests else None,
            test_examples=best.examples if best else 0, test_failures=self.test_failures,
            resumed_after_rounds=tuple(state.resumed_after), cost=self._cost(state, test_usage),
            client_llms=dict(sorted(self.client_llms.items())), server_llm=s.server_llm, simulated=self.simulated,
            seconds=self.seconds_before + (time.monotonic() - self.opened), best_rule=s.best_rule,
            initial_val_interval=self.initial_interval, initial_val_repeats=self.initial_repeats,
            initial_val_changed=self.initial_changed, best_val_interval=self._best_interval(state),
            test_intervals={name: interval_of(result.evaluations) for name, result in tests.items()},
            test_by_task={name: by_task(result.evaluations) for name, result in tests.items()
                          if len(s.tasks) > 1},
            comparisons={f"{name} vs initial": paired(outcomes_of(tests[name].evaluations),
                                                      outcomes_of(tests["initial"].evaluations))
                         for name in ("best", "last") if name in tests and "initial" in tests},
            test_outcomes={name: outcomes_of(result.evaluations) for name, result in tests.items()},
        )
        self.folder.write_summary(summary)
        return summary

    def _best_interval(self, state: FederationState) -> Interval | None:
        """The best prompt's validation accuracy with its interval (the round it was chosen in)."""
        if state.best_round == 0:
            return self.initial_interval
        chosen = [r.val_interval for r in self.history if r.round == state.best_round]
        return chosen[0] if chosen else None

    def _cost(self, state: FederationState, test_usage: Usage | None) -> dict[str, dict[str, int]]:
        """LLM calls and tokens of the finished rounds, by where they were spent."""
        cost = {part: {"llm_calls": 0, "tokens": 0}
                for part in ("client_training", "client_evaluation", "server_merge", "total")}

        def add(part: str, calls: int, tokens: int) -> None:
            for key in (part, "total"):
                cost[key]["llm_calls"] += calls
                cost[key]["tokens"] += tokens

        def add_usage(part: str, usage: Usage | None) -> None:
            if usage is not None:
                add(part, usage.calls, usage.prompt_tokens + usage.completion_tokens)

        add_usage("client_evaluation", state.initial_usage)
        for record in self.history:
            for upload in record.uploads:
                local = upload.reply.local
                add("client_training", local.llm_calls, local.prompt_tokens + local.completion_tokens)
                add_usage("client_evaluation", upload.reply.val_usage)
            for evaluation in record.evaluations:
                add_usage("client_evaluation", evaluation.reply.usage)
            add_usage("server_merge", record.server_llm)
        add_usage("client_evaluation", test_usage)
        return cost

    # --- measurements and figures ---------------------------------------------------------------------
    def prompt_metrics(self, prompt: str, with_surprisal: bool) -> dict[str, Any] | None:
        """Information-density metrics of a prompt (prompt_metrics.py); never fails the run."""
        try:
            return analyze(prompt, self.surprisal if with_surprisal else None).as_dict()
        except Exception as exc:
            log.warning("could not measure a prompt: %s: %s", type(exc).__name__, exc)
            return None

    def remember_llms(self, evaluations: Sequence[ClientEvaluation]) -> None:
        self.client_llms.update({e.label: e.reply.llm for e in evaluations})
        self.client_simulated.update({e.label: e.reply.simulated for e in evaluations})

    @property
    def simulated(self) -> bool:
        """Whether any number of this run comes from the simulated LLM: the server's own LLM as set,
        the clients' as they reported them (before any reply, as the run config says)."""
        s = self.settings
        if not self.client_simulated:
            return s.simulated
        return any(self.client_simulated.values()) or (s.server_llm_used and s.server.backend == "sim")

    def _draw_figures(self, state: FederationState) -> None:
        """Draw the figures in the background, while the next round waits on its clients: drawing takes
        about a second of CPU on a small machine, which on the server's critical path would be the
        largest cost it adds to a round. After a round they are redrawn only when REDRAW_EVERY_SECONDS
        have passed (and always after the last round, or when the run stops): a simulated round lasts
        seconds, and drawing holds Python's lock that clients served in the same process need."""
        self._figures_done()
        self._drawn_at, self._figures_stale = time.monotonic(), False
        if not figures.available():  # one line, once; the run goes on without its figures
            if not self._figures_skipped:
                self._figures_skipped = True
                self.echo(figures.SKIPPED)
            return
        rounds, initial = list(self.history), state.initial_accuracy
        self._drawing = threading.Thread(target=self._draw, args=(rounds, initial), name="figures", daemon=True)
        self._drawing.start()

    def _figures_done(self) -> None:
        """Wait for the figures being drawn; at the end of a run, they are complete then."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None

    def _draw(self, rounds: list[RoundRecord], initial_accuracy: float | None) -> None:
        title, sim = self.path.name, self.simulated
        try:
            figures.plot_accuracy(rounds, self.path / "accuracy.png", initial_accuracy, title, sim,
                                  self.initial_interval)
        except Exception as exc:  # a figure must never cost the run its results
            log.warning("could not draw accuracy.png: %s", exc)
        try:
            figures.plot_prompt_dynamics(rounds, self.path / "prompt_metrics.png", initial_accuracy,
                                         self.initial_metrics, self.settings.start_prompt, title, sim)
        except Exception as exc:
            log.warning("could not draw prompt_metrics.png: %s", exc)
