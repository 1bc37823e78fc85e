"""The local TextGrad loop (train_prompt) and a client's round (client_round.local_round).

The sim backend is the real forward and feedback model throughout; scripted engines only
stand in for the optimizer where a test needs output the sim never produces (a rewrite
that drops the answer format, a reply without <IMPROVED_VARIABLE> tags, empty tags).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.partitioning import client_data
from fedtextgrad_core.data.tasks import PROMPT_OPENING, get_task
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.method.judge import Judge
from fedtextgrad_core.method.local_training import batches, keeps, train_prompt
from fedtextgrad_core.run.client_round import NodeIdentity, answer, local_round
from fedtextgrad_core.run.messages import Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import SimLLM, approx_tokens, full_prompt, has_answer_format, instructions_in
from tests.support.settings_helpers import endpoint, local

TASK = get_task("object_counting")
SPLITS = load_splits(TASK.name, "synthetic", seed=0, synthetic_size=100)
OPTIMIZER_MARK = "improves text (i.e., variable)"  # TextGrad's optimizer system prompt


@dataclass
class Counted:
    """A sim-backed engine plus our own record of what went through it."""

    engine: ChatEngine
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    questions: list[str] = field(default_factory=list)


def sim_engine(optimizer_reply: str | None = None) -> Counted:
    """The sim answering everything, except optimizer requests when ``optimizer_reply`` is set."""
    sim = SimLLM()
    lock = threading.Lock()
    counted: Counted

    def chat(messages: list[dict[str, str]]) -> tuple[str, int, int]:
        system = messages[0]["content"]
        scripted = optimizer_reply is not None and OPTIMIZER_MARK in system
        reply = optimizer_reply if scripted else sim.complete(messages)
        prompt_tokens = sum(approx_tokens(m["content"]) for m in messages)
        with lock:
            counted.calls += 1
            counted.prompt_tokens += prompt_tokens
            counted.completion_tokens += approx_tokens(reply)
            if OPTIMIZER_MARK not in system and "feedback" not in system:
                counted.questions.append(messages[-1]["content"])
        return reply, prompt_tokens, approx_tokens(reply)

    counted = Counted(ChatEngine(endpoint(), chat))
    return counted


def mixed_batch() -> list[Example]:
    """Two training examples: one the start prompt gets right, one it gets wrong (found, not assumed)."""
    engine = make_engine(endpoint())
    right = wrong = None
    for example in SPLITS.train:
        scores = evaluate_prompt(engine, TASK, TASK.start_prompt, [example])
        assert scores.malformed == 0
        accuracy = scores.accuracy
        if accuracy == 1.0 and right is None:
            right = example
        if accuracy == 0.0 and wrong is None:
            wrong = example
    assert right is not None and wrong is not None
    return [right, wrong]


def metrics_without_time(result) -> dict:
    data = result.metrics.as_dict()
    data.pop("seconds")
    return data


# --- the happy path -------------------------------------------------------------------------


def test_training_with_the_sim_improves_the_prompt() -> None:
    forward, backward = sim_engine(), sim_engine()
    result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                          local(steps=5, batch_size=3, keep_rule="reference", seed=0))
    m = result.metrics
    assert m.steps == 5
    assert m.steps_accepted >= 1
    assert m.batch_accuracy_after >= m.batch_accuracy_before
    assert m.malformed_updates == 0 and m.malformed_answers == 0 and m.llm_errors == 0
    assert instructions_in(TASK.start_prompt, TASK.name) == []
    assert instructions_in(result.prompt, TASK.name)  # learned at least one catalogue instruction
    assert result.prompt.endswith(TASK.format_instruction)
    # The learned prompt is better on held-out data, not just on the batches it saw.
    engine = make_engine(endpoint())
    before = evaluate_prompt(engine, TASK, TASK.start_prompt, SPLITS.val)
    after = evaluate_prompt(engine, TASK, result.prompt, SPLITS.val)
    assert after.accuracy > before.accuracy


def test_usage_is_what_the_engines_counted() -> None:
    forward, backward = sim_engine(), sim_engine()
    result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                          local(steps=3, batch_size=3))
    m = result.metrics
    assert forward.calls > 0 and backward.calls > 0
    assert m.llm_calls == forward.calls + backward.calls
    assert m.prompt_tokens == forward.prompt_tokens + backward.prompt_tokens
    assert m.completion_tokens == forward.completion_tokens + backward.completion_tokens
    assert m.seconds > 0
    # The engines' counters were taken, so the next round starts from zero.
    assert forward.engine.usage.calls == 0 and backward.engine.usage.calls == 0


def test_one_engine_for_both_roles_is_counted_once() -> None:
    both = sim_engine()
    result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, both.engine, both.engine,
                          local(steps=2, batch_size=3))
    assert result.metrics.llm_calls == both.calls > 0
    assert result.metrics.prompt_tokens == both.prompt_tokens


def test_same_seed_and_stream_reproduce_the_round() -> None:
    def run(stream: str):
        forward, backward = sim_engine(), sim_engine()
        result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                              local(steps=3, batch_size=3, seed=7), stream=stream)
        return result, forward.questions

    first, first_questions = run("round1:client0")
    again, again_questions = run("round1:client0")
    _, other_questions = run("round1:client1")
    assert again.prompt == first.prompt
    assert metrics_without_time(again) == metrics_without_time(first)
    # the same examples asked (a batch is answered concurrently: the order of the calls may differ)
    assert sorted(again_questions) == sorted(first_questions)
    assert sorted(other_questions) != sorted(first_questions)  # another stream samples other batches


def test_no_training_data_is_an_error() -> None:
    engine = make_engine(endpoint())
    with pytest.raises(ValueError, match="no training examples"):
        train_prompt(TASK.start_prompt, TASK, [], engine, engine, local())


# --- the keep-or-revert rule ----------------------------------------------------------------


WORSE_REWRITE = f"<IMPROVED_VARIABLE>{PROMPT_OPENING}</IMPROVED_VARIABLE>"  # drops the answer format
SAME_REWRITE = f"<IMPROVED_VARIABLE>Be precise. {TASK.start_prompt}</IMPROVED_VARIABLE>"  # scores the same
PERFECT_REWRITE = f"<IMPROVED_VARIABLE>{full_prompt(TASK.name)}</IMPROVED_VARIABLE>"  # every sim instruction


def one_step(rewrite: str, keep_rule: str):
    """One local step on the mixed batch (one right, one wrong) whose optimizer proposes ``rewrite``."""
    forward, backward = sim_engine(), sim_engine(optimizer_reply=rewrite)
    return train_prompt(TASK.start_prompt, TASK, mixed_batch(), forward.engine, backward.engine,
                        local(steps=1, batch_size=2, keep_rule=keep_rule))


@pytest.mark.parametrize("before, after, reference, not_worse", [
    (0.5, 0.0, False, False), (0.5, 0.5, False, True), (0.5, 1.0, True, True), (0.0, 0.5, True, True),
    (1.0, 1.0, True, True),
])
def test_the_keep_rules_as_the_reference_code_decides(before, after, reference, not_worse) -> None:
    """reference: strictly better or perfect (the reference's --proximal_update); not-worse: the reference
    without the flag; always: every well-formed rewrite."""
    assert keeps("reference", before, after) is reference
    assert keeps("not-worse", before, after) is not_worse
    assert keeps("always", before, after) is True


def test_the_reference_rule_reverts_a_rewrite_that_scores_worse() -> None:
    result = one_step(WORSE_REWRITE, "reference")
    m = result.metrics
    assert result.prompt == TASK.start_prompt
    assert (m.steps, m.steps_reverted, m.steps_accepted) == (1, 1, 0)
    assert m.batch_accuracy_before == 0.5
    assert m.batch_accuracy_after == 0.5  # the kept prompt's score
    assert m.malformed_answers == 2  # the rejected candidate's replies had no answer line
    assert (m.rewrites, m.rewrites_well_formed) == (1, 1)


def test_the_reference_rule_reverts_a_rewrite_that_only_scores_the_same() -> None:
    result = one_step(SAME_REWRITE, "reference")
    assert result.prompt == TASK.start_prompt
    assert (result.metrics.steps_accepted, result.metrics.steps_reverted) == (0, 1)


def test_the_reference_rule_keeps_a_rewrite_that_scores_perfectly() -> None:
    result = one_step(PERFECT_REWRITE, "reference")
    assert result.prompt == full_prompt(TASK.name)
    assert result.metrics.batch_accuracy_after == 1.0 and result.metrics.steps_accepted == 1


def test_not_worse_keeps_a_rewrite_that_scores_the_same() -> None:
    result = one_step(SAME_REWRITE, "not-worse")
    assert result.prompt == f"Be precise. {TASK.start_prompt}"
    assert (result.metrics.steps_accepted, result.metrics.steps_reverted) == (1, 0)


def test_always_keeps_even_the_worse_rewrite() -> None:
    result = one_step(WORSE_REWRITE, "always")
    m = result.metrics
    assert result.prompt == PROMPT_OPENING
    assert (m.steps_reverted, m.steps_accepted) == (0, 1)
    assert m.batch_accuracy_before == 0.5 and m.batch_accuracy_after == 0.0


def test_batches_go_through_every_example_before_any_repeats() -> None:
    """As the reference's data loader: a shuffled epoch in consecutive batches, then a new shuffle."""
    import random

    train = SPLITS.train[:10]
    drawn = batches(train, 3, random.Random(0))
    epoch = [next(drawn) for _ in range(4)]  # 3 + 3 + 3 + 1
    assert [len(b) for b in epoch] == [3, 3, 3, 1]
    seen = [e for b in epoch for e in b]
    assert sorted(seen, key=train.index) == list(train)  # each example exactly once
    second = [e for _ in range(4) for e in next(drawn)]
    assert sorted(second, key=train.index) == list(train) and second != seen  # reshuffled


# --- the LLM judge (loss = judge) -----------------------------------------------------------------


def test_the_judge_decides_the_batch_score_and_the_keep_rule() -> None:
    """The sim's judge is always right, so with it the run is the same as with exact match; the
    judge's calls are counted in the round's usage."""
    def run(judge: Judge | None):
        forward, backward = sim_engine(), sim_engine()
        result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                              local(steps=3, batch_size=3, seed=2), judge=judge)
        return result, forward.calls + backward.calls

    exact, _ = run(None)
    judge_engine = sim_engine()
    judged, judged_calls = run(Judge(judge_engine.engine))
    assert judged.prompt == exact.prompt
    assert judged.metrics.batch_accuracy_before == exact.metrics.batch_accuracy_before
    assert judge_engine.calls > 0 and judged.metrics.llm_calls == judged_calls + judge_engine.calls
    assert judged.metrics.judge_unreadable == 0


