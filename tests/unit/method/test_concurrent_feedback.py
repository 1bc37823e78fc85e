"""The batch's feedback calls overlap, and nothing about the method changes for it.

``backpropagate`` runs TextGrad's own backward functions, each example's branch beside the
others (local_training.py); ``sequential_feedback=True`` keeps TextGrad's ``Variable.backward``,
one call after another. The equivalence tests run the sequential path first, recording every
request and reply, then the concurrent path against that recording only: a request it never
saw (any prompt text changed, the feedback listed in another order) fails the call. Feedback
replies carry a digest of the request they answer, so every feedback text is distinct and its
place in the optimizer's prompt shows.

The replies come from the simulated LLM: these tests prove machinery, not anything about models.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections import Counter
from collections.abc import Callable

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import ChatEngine, ChatFn
from fedtextgrad_core.llm.textgrad_adapter import tg
from fedtextgrad_core.method.judge import Judge
from fedtextgrad_core.method.local_training import batches, train_prompt
from fedtextgrad_core.run.settings import RunSettings, client_settings
from fedtextgrad_core.sim import SimLLM, approx_tokens
from tests.support.concurrency_probe import InFlightProbe
from tests.support.settings_helpers import endpoint, local

BACKWARD_SYSTEM = tg.autograd.llm_backward_prompts.BACKWARD_SYSTEM_PROMPT
OPTIMIZER_MARK = "improves text (i.e., variable)"  # TextGrad's optimizer system prompt
ON_THE_REPLY = "using a string-based function"  # feedback on a reply, from its loss (first of a branch)
ON_THE_PROMPT = "Here is a conversation with a language model"  # feedback on the prompt, from a reply
Request = tuple[str, str]  # (system, user)


def kind(request: Request) -> str:
    system, _ = request
    return "feedback" if system == BACKWARD_SYSTEM else "rewrite" if OPTIMIZER_MARK in system else "answer"


class Recorder:
    """A chat function: the sim, every feedback reply tagged with a digest of its request; every
    request and reply remembered. With ``replay``, it answers only requests recorded there (with
    the recorded reply) and fails any other call."""

    def __init__(self, replay: Recorder | None = None):
        self.sim = SimLLM()
        self.replay = dict(replay.calls) if replay is not None else None
        self.calls: list[tuple[Request, str]] = []
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        request = (messages[0]["content"], messages[1]["content"])
        if self.replay is not None:
            if request not in self.replay:
                raise AssertionError(f"a {kind(request)} request the sequential path never made:\n{request[1][:2000]}")
            reply = self.replay[request]
        else:
            reply = self.sim.complete(messages)
            if kind(request) == "feedback":
                reply += f" [{hashlib.sha256(request[1].encode()).hexdigest()[:10]}]"
        with self._lock:
            self.calls.append((request, reply))
        return reply, approx_tokens(request[0] + request[1]), approx_tokens(reply)

    def of(self, wanted: str) -> list[tuple[Request, str]]:
        return [call for call in self.calls if kind(call[0]) == wanted]

    def prompts_used(self) -> list[str]:
        """The system prompts the batches were answered under, in order (a change each time another
        prompt is scored): the start prompt, each candidate, and what each step kept."""
        seen: list[str] = []
        for (system, _), _reply in self.of("answer"):
            if not seen or seen[-1] != system:
                seen.append(system)
        return seen


def run(config: dict, chat: Recorder, sequential: bool, judge_chat: Recorder | None = None):
    task = get_task(config["task"])
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    engine = ChatEngine(endpoint(), chat)
    judge = Judge(ChatEngine(endpoint(), judge_chat)) if judge_chat is not None else None
    settings = local(steps=config["steps"], batch_size=config["batch"], keep_rule=config["rule"],
                     seed=config["seed"], sequential_feedback=sequential)
    return train_prompt(task.start_prompt, task, train, engine, engine, settings, stream="s", judge=judge)


def drawn_batches(config: dict) -> list[list[Example]]:
    """The batches train_prompt draws for ``config`` (same seed, same stream)."""
    task = get_task(config["task"])
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    drawn = batches(train, config["batch"], random.Random(f"{config['seed']}:s"))
    return [next(drawn) for _ in range(config["steps"])]


def listed_questions(optimizer_request: str) -> list[str]:
    """The questions of the conversations the optimizer's prompt lists feedback on, in its order."""
    return [q.strip() for q in re.findall(r"<LM_INPUT>(.*?)</LM_INPUT>", optimizer_request, re.DOTALL)]


