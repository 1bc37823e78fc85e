"""What a client does in a round: a few TextGrad steps on the system prompt.

Each step answers a batch (concurrently), scores it by exact match, backpropagates
textual feedback through TextGrad, asks the optimizer for a rewritten prompt and,
with the proximal rule, keeps the rewrite only if the same batch does not score
worse. Malformed model output never crashes a step: it is counted and the old
prompt is kept.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.method.evaluation import answer_all, score_replies
from fedtextgrad_core.llm.engine import ChatEngine, Usage
from fedtextgrad_core.data.tasks import Task
from fedtextgrad_core.llm.textgrad_adapter import tg

log = logging.getLogger(__name__)

PROMPT_ROLE = (
    "structured system prompt to a somewhat capable language model that specifies "
    "the behavior and strategies for the QA task"
)
CLOSING_TAG = "</IMPROVED_VARIABLE>"
SCORER_PURPOSE = "The runtime of a string-based function that checks if the prediction is correct."


@dataclass(frozen=True)
class LocalSettings:
    """How a client optimises in one round (defaults: run/schema.py)."""

    steps: int
    batch_size: int
    proximal: bool
    seed: int


@dataclass
class LocalMetrics:
    """What one client's local optimisation did and cost in one round."""

    steps: int = 0
    steps_accepted: int = 0
    steps_reverted: int = 0
    batch_accuracy_before: float = 0.0  # mean over steps, before the update
    batch_accuracy_after: float = 0.0  # mean over steps, with the prompt kept
    malformed_answers: int = 0
    malformed_updates: int = 0  # rewrites without usable <IMPROVED_VARIABLE> text
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_retries: int = 0
    llm_errors: int = 0
    cache_hits: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LocalResult:
    prompt: str
    metrics: LocalMetrics


def _forward(model, questions: Sequence[str], engine: ChatEngine) -> list:
    """Answer a batch through TextGrad's graph, several requests at once."""
    variables = [
        tg.Variable(q, requires_grad=False, role_description="query to the language model")
        for q in questions
    ]
    return engine.map(model, variables)


def _update(prompt: str, task: Task, examples: Sequence[Example], forward: ChatEngine,
            backward: ChatEngine, format_instruction: str, metrics: LocalMetrics) -> tuple[str, float]:
    """One TextGrad step; returns the candidate prompt and the batch accuracy before it."""
    variable = tg.Variable(prompt, requires_grad=True, role_description=PROMPT_ROLE)
    model = tg.BlackboxLLM(forward, variable)
    responses = _forward(model, [e.question for e in examples], forward)
    results = score_replies(task, [r.value for r in responses], examples)
    metrics.malformed_answers += sum(malformed for _, malformed in results)
    accuracy = sum(correct for correct, _ in results) / len(results)
    if accuracy == 1.0:
        return prompt, accuracy  # no mistakes, no gradient: skip the feedback calls

    def exact_match(prediction, ground_truth_answer) -> str:
        correct, _ = task.score(prediction.value, ground_truth_answer.value)
        return "1" if correct else "0"

    scorer = tg.autograd.StringBasedFunction(exact_match, function_purpose=SCORER_PURPOSE)
    losses = []
    for response, example in zip(responses, examples):
        target = tg.Variable(example.answer, requires_grad=False, role_description="correct answer for the query")
        losses.append(scorer(inputs={"prediction": response, "ground_truth_answer": target}))
    tg.sum(losses).backward(backward)
    optimizer = tg.TextualGradientDescent(
        parameters=[variable], engine=backward, constraints=[format_instruction]
    )
    try:
        optimizer.step()
        # TextGrad keeps everything after an opening tag whose closing tag never came (a reply
        # cut off at max tokens): such a half-prompt must not replace the prompt
        complete = CLOSING_TAG in backward.last_reply()
    except IndexError:
        complete = False
    if not complete:
        metrics.malformed_updates += 1
        log.info("optimizer reply had no complete <IMPROVED_VARIABLE> span; keeping the prompt")
        return prompt, accuracy
    candidate = variable.value.strip()
    if not candidate:
        metrics.malformed_updates += 1
        log.info("optimizer returned an empty prompt; keeping the prompt")
        return prompt, accuracy
    return candidate, accuracy


def batch_accuracy(engine: ChatEngine, task: Task, prompt: str, examples: Sequence[Example]) -> tuple[float, int]:
    """(accuracy, malformed replies) of ``prompt`` on a batch."""
    results = score_replies(task, answer_all(engine, prompt, [e.question for e in examples]), examples)
    return sum(c for c, _ in results) / len(results), sum(m for _, m in results)


def train_prompt(prompt: str, task: Task, train: Sequence[Example], forward: ChatEngine,
                 backward: ChatEngine, settings: LocalSettings, stream: str = "",
                 format_instruction: str | None = None) -> LocalResult:
    """Run ``settings.steps`` local steps from ``prompt`` on ``train``.

    ``format_instruction`` is the answer format the optimizer must keep (the task's own
    unless the prompt is shared by several tasks).

    ``stream`` makes batch sampling differ between clients and rounds while staying
    reproducible for a given seed.
    """
    if not train:
        raise ValueError("this client holds no training examples")
    start = time.perf_counter()
    rng = random.Random(f"{settings.seed}:{stream}")
    metrics = LocalMetrics()
    before_sum = after_sum = 0.0
    for _ in range(settings.steps):
        batch = rng.sample(list(train), min(settings.batch_size, len(train)))
        candidate, before = _update(prompt, task, batch, forward, backward,
                                    format_instruction or task.format_instruction, metrics)
        after = before
        if candidate != prompt:
            new_score, malformed = batch_accuracy(forward, task, candidate, batch)
            metrics.malformed_answers += malformed
            if settings.proximal and new_score < before:
                metrics.steps_reverted += 1
            else:
                prompt, after = candidate, new_score
                metrics.steps_accepted += 1
        metrics.steps += 1
        before_sum += before
        after_sum += after
    metrics.batch_accuracy_before = before_sum / metrics.steps
    metrics.batch_accuracy_after = after_sum / metrics.steps
    _add_usage(metrics, forward, backward)
    metrics.seconds = time.perf_counter() - start
    return LocalResult(prompt=prompt, metrics=metrics)


def _add_usage(metrics: LocalMetrics, *engines: ChatEngine) -> None:
    total = Usage()
    for engine in {id(e): e for e in engines}.values():  # forward and backward may be one engine
        total.add(engine.take_usage())
    metrics.llm_calls = total.calls
    metrics.prompt_tokens = total.prompt_tokens
    metrics.completion_tokens = total.completion_tokens
    metrics.llm_retries = total.retries
    metrics.llm_errors = total.errors
    metrics.cache_hits = total.cache_hits
