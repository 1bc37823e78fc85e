"""What a client does in a round: a few TextGrad steps on the system prompt.

Each step answers a batch (concurrently), scores it (exact match in code, or the reference's
LLM judge), backpropagates textual feedback through TextGrad (its backward functions and
prompts, the examples' branches side by side instead of one call after another:
``backpropagate``), asks the optimizer for a rewritten prompt and re-scores the same batch
with it. The keep-or-revert rule then decides:

- ``reference`` (the reference code with ``--proximal_update``, which all its scripts pass):
  keep the rewrite only if the batch scores strictly better, or perfectly;
- ``not-worse`` (the reference without the flag): keep it unless the batch scores worse;
- ``always``: keep every well-formed rewrite.

Batches are drawn as the reference's data loader draws them: the training examples are
shuffled and taken in consecutive batches, without replacement, reshuffled when used up.
Malformed model output never crashes a step: it is counted and the old prompt is kept.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.tasks import Task
from fedtextgrad_core.llm.engine import ChatEngine, Usage, constrained
from fedtextgrad_core.llm.textgrad_adapter import tg
from fedtextgrad_core.method.evaluation import answer_all, score_replies
from fedtextgrad_core.method.judge import Judge

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
    keep_rule: str  # reference | not-worse | always (see the module doc)
    seed: int
    constrained_updates: bool  # ask the server to constrain the optimizer's reply to a well-formed rewrite
    max_prompt_chars: int  # the longest rewrite asked for (the server refuses longer uploads)
    parser: str = "answer-line"  # how a reply's answer is read (data/tasks.py)
    # TextGrad's own backward pass, one feedback call after another instead of side by side
    # (the setting sequential-feedback): a server that gains nothing from requests in flight
    # does the sequence faster (docs/performance.md)
    sequential_feedback: bool = False


KEEP_RULES = ("reference", "not-worse", "always")


def keeps(rule: str, before: float, after: float) -> bool:
    """Whether the keep-or-revert rule keeps a rewrite that moved the batch score from ``before`` to ``after``."""
    if rule == "reference":
        return after > before or after == 1.0
    if rule == "not-worse":
        return after >= before
    return True


@dataclass
class LocalMetrics:
    """What one client's local optimisation did and cost in one round."""

    steps: int = 0
    steps_accepted: int = 0
    steps_reverted: int = 0
    batch_accuracy_before: float = 0.0  # mean over steps, before the update
    batch_accuracy_after: float = 0.0  # mean over steps, with the prompt kept
    malformed_answers: int = 0
    judge_unreadable: int = 0  # judge verdicts that could not be read (loss = judge; counted as wrong)
    rewrites: int = 0  # optimizer calls (a step whose batch scored 1.0 asks for none)
    rewrites_well_formed: int = 0  # rewrites with usable <IMPROVED_VARIABLE> text
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
class LocalStep:
    """One local step as the client saw it. Never sent: its feedback quotes the client's examples."""

    step: int  # from 1
    batch: int  # examples in the batch
    before: float  # the batch's accuracy with the prompt the step started from
    after: float | None  # the rewrite's accuracy on the same batch; None: no rewrite was scored
    decision: str  # one of STEP_DECISIONS
    feedback: tuple[str, ...] = ()  # TextGrad's feedback on the prompt, in batch order
    candidate: str = ""  # the rewrite scored ('' when none was)


STEP_DECISIONS = ("kept", "reverted", "no rewrite: the batch was all right", "malformed rewrite: prompt kept",
                  "rewrite unchanged")


@dataclass(frozen=True)
class LocalResult:
    prompt: str
    metrics: LocalMetrics
    steps: tuple[LocalStep, ...] = ()  # what each step did, for the client's own log


def _forward(model: Any, questions: Sequence[str], engine: ChatEngine) -> list[Any]:
    """Answer a batch through TextGrad's graph, several requests at once."""
    variables = [
        tg.Variable(q, requires_grad=False, role_description="query to the language model")
        for q in questions
    ]
    return engine.map(model, variables)


def _score(task: Task, replies: Sequence[str], examples: Sequence[Example], settings: LocalSettings,
           judge: Judge | None, metrics: LocalMetrics) -> list[bool]:
    """Which replies are right: exact match in code, or the judge's verdicts (loss = judge)."""
    results = score_replies(task, replies, examples, settings.parser)
    metrics.malformed_answers += sum(malformed for _, malformed in results)
    if judge is None:
        return [correct for correct, _ in results]
    before = judge.unreadable
    verdicts = judge.verdicts(examples, replies)
    metrics.judge_unreadable += judge.unreadable - before
    return verdicts


