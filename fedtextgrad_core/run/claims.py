"""A client's reply is a claim: its numbers are checked against what the server knows before they count.

A client's scores, counts and costs decide the federated accuracy, the best prompt and the cost a run
reports, and the server cannot see the data behind them. What it can do is refuse what cannot be true:
more examples than a split of that task can hold, more correct answers than examples, negative or
non-finite numbers, more steps than were asked, more LLM calls than the work allows. A reply that breaks
a rule fails that client for that request with one line; it never reaches an average. Within the
bounds a client can still lie (docs: security model), so every weight is at most the bound too.

Text a client sends to be shown (its error line, its model's name, its code fingerprint) reaches the
operator's terminal and files: it is cut to a bounded length and stripped of control, escape and
invisible format characters first.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, replace

from fedtextgrad_core.data.loaders import largest_split
from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run.messages import EvalReply, TrainReply
from fedtextgrad_core.run.settings import RunSettings

# Per local step, the most LLM calls the method makes (with room to spare): the batch answered, two
# feedback calls per example (on the answer, then on the prompt), a rewrite, the batch answered again
# under it, and a judge's verdict on both answers of every example (loss = judge).
CALLS_PER_EXAMPLE_AND_STEP = 6
CALLS_PER_STEP = 4
MAX_RETRIES_PER_CALL = 100  # the schema's bound on llm-max-retries
MAX_TOKENS_PER_CALL = 1_000_000  # the schema's bound on llm-max-tokens, as a bound on a whole call
MAX_SECONDS = 30 * 86_400.0  # a month: longer is not a real duration of one request
MAX_PARTITION = 1_000_000
SHOWN_CHARS = {"error": 500, "llm": 200, "code": 64}

_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def shown(text: object, limit: int) -> str:
    """``text`` as one safe line: ANSI escape sequences removed, control, format (invisible) and
    surrogate characters dropped or made spaces, whitespace folded, and at most ``limit`` characters."""
    line = _ESCAPE.sub("", str(text))
    kept = []
    for char in line:
        category = unicodedata.category(char)
        if category in ("Cc", "Zl", "Zp"):
            kept.append(" ")
        elif category not in ("Cf", "Cs", "Co", "Cn"):
            kept.append(char)
    folded = " ".join("".join(kept).split())
    if len(folded) > limit:
        return f"{folded[:limit]}... ({len(folded)} characters)"
    return folded


@dataclass(frozen=True)
class Bounds:
    """What the server knows of every client's data and work, from the run's own settings."""

    train: int  # the most training examples a client can hold
    val: int  # ... validation examples it can score
    test: int
    steps: int  # local steps asked per round
    batch: int

    @classmethod
    def of(cls, settings: RunSettings) -> Bounds:
        def most(split: str, limit: int) -> int:
            size = max(largest_split(task, split, settings.synthetic_size, settings.gsm8k_split)
                       for task in settings.tasks)
            return min(size, limit) if limit else size

        return cls(train=most("train", 0), val=most("val", settings.max_val_examples),
                   test=most("test", settings.max_test_examples), steps=settings.local_steps,
                   batch=settings.batch_size)

    def split(self, name: str) -> int:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _count(name: str, value: float, most: float) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} is {value}, not a finite number"
    if value < 0:
        return f"{name} is {value:g}, below 0"
    if value > most:
        return f"{name} is {value:g}, more than the {most:g} the server allows"
    return None


def _first(*problems: str | None) -> str | None:
    return next((problem for problem in problems if problem), None)


_EXAMPLE_ID = re.compile(r"[A-Za-z0-9_.:/-]{1,100}")


def _outcomes_problem(scores: Scores, where: str) -> str | None:
    """Per-example outcomes that do not add up to the counts (or name no example properly), or None."""
    given = (scores.example_ids, scores.example_correct, scores.example_malformed)
    if not any(given):
        return None  # a client that sends none: no paired comparison with it
    if any(len(each) != scores.total for each in given):
        return f"{where} per-example outcomes are not one per example ({len(scores.example_ids)} for {scores.total})"
    if sum(scores.example_correct) != scores.correct or sum(scores.example_malformed) != scores.malformed:
        return f"{where} per-example outcomes do not add up to its counts"
    if len(set(scores.example_ids)) != len(scores.example_ids):
        return f"{where} names an example twice"
    if not all(_EXAMPLE_ID.fullmatch(each) for each in scores.example_ids):
        return f"{where} names an example with an id that is not one (letters, digits and _.:/- only)"
    return None


def scores_problem(scores: Scores, most: int, where: str) -> str | None:
    """Why ``scores`` cannot be true of a split of at most ``most`` examples, or None."""
    return _first(
        _count(f"{where} total", scores.total, most),
        _count(f"{where} correct", scores.correct, scores.total),
        _count(f"{where} malformed", scores.malformed, scores.total),
        _count(f"{where} parser disagreements", scores.parser_disagreements, scores.total),
        _count(f"{where} seconds", scores.seconds, MAX_SECONDS),
        _outcomes_problem(scores, where),
    )


def usage_problem(usage: Usage, calls: int, where: str) -> str | None:
    """Why ``usage`` cannot be what at most ``calls`` LLM calls cost, or None."""
    return _first(
        _count(f"{where} LLM calls", usage.calls, calls),
        _count(f"{where} cache hits", usage.cache_hits, calls),
        _count(f"{where} retries", usage.retries, calls * MAX_RETRIES_PER_CALL),
        _count(f"{where} errors", usage.errors, calls * (MAX_RETRIES_PER_CALL + 1)),
        _count(f"{where} prompt tokens", usage.prompt_tokens, calls * MAX_TOKENS_PER_CALL),
        _count(f"{where} completion tokens", usage.completion_tokens, calls * MAX_TOKENS_PER_CALL),
        _count(f"{where} seconds", usage.seconds, MAX_SECONDS),
    )


def _local_problem(local: LocalMetrics, bounds: Bounds) -> str | None:
    asked = bounds.steps
    calls = asked * (CALLS_PER_STEP + CALLS_PER_EXAMPLE_AND_STEP * bounds.batch)
    answers = asked * bounds.batch * 2  # each step answers its batch, and again under the rewrite
    return _first(
        None if local.steps == asked else f"local steps is {local.steps}, but {asked} were asked",
        _count("steps kept and reverted", local.steps_accepted + local.steps_reverted, asked),
        _count("steps kept", local.steps_accepted, asked),
        _count("steps reverted", local.steps_reverted, asked),
        _count("rewrites", local.rewrites, asked),
        _count("well-formed rewrites", local.rewrites_well_formed, local.rewrites),
        _count("malformed rewrites", local.malformed_updates, local.rewrites),
        _count("batch accuracy before", local.batch_accuracy_before, 1.0),
        _count("batch accuracy after", local.batch_accuracy_after, 1.0),
        _count("malformed answers", local.malformed_answers, answers),
        _count("unreadable judge verdicts", local.judge_unreadable, answers),
        usage_problem(Usage(calls=local.llm_calls, prompt_tokens=local.prompt_tokens,
                            completion_tokens=local.completion_tokens, retries=local.llm_retries,
                            errors=local.llm_errors, cache_hits=local.cache_hits, seconds=local.seconds),
                      calls, "training"),
    )


def train_problem(reply: TrainReply, bounds: Bounds, max_prompt_chars: int) -> str | None:
    """Why a training reply cannot be true, or None."""
    leaks = reply.leaks
    return _first(
        _count("partition id", reply.partition_id, MAX_PARTITION),
        _count("training examples", reply.num_examples, bounds.train),
        None if reply.num_examples >= bounds.batch or reply.num_examples == 0 else
        f"training examples is {reply.num_examples}, fewer than a batch of {bounds.batch} (the client would refuse)",
        _local_problem(reply.local, bounds),
        _count("leaked passages", leaks.passages, max_prompt_chars),
        _count("leaked n-grams", leaks.ngrams, max_prompt_chars),
        _count("redactions", leaks.redactions, leaks.passages),
        _count("longest leak", leaks.longest, max_prompt_chars),
        scores_problem(reply.val, bounds.val, "validation") if reply.val is not None else None,
        usage_problem(reply.val_usage, reply.val.total if reply.val is not None else 0, "validation")
        if reply.val_usage is not None else None,
    )


def eval_problem(reply: EvalReply, most: int) -> str | None:
    """Why an evaluation reply (of a split of at most ``most`` examples) cannot be true, or None."""
    return _first(
        _count("partition id", reply.partition_id, MAX_PARTITION),
        scores_problem(reply.scores, most, "evaluation"),
        usage_problem(reply.usage, reply.scores.total, "evaluation"),
    )


def cleaned(reply: TrainReply | EvalReply) -> TrainReply | EvalReply:
    """The reply with its text for people (model name, code fingerprint) made safe to show."""
    return replace(reply, llm=shown(reply.llm, SHOWN_CHARS["llm"]), code=shown(reply.code, SHOWN_CHARS["code"]))