def test_an_unreadable_verdict_counts_as_wrong_and_is_counted() -> None:
    def chat(messages):
        return "I think it is fine.", 10, 5

    judge = Judge(ChatEngine(endpoint(), chat))
    forward, backward = sim_engine(), sim_engine()
    result = train_prompt(TASK.start_prompt, TASK, mixed_batch(), forward.engine, backward.engine,
                          local(steps=1, batch_size=2), judge=judge)
    assert result.metrics.batch_accuracy_before == 0.0  # both unreadable: both wrong
    assert result.metrics.judge_unreadable >= 2


# --- malformed output never crashes a step ----------------------------------------------------


@pytest.mark.parametrize("reply", [
    "Here is a better prompt: be careful when counting.",  # no tags at all
    "<IMPROVED_VARIABLE>   </IMPROVED_VARIABLE>",  # empty tags
    "",  # empty reply
    "<IMPROVED_VARIABLE>You will answer a reasoning question. List every",  # cut off at max tokens
], ids=["no-tags", "empty-tags", "empty-reply", "no-closing-tag"])
def test_malformed_optimizer_output_is_counted_and_the_prompt_kept(reply: str) -> None:
    batch = mixed_batch()
    forward, backward = sim_engine(), sim_engine(optimizer_reply=reply)
    result = train_prompt(TASK.start_prompt, TASK, batch, forward.engine, backward.engine,
                          local(steps=2, batch_size=2))
    m = result.metrics
    assert result.prompt == TASK.start_prompt
    assert m.malformed_updates == 2
    assert (m.steps, m.steps_accepted, m.steps_reverted) == (2, 0, 0)
    # No candidate, so no re-scoring: the forward model answered each batch once per step.
    assert forward.calls == 2 * len(batch)