# (task, batch, steps, keep rule, seed) found to cover: a batch of 1, perfect batches (no
# feedback asked), kept and reverted rewrites, and each keep rule
CONFIGS = {
    "batch1-perfect-batches": dict(task="object_counting", batch=1, steps=4, rule="reference", seed=0,
                                   covers={"kept", "perfect"}),
    "batch3-kept-reverted-perfect": dict(task="object_counting", batch=3, steps=4, rule="reference", seed=4,
                                         covers={"kept", "reverted", "perfect"}),
    "batch4-not-worse": dict(task="multistep_arithmetic_two", batch=4, steps=3, rule="not-worse", seed=0,
                             covers={"kept"}),
    "batch2-always": dict(task="word_sorting", batch=2, steps=4, rule="always", seed=0,
                          covers={"kept", "perfect"}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_concurrent_path_makes_the_same_calls_and_decisions_as_textgrads(name: str) -> None:
    config = CONFIGS[name]
    recorded = Recorder()
    sequential = run(config, recorded, sequential=True)
    replayed = Recorder(replay=recorded)
    concurrent = run(config, replayed, sequential=False)

    # every request made as often, with the same reply: feedback texts, optimizer prompts, rewrites
    assert Counter(replayed.calls) == Counter(recorded.calls)
    assert sorted(replayed.of("feedback")) == sorted(recorded.of("feedback"))
    assert replayed.of("rewrite") == recorded.of("rewrite")  # one per step, in step order
    # the same prompts scored in the same order: the same keep/revert decision at every step
    assert replayed.prompts_used() == recorded.prompts_used()
    assert concurrent.prompt == sequential.prompt
    a, b = sequential.metrics.as_dict(), concurrent.metrics.as_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b

    m = sequential.metrics
    covered = {"kept"} if m.steps_accepted else set()
    covered |= {"reverted"} if m.steps_reverted else set()
    covered |= {"perfect"} if m.rewrites < m.steps else set()
    assert config["covers"] <= covered, f"{name} no longer covers {config['covers'] - covered}"
    # each example of a step with mistakes: feedback on its reply, then on the prompt
    assert len(recorded.of("feedback")) == 2 * sum(len(b) for b in _steps_with_rewrites(config, recorded))


def _steps_with_rewrites(config: dict, recorded: Recorder) -> list[list[Example]]:
    """The batches of the steps that asked the optimizer (found by the questions its prompt lists)."""
    found = []
    for (_, user), _reply in recorded.of("rewrite"):
        listed = set(listed_questions(user))
        found.append(next(b for b in drawn_batches(config) if {e.question.strip() for e in b} == listed))
    return found


class Stuck(Recorder):
    """The recorder, with an optimizer that always proposes the prompt it was given: every step
    makes the same kind of mistakes, so nearly every step asks for feedback and a rewrite."""

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        if OPTIMIZER_MARK in messages[0]["content"]:
            current = re.search(r"<VARIABLE> (.*?) </VARIABLE>", messages[1]["content"], re.DOTALL)
            assert current is not None
            reply = f"<IMPROVED_VARIABLE>{current.group(1)}</IMPROVED_VARIABLE>"
            with self._lock:
                self.calls.append(((messages[0]["content"], messages[1]["content"]), reply))
            return reply, 1, 1
        return super().__call__(messages)


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "concurrent"])
def test_the_optimizer_lists_the_feedback_in_batch_order(sequential: bool) -> None:
    """TextGrad keeps feedback in a set iterated in memory-address order; both paths list it in the
    order of the batch, so the optimizer's prompt is the same on every run (here: at every step)."""
    config = dict(task="object_counting", batch=5, steps=8, rule="always", seed=3)
    recorded = Stuck()
    run(config, recorded, sequential=sequential)
    steps = drawn_batches(config)
    optimizer_prompts = [user for (_, user), _reply in recorded.of("rewrite")]
    assert len(optimizer_prompts) >= 6
    for user in optimizer_prompts:
        listed = listed_questions(user)
        batch = next(b for b in steps if {e.question.strip() for e in b} == set(listed))
        assert listed == [e.question.strip() for e in batch]


def test_an_example_twice_in_a_batch() -> None:
    """Two identical conversations: their feedback is told apart by text, the same on both paths."""
    task = get_task("object_counting")
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    wrong = next(e for e in train if "Answer: " + e.answer not in SimLLM().complete(
        [{"role": "system", "content": task.start_prompt}, {"role": "user", "content": e.question}]))
    examples = [wrong, wrong, train[0]]

    def go(chat: Recorder, sequential: bool):
        engine = ChatEngine(endpoint(), chat)
        settings = local(steps=2, batch_size=3, keep_rule="reference", seed=0, sequential_feedback=sequential)
        return train_prompt(task.start_prompt, task, examples, engine, engine, settings, stream="s")

    recorded = Recorder()
    first = go(recorded, sequential=True)
    replayed = Recorder(replay=recorded)
    second = go(replayed, sequential=False)
    assert Counter(replayed.calls) == Counter(recorded.calls) and second.prompt == first.prompt
    assert first.metrics.rewrites >= 1


def test_with_the_judge_too() -> None:
    """loss = judge: the judge's verdicts feed the same graph; both paths agree call for call."""
    config = dict(task="object_counting", batch=3, steps=3, rule="reference", seed=2)
    recorded, judged = Recorder(), Recorder()
    sequential = run(config, recorded, sequential=True, judge_chat=judged)
    replayed = Recorder(replay=recorded)
    concurrent = run(config, replayed, sequential=False, judge_chat=Recorder(replay=judged))
    assert Counter(replayed.calls) == Counter(recorded.calls)
    assert concurrent.prompt == sequential.prompt and recorded.of("feedback")


