"""The local TextGrad loop (train_prompt) and a client's round (client_work.local_round).

The sim backend is the real forward and feedback model throughout; scripted engines only
stand in for the optimizer where a test needs output the sim never produces (a rewrite
that drops the answer format, a reply without <IMPROVED_VARIABLE> tags, empty tags).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from fedtextgrad_core.run.client_round import local_round
from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.llm.engine import ChatEngine, EndpointSettings, make_engine
from fedtextgrad_core.method.local_training import LocalSettings, batch_accuracy, train_prompt
from fedtextgrad_core.data.partitioning import client_data
from fedtextgrad_core.sim import SimLLM, approx_tokens, has_answer_format, instructions_in
from fedtextgrad_core.data.tasks import PROMPT_OPENING, get_task

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
        if optimizer_reply is not None and OPTIMIZER_MARK in system:
            reply = optimizer_reply
        else:
            reply = sim.complete(messages)
        prompt_tokens = sum(approx_tokens(m["content"]) for m in messages)
        with lock:
            counted.calls += 1
            counted.prompt_tokens += prompt_tokens
            counted.completion_tokens += approx_tokens(reply)
            if OPTIMIZER_MARK not in system and "feedback" not in system:
                counted.questions.append(messages[-1]["content"])
        return reply, prompt_tokens, approx_tokens(reply)

    counted = Counted(ChatEngine(EndpointSettings(), chat))
    return counted


def mixed_batch() -> list[Example]:
    """Two training examples: one the start prompt gets right, one it gets wrong (found, not assumed)."""
    engine = make_engine(EndpointSettings())
    right = wrong = None
    for example in SPLITS.train:
        accuracy, malformed = batch_accuracy(engine, TASK, TASK.start_prompt, [example])
        assert malformed == 0
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
                          LocalSettings(steps=5, batch_size=3, proximal=True, seed=0))
    m = result.metrics
    assert m.steps == 5
    assert m.steps_accepted >= 1
    assert m.batch_accuracy_after >= m.batch_accuracy_before
    assert m.malformed_updates == 0 and m.malformed_answers == 0 and m.llm_errors == 0
    assert instructions_in(TASK.start_prompt, TASK.name) == []
    assert instructions_in(result.prompt, TASK.name)  # learned at least one catalogue instruction
    assert result.prompt.endswith(TASK.format_instruction)
    # The learned prompt is better on held-out data, not just on the batches it saw.
    engine = make_engine(EndpointSettings())
    before = evaluate_prompt(engine, TASK, TASK.start_prompt, SPLITS.val)
    after = evaluate_prompt(engine, TASK, result.prompt, SPLITS.val)
    assert after.accuracy > before.accuracy


def test_usage_is_what_the_engines_counted() -> None:
    forward, backward = sim_engine(), sim_engine()
    result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                          LocalSettings(steps=3, batch_size=3))
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
                          LocalSettings(steps=2, batch_size=3))
    assert result.metrics.llm_calls == both.calls > 0
    assert result.metrics.prompt_tokens == both.prompt_tokens


def test_same_seed_and_stream_reproduce_the_round() -> None:
    def run(stream: str):
        forward, backward = sim_engine(), sim_engine()
        result = train_prompt(TASK.start_prompt, TASK, SPLITS.train, forward.engine, backward.engine,
                              LocalSettings(steps=3, batch_size=3, seed=7), stream=stream)
        return result, forward.questions

    first, first_questions = run("round1:client0")
    again, again_questions = run("round1:client0")
    other, other_questions = run("round1:client1")
    assert again.prompt == first.prompt
    assert metrics_without_time(again) == metrics_without_time(first)
    assert again_questions == first_questions
    assert other_questions != first_questions  # another stream samples other batches


def test_no_training_data_is_an_error() -> None:
    engine = make_engine(EndpointSettings())
    with pytest.raises(ValueError, match="no training examples"):
        train_prompt(TASK.start_prompt, TASK, [], engine, engine, LocalSettings())


# --- the proximal keep-or-revert rule ------------------------------------------------------


WORSE_REWRITE = f"<IMPROVED_VARIABLE>{PROMPT_OPENING}</IMPROVED_VARIABLE>"  # drops the answer format


def one_step(rewrite: str, proximal: bool):
    """One local step on the mixed batch whose optimizer proposes ``rewrite``."""
    forward, backward = sim_engine(), sim_engine(optimizer_reply=rewrite)
    return train_prompt(TASK.start_prompt, TASK, mixed_batch(), forward.engine, backward.engine,
                        LocalSettings(steps=1, batch_size=2, proximal=proximal))


def test_proximal_reverts_a_rewrite_that_scores_worse() -> None:
    result = one_step(WORSE_REWRITE, proximal=True)
    m = result.metrics
    assert result.prompt == TASK.start_prompt
    assert (m.steps, m.steps_reverted, m.steps_accepted) == (1, 1, 0)
    assert m.batch_accuracy_before == 0.5
    assert m.batch_accuracy_after == 0.5  # the kept prompt's score
    assert m.malformed_answers == 2  # the rejected candidate's replies had no answer line


def test_without_proximal_the_worse_rewrite_is_accepted() -> None:
    result = one_step(WORSE_REWRITE, proximal=False)
    m = result.metrics
    assert result.prompt == PROMPT_OPENING
    assert (m.steps_reverted, m.steps_accepted) == (0, 1)
    assert m.batch_accuracy_before == 0.5 and m.batch_accuracy_after == 0.0
    assert m.malformed_answers == 2


def test_proximal_keeps_a_rewrite_that_scores_the_same() -> None:
    result = one_step(f"<IMPROVED_VARIABLE>Be precise. {TASK.start_prompt}</IMPROVED_VARIABLE>", proximal=True)
    assert result.prompt == f"Be precise. {TASK.start_prompt}"
    assert (result.metrics.steps_accepted, result.metrics.steps_reverted) == (1, 0)


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
                          LocalSettings(steps=2, batch_size=2))
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
                          LocalSettings(steps=1, batch_size=2))
    m = result.metrics
    assert not has_answer_format(PROMPT_OPENING)
    assert m.malformed_answers == 2  # both first answers lack the answer line
    assert m.batch_accuracy_before == 0.0
    assert has_answer_format(result.prompt) and TASK.format_instruction in result.prompt
    assert m.batch_accuracy_after > 0.0


# --- a client's round, from plain dicts ------------------------------------------------------

RUN_CONFIG = {"task": "object_counting", "synthetic-size": 100, "local-steps": 2, "batch-size": 3, "seed": 0}
NODE_CONFIG = {"partition-id": 1, "num-partitions": 2}


def test_local_round_trains_on_this_nodes_share_and_scores_its_validation_data() -> None:
    prompt, metrics, num_examples = local_round(RUN_CONFIG, NODE_CONFIG, TASK.start_prompt, 1, {})
    share = client_data("homogeneous", ["object_counting"], 1, 2, "synthetic", 0, 100)
    assert num_examples == len(share.train) == 10
    assert metrics["steps"] == 2.0
    assert metrics["partition_id"] == 1.0
    assert metrics["llm_calls"] > 0 and metrics["prompt_tokens"] > 0
    assert metrics["val_examples"] == len(share.val)
    assert metrics["eval_llm_calls"] == len(share.val)  # one call per validation example
    expected = evaluate_prompt(make_engine(EndpointSettings()), TASK, prompt, share.val)
    assert metrics["val_accuracy"] == expected.accuracy
    assert all(isinstance(v, float) for v in metrics.values())


def test_round_config_overrides_the_run_config_and_client_val_eval_can_be_off() -> None:
    run_config = {**RUN_CONFIG, "client-val-eval": False}
    _, metrics, _ = local_round(run_config, NODE_CONFIG, TASK.start_prompt, 2, {"local-steps": 1})
    assert metrics["steps"] == 1.0
    assert "val_accuracy" not in metrics and "eval_llm_calls" not in metrics


def test_local_round_over_http_matches_the_in_process_sim(sim_http: str) -> None:
    node = {**NODE_CONFIG, "llm-backend": "openai", "llm-base-url": sim_http, "llm-model": "sim-over-http"}
    http_prompt, http_metrics, _ = local_round(RUN_CONFIG, node, TASK.start_prompt, 1, {})
    local_prompt, local_metrics, _ = local_round(RUN_CONFIG, NODE_CONFIG, TASK.start_prompt, 1, {})
    assert http_prompt == local_prompt
    for key in ("llm_calls", "prompt_tokens", "completion_tokens", "steps_accepted", "val_accuracy"):
        assert http_metrics[key] == local_metrics[key], key