def test_malformed_answers_are_counted_and_the_sim_restores_the_format() -> None:
    batch = mixed_batch()
    forward, backward = sim_engine(), sim_engine()
    result = train_prompt(PROMPT_OPENING, TASK, batch, forward.engine, backward.engine,
                          local(steps=1, batch_size=2))
    m = result.metrics
    assert not has_answer_format(PROMPT_OPENING)
    assert m.malformed_answers == 2  # both first answers lack the answer line
    assert m.batch_accuracy_before == 0.0
    assert has_answer_format(result.prompt) and TASK.format_instruction in result.prompt
    assert m.batch_accuracy_after > 0.0


# --- a client's round, from plain dicts ------------------------------------------------------

RUN_CONFIG = {"task": "object_counting", "synthetic-size": 100, "local-steps": 2, "batch-size": 3, "seed": 0}
NODE_CONFIG = {"partition-id": 1, "num-partitions": 2}


def train_request(server_round: int = 1, prompt: str = TASK.start_prompt) -> RoundRequest:
    return RoundRequest(phase=Phase.TRAIN.value, server_round=server_round, prompt=prompt)


def train(run_config: dict, node_config: dict, server_round: int = 1) -> TrainReply:
    reply = answer(run_config, node_config, train_request(server_round))
    assert isinstance(reply, TrainReply)
    return reply


