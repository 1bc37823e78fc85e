"""Scoring prompts: counts against scripted replies, order, real concurrency; and a node's
evaluation (evaluate_split, and answer to an evaluate or test request) from plain dicts."""

from __future__ import annotations

import threading
import time

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.partitioning import client_data
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.evaluation import Scores, answer_all, evaluate_prompt
from fedtextgrad_core.run.client_round import NodeIdentity, answer, evaluate_split
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest
from fedtextgrad_core.run.settings import RunSettings
from tests.support.concurrency_probe import InFlightProbe
from tests.support.settings_helpers import endpoint

TASK = get_task("object_counting")


def scripted(replies: dict[str, str], concurrency: int = 8) -> ChatEngine:
    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        return replies[messages[-1]["content"]], 1, 1
    return ChatEngine(endpoint(concurrency=concurrency), chat)


def test_accuracy_and_malformed_counts() -> None:
    examples = [Example(f"q{i}", "6") for i in range(6)]
    replies = {
        "q0": "Counting...\nAnswer: 6",  # right
        "q1": "**Answer:** 6.0",  # right, with markdown and a decimal
        "q2": "Answer: 5",  # wrong
        "q3": "There are 6 things.",  # malformed: no answer line
        "q4": "",  # malformed: empty
        "q5": "Answer: 4\nAnswer: 6",  # right: the last answer counts
    }
    scores = evaluate_prompt(scripted(replies), TASK, "a prompt", examples)
    assert (scores.correct, scores.total, scores.malformed) == (3, 6, 2)
    assert scores.accuracy == 0.5
    assert scores.seconds >= 0


def test_no_examples_score_zero_without_calls() -> None:
    engine = scripted({})
    scores = evaluate_prompt(engine, TASK, "a prompt", [])
    assert (scores.correct, scores.total, scores.accuracy) == (0, 0, 0.0)
    assert engine.take_usage().calls == 0
    assert Scores(1, 4, 0, 0.0).accuracy == 0.25


def test_the_prompt_is_sent_as_the_system_message() -> None:
    seen: list[list[dict[str, str]]] = []

    def chat(messages):
        seen.append(messages)
        return "Answer: 1", 1, 1

    answer_all(ChatEngine(endpoint(), chat), "SYSTEM PROMPT", ["q"])
    assert seen == [[{"role": "system", "content": "SYSTEM PROMPT"}, {"role": "user", "content": "q"}]]


def test_results_are_in_question_order_when_replies_arrive_out_of_order() -> None:
    n = 8
    finished: list[int] = []
    lock = threading.Lock()

    def chat(messages):
        index = int(messages[-1]["content"][1:])
        time.sleep(0.01 * (n - index))  # the first question takes longest
        with lock:
            finished.append(index)
        return f"Answer: {index}", 1, 1

    engine = ChatEngine(endpoint(concurrency=n), chat)
    examples = [Example(f"q{i}", str(i)) for i in range(n)]
    replies = answer_all(engine, "p", [e.question for e in examples])
    assert replies == [f"Answer: {i}" for i in range(n)]
    assert finished != sorted(finished)  # they really did arrive out of order
    scores = evaluate_prompt(engine, TASK, "p", examples)
    assert scores.correct == n  # each reply was matched with its own target


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_calls_overlap_up_to_the_configured_concurrency(concurrency: int) -> None:
    probe = InFlightProbe(concurrency, reply="Answer: 1")
    engine = ChatEngine(endpoint(concurrency=concurrency), probe)
    examples = [Example(f"q{i}", "1") for i in range(4 * concurrency)]
    scores = evaluate_prompt(engine, TASK, "p", examples)
    assert scores.correct == len(examples)
    assert probe.peak == concurrency
    assert not probe.gave_up


# --- a node's evaluation from plain dicts ------------------------------------------------


RUN_CONFIG = {"task": "object_counting", "synthetic-size": 100, "seed": 0}


@pytest.mark.parametrize("phase, split", [(Phase.EVALUATE, "val"), (Phase.TEST, "test")])
def test_evaluate_split_scores_this_nodes_share(phase: Phase, split: str) -> None:
    node = {"partition-id": 0, "num-partitions": 3}
    reply = answer(RUN_CONFIG, node, RoundRequest(phase=phase.value, server_round=1, prompt=TASK.start_prompt))
    assert isinstance(reply, EvalReply)
    share = getattr(client_data("homogeneous", ["object_counting"], 0, 3, "synthetic", 0, 100), split)
    expected = evaluate_prompt(make_engine(endpoint()), TASK, TASK.start_prompt, share)
    scores = reply.scores
    assert scores.total == len(share) > 0
    assert scores.correct == expected.correct
    assert scores.accuracy == expected.accuracy
    assert scores.malformed == 0
    assert reply.usage.calls == len(share)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens > 0 and reply.partition_id == 0
    assert reply.llm == endpoint().describe()
    # evaluate_split itself, from checked settings, scores the same split
    direct = evaluate_split(RunSettings.from_config(RUN_CONFIG), NodeIdentity(0, 3), TASK.start_prompt, split)
    assert (direct.scores.correct, direct.scores.total) == (scores.correct, scores.total)
    assert EvalReply.decode(reply.encode()) == reply  # what crosses to the server is what was scored


def test_only_the_evaluate_and_test_phases_are_scored_and_never_on_training_data() -> None:
    # a request names a phase, not a split: evaluate scores validation data, test the test data,
    # and training never scores (it trains); a phase the client does not know is refused
    assert {phase: phase.data_split for phase in (Phase.EVALUATE, Phase.TEST)} == {
        Phase.EVALUATE: "val", Phase.TEST: "test"}
    node = {"partition-id": 0, "num-partitions": 2}
    for phase in ("val", "train-eval", "TRAIN", ""):
        with pytest.raises(MalformedRecord, match="phase"):
            answer(RUN_CONFIG, node, RoundRequest(phase=phase, server_round=1, prompt=TASK.start_prompt))