def backpropagate(loss: Any, engine: ChatEngine, sequential: bool = False) -> None:
    """TextGrad's backward pass from ``loss``: each node's own backward function, run once every
    node that uses it is done.

    TextGrad's ``Variable.backward`` (``sequential``) runs them one after another in reverse
    topological order, so a batch's feedback calls wait for each other although every example is
    a branch of its own: its loss (feedback on the reply), then its reply (feedback on the prompt
    from that). Here a node runs as soon as the nodes using it are done, the branches side by side
    up to the endpoint's ``llm-concurrency``; a worker follows a branch while it leads to one node
    only. The functions, their prompts and what they attach are TextGrad's own: only the waiting
    differs (tests/unit/method/test_concurrent_feedback.py compares both paths call by call).
    """
    if sequential:
        loss.backward(engine)
        return
    users: dict[Any, int] = {}  # node -> nodes using it not yet done (nodes needing no gradient left out)
    stack, seen = [loss], {loss}
    while stack:
        for node in stack.pop().predecessors:
            if node.requires_grad:
                users[node] = users.get(node, 0) + 1
                if node not in seen:
                    seen.add(node)
                    stack.append(node)
    lock = threading.Lock()

    def done(node: Any) -> list[Any]:
        """``node``'s step of TextGrad's loop (variable.py ``backward``); the nodes that became ready."""
        if node.requires_grad:
            node.gradients = tg.variable._check_and_reduce_gradients(node, engine)
            if node.get_grad_fn() is not None:
                node.grad_fn(backward_engine=engine)
        with lock:
            ready = [p for p in node.predecessors if p in users and _use(users, p)]
        return ready

    def branch(node: Any) -> list[Any]:
        ready = done(node)
        while len(ready) == 1:
            ready = done(ready[0])
        return ready

    loss.gradients = set()  # as TextGrad starts
    engine.cascade(branch, [loss])


def _use(users: dict[Any, int], node: Any) -> bool:
    """One user of ``node`` is done; True when it was the last."""
    users[node] -= 1
    return users[node] == 0


class _InOrder(set[Any]):
    """A set that iterates in a given order: the optimizer reads a variable's feedback by iterating
    the set TextGrad keeps it in."""

    def __init__(self, ordered: Sequence[Any]):
        super().__init__(ordered)
        self._order = list(dict.fromkeys(ordered))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._order)

    def add(self, item: Any) -> None:
        if item not in self:
            self._order.append(item)
        super().add(item)


def _feedback_in_batch_order(variable: Any, questions: Sequence[str], responses: Sequence[Any]) -> None:
    """List the prompt's feedback for the optimizer in the batch's order, whichever path made it.

    TextGrad keeps a variable's feedback in a set of objects hashed by identity, so its optimizer
    prompt listed a batch's feedback in memory-address order: different from step to step and
    from run to run, so even a replayed run (temperature 0, the reply cache) could send the
    optimizer another prompt. Each feedback's context is TextGrad's record of the conversation
    it is about, which names its example; the same question answered the same way twice is
    ordered by feedback text.
    """
    template = tg.autograd.llm_backward_prompts.CONVERSATION_TEMPLATE
    rank: dict[str, int] = {}
    for index, (question, response) in enumerate(zip(questions, responses)):
        conversation = template.format(system_prompt=variable.value, prompt=question, response_value=response.value)
        rank.setdefault(conversation, index)

    def position(feedback: Any) -> tuple[int, str]:
        context = variable.gradients_context.get(feedback)
        about = context.get("context") if isinstance(context, dict) else None
        return rank.get(about, len(rank)) if isinstance(about, str) else len(rank), str(feedback.value)

    variable.gradients = _InOrder(sorted(variable.gradients, key=position))