def test_the_reply_cache_replays_the_sequential_path_for_the_concurrent_one(tmp_path) -> None:
    """At temperature 0 with the reply cache: the concurrent path finds every reply the sequential
    path stored, and sends nothing to the server."""
    config = CONFIGS["batch3-kept-reverted-perfect"]
    task = get_task(config["task"])
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    settings = endpoint(cache_path=str(tmp_path / "replies.sqlite"), temperature=0.0)
    recorded = Recorder()

    def offline(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        raise AssertionError(f"not in the cache: {messages[1]['content'][:300]}")

    results = []
    for sequential, chat in ((True, recorded), (False, offline)):
        engine = ChatEngine(settings, chat)
        local_settings = local(steps=config["steps"], batch_size=config["batch"], keep_rule=config["rule"],
                               seed=config["seed"], sequential_feedback=sequential)
        results.append(train_prompt(task.start_prompt, task, train, engine, engine, local_settings, stream="s"))
    first, second = results
    assert second.prompt == first.prompt
    assert second.metrics.cache_hits == first.metrics.llm_calls == len(recorded.calls) > 0
    assert second.metrics.llm_calls == 0
    assert (second.metrics.steps_accepted, second.metrics.steps_reverted) == (
        first.metrics.steps_accepted, first.metrics.steps_reverted)


# --- the calls really overlap ------------------------------------------------------------------


def held(probe: Callable[[list[dict[str, str]]], object], recorder: Recorder) -> ChatFn:
    """``recorder``, with every feedback call held by ``probe`` first."""
    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        if messages[0]["content"] == BACKWARD_SYSTEM:
            probe(messages)
        return recorder(messages)

    return chat


def train_with(chat: ChatFn, concurrency: int, sequential: bool):
    task = get_task("object_counting")
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    engine = ChatEngine(endpoint(concurrency=concurrency), chat)
    # batch 3, seed 1: its first step has mistakes (see CONFIGS)
    settings = local(steps=1, batch_size=3, keep_rule="reference", seed=1, sequential_feedback=sequential)
    return train_prompt(task.start_prompt, task, train, engine, engine, settings, stream="s")


def test_a_batchs_feedback_calls_are_in_flight_together() -> None:
    probe = InFlightProbe(target=3)
    result = train_with(held(probe, Recorder()), concurrency=4, sequential=False)
    assert result.metrics.rewrites == 1
    assert probe.peak == 3 and not probe.gave_up  # all three examples' feedback at once


def test_the_feedback_calls_keep_to_llm_concurrency() -> None:
    probe = InFlightProbe(target=3)
    train_with(held(probe, Recorder()), concurrency=2, sequential=False)
    assert probe.peak == 2 and probe.gave_up


@pytest.mark.parametrize("sequential, peak", [(False, 3), (True, 1)])
def test_the_sequential_feedback_setting_chooses_the_path(sequential: bool, peak: int) -> None:
    """The setting reaches the local steps, from a run config or from a site's node config over the
    run's: one feedback call at a time when it is true, the batch's three together when it is false."""
    run = RunSettings.from_config({"sequential-feedback": sequential, "local-steps": 1, "batch-size": 3,
                                   "keep-rule": "reference", "seed": 1})
    assert run.local.sequential_feedback is sequential
    site = client_settings({"sequential-feedback": not sequential},
                           {"partition-id": 0, "num-partitions": 2, "sequential-feedback": sequential})
    assert site.local.sequential_feedback is sequential
    probe = InFlightProbe(target=3)
    task = get_task("object_counting")
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=60).train
    engine = ChatEngine(endpoint(concurrency=4), held(probe, Recorder()))
    train_prompt(task.start_prompt, task, train, engine, engine, run.local, stream="s")
    assert probe.peak == peak


def test_textgrads_own_pass_makes_them_one_at_a_time() -> None:
    """The sequential path, for comparison: this probe sees one call at a time (so the tests above can fail)."""
    probe = InFlightProbe(target=2)
    train_with(held(probe, Recorder()), concurrency=4, sequential=True)
    assert probe.peak == 1 and probe.gave_up


def test_a_slow_example_does_not_hold_back_the_others_second_call() -> None:
    """Each branch goes on as soon as its own first call returns: while the first example's
    feedback on its reply is still out, another example's feedback on the prompt is asked.
    A pass in waves (every first call, then every second) would wait here until the timeout."""
    other_second_call = threading.Event()
    first_question: list[str] = []
    lock = threading.Lock()

    def hold(messages: list[dict[str, str]]) -> None:
        user = messages[1]["content"]
        if ON_THE_PROMPT in user:
            other_second_call.set()
            return
        with lock:
            slow = not first_question
            if slow:
                first_question.append(user)
        if slow:
            assert other_second_call.wait(timeout=10), "no second call went out while a first one was pending"

    recorder = Recorder()
    result = train_with(held(hold, recorder), concurrency=4, sequential=False)
    assert result.metrics.rewrites == 1 and other_second_call.is_set()
    calls = recorder.of("feedback")
    assert sum(ON_THE_REPLY in user for (_, user), _ in calls) == sum(ON_THE_PROMPT in user for (_, user), _ in calls) == 3