def test_local_round_trains_on_this_nodes_share_and_scores_its_validation_data() -> None:
    reply = local_round(RunSettings.from_config(RUN_CONFIG), NodeIdentity(1, 2), train_request())
    share = client_data("homogeneous", ["object_counting"], 1, 2, "synthetic", 0, 100)
    assert reply.num_examples == len(share.train) == 10
    assert reply.local.steps == 2
    assert reply.partition_id == 1
    assert reply.local.llm_calls > 0 and reply.local.prompt_tokens > 0
    assert reply.val is not None and reply.val.total == len(share.val)
    assert reply.val_usage is not None and reply.val_usage.calls == len(share.val)  # one call per validation example
    expected = evaluate_prompt(make_engine(endpoint()), TASK, reply.prompt, share.val)
    assert reply.val.accuracy == expected.accuracy
    assert reply.llm == endpoint().describe()
    # the ClientApp's path (answer, from the run and node config) gives the same reply,
    # and the reply survives the trip through a Flower ConfigRecord unchanged
    again = train(RUN_CONFIG, NODE_CONFIG)
    assert (again.prompt, again.leaks, again.num_examples) == (reply.prompt, reply.leaks, reply.num_examples)
    assert (again.val.correct, again.val.total) == (reply.val.correct, reply.val.total)
    assert TrainReply.decode(reply.encode()) == reply


def test_client_val_eval_can_be_off() -> None:
    run_config = {**RUN_CONFIG, "client-val-eval": False, "local-steps": 1}
    reply = train(run_config, NODE_CONFIG, server_round=2)
    assert reply.local.steps == 1
    assert reply.val is None and reply.val_usage is None


def test_local_round_over_http_matches_the_in_process_sim(sim_http: str) -> None:
    node = {**NODE_CONFIG, "llm-backend": "openai", "llm-base-url": sim_http, "llm-model": "sim-over-http"}
    over_http = train(RUN_CONFIG, node)
    in_process = train(RUN_CONFIG, NODE_CONFIG)
    assert over_http.prompt == in_process.prompt
    assert over_http.llm == f"sim-over-http at {sim_http}" and in_process.llm == endpoint().describe()
    for key in ("llm_calls", "prompt_tokens", "completion_tokens", "steps_accepted"):
        assert getattr(over_http.local, key) == getattr(in_process.local, key), key
    assert over_http.val.accuracy == in_process.val.accuracy