def _update(prompt: str, task: Task, examples: Sequence[Example], forward: ChatEngine,
            backward: ChatEngine, format_instruction: str, metrics: LocalMetrics,
            settings: LocalSettings, judge: Judge | None, feedback: list[str] | None = None) -> tuple[str, float]:
    """One TextGrad step; returns the candidate prompt and the batch accuracy before it (``feedback``
    receives the feedback texts on the prompt)."""
    variable = tg.Variable(prompt, requires_grad=True, role_description=PROMPT_ROLE)
    model = tg.BlackboxLLM(forward, variable)
    responses = _forward(model, [e.question for e in examples], forward)
    verdicts = _score(task, [r.value for r in responses], examples, settings, judge, metrics)
    accuracy = sum(verdicts) / len(verdicts)
    if accuracy == 1.0:
        return prompt, accuracy  # no mistakes, no gradient: skip the feedback calls

    # the loss of each example is its verdict, as a string-based function TextGrad can differentiate
    # through; with the judge, the verdict is the judge's, as in the reference
    verdict_of = {id(response): verdict for response, verdict in zip(responses, verdicts)}

    def correctness(prediction: Any, ground_truth_answer: Any) -> str:
        return "1" if verdict_of.get(id(prediction)) else "0"

    scorer = tg.autograd.StringBasedFunction(correctness, function_purpose=SCORER_PURPOSE)
    losses = []
    for response, example in zip(responses, examples):
        target = tg.Variable(example.answer, requires_grad=False, role_description="correct answer for the query")
        losses.append(scorer(inputs={"prediction": response, "ground_truth_answer": target}))
    backpropagate(tg.sum(losses), backward, sequential=settings.sequential_feedback)
    _feedback_in_batch_order(variable, [e.question for e in examples], responses)
    if feedback is not None:
        feedback.extend(str(gradient.value) for gradient in variable.gradients)
    # the optimizer's reply is asked, where the server supports it, to be exactly a tagged rewrite
    rewriter = constrained(backward, prompt, settings.max_prompt_chars) if settings.constrained_updates else backward
    optimizer = tg.TextualGradientDescent(
        parameters=[variable], engine=rewriter, constraints=[format_instruction]
    )
    metrics.rewrites += 1
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
    metrics.rewrites_well_formed += 1
    return candidate, accuracy


def batches(train: Sequence[Example], size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Consecutive batches of a shuffled training set, reshuffled when it is used up (an epoch), as
    the reference's data loader: no example repeats before every example was seen."""
    order = list(train)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield order[start:start + size]


def train_prompt(prompt: str, task: Task, train: Sequence[Example], forward: ChatEngine,
                 backward: ChatEngine, settings: LocalSettings, stream: str = "",
                 format_instruction: str | None = None, judge: Judge | None = None) -> LocalResult:
    """Run ``settings.steps`` local steps from ``prompt`` on ``train``.

    ``format_instruction`` is the answer format the optimizer must keep (the task's own
    unless the prompt is shared by several tasks). ``judge`` scores the batches instead of
    exact match (loss = judge).

    ``stream`` makes batch sampling differ between clients and rounds while staying
    reproducible for a given seed.
    """
    if not train:
        raise ValueError("this client holds no training examples")
    start = time.perf_counter()
    drawn = batches(train, settings.batch_size, random.Random(f"{settings.seed}:{stream}"))
    metrics = LocalMetrics()
    before_sum = after_sum = 0.0
    steps: list[LocalStep] = []
    for _ in range(settings.steps):
        batch = next(drawn)
        feedback: list[str] = []
        rewrites, malformed = metrics.rewrites, metrics.malformed_updates
        candidate, before = _update(prompt, task, batch, forward, backward,
                                    format_instruction or task.format_instruction, metrics, settings, judge, feedback)
        after = before
        scored: float | None = None
        decision = STEP_DECISIONS[2] if metrics.rewrites == rewrites else \
            STEP_DECISIONS[3] if metrics.malformed_updates > malformed else STEP_DECISIONS[4]
        if candidate != prompt:
            replies = answer_all(forward, candidate, [e.question for e in batch])
            verdicts = _score(task, replies, batch, settings, judge, metrics)
            new_score = scored = sum(verdicts) / len(verdicts)
            if keeps(settings.keep_rule, before, new_score):
                prompt, after = candidate, new_score
                metrics.steps_accepted += 1
                decision = STEP_DECISIONS[0]
            else:
                metrics.steps_reverted += 1
                decision = STEP_DECISIONS[1]
        metrics.steps += 1
        steps.append(LocalStep(step=metrics.steps, batch=len(batch), before=before, after=scored, decision=decision,
                               feedback=tuple(feedback), candidate=candidate if scored is not None else ""))
        before_sum += before
        after_sum += after
    metrics.batch_accuracy_before = before_sum / metrics.steps
    metrics.batch_accuracy_after = after_sum / metrics.steps
    _add_usage(metrics, forward, backward, *([judge.engine] if judge else []))
    metrics.seconds = time.perf_counter() - start
    return LocalResult(prompt=prompt, metrics=metrics, steps=tuple(steps))


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
