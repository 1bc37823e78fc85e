"""The client's leakage guard: a prompt quoting a training question is redacted, refused
or passed unchanged, as the site chose, and the counts reach the round record."""

from __future__ import annotations

import pytest

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, LeakageError
from fedtextgrad_core.method.leakage import (
    LEAK_MARKER,
    LeakCounts,
    find_leaks,
    folded,
    guard_prompt,
    training_ngrams,
)
from fedtextgrad_core.run.client_round import (
    NodeIdentity,
    answer,
    check_leakage,
    load_client_data,
)
from fedtextgrad_core.run.messages import Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.server_setup import open_run
from fedtextgrad_core.run.settings import RunSettings
from server_app.strategy import PromptStrategy
from tests.support.flower_loopback import LoopbackGrid, default_run_config

QUESTION = ("I have a piano, two flutes, a violin, and three trombones. "
            "How many musical instruments do I have?")
TRAIN = [
    Example(QUESTION, "7"),
    Example("Sort the following words alphabetically: List: oak apple zebra mango kite lemon river stone",
            "apple kite lemon mango oak river stone zebra"),
    Example("((-1 + 2 * 3) - (4 - -5)) =", "-4"),
]
BEFORE = "You will answer a reasoning question. Think step by step."
AFTER = "Count only the items that belong to the category asked about."


def _quoting(text: str) -> str:
    return f'{BEFORE} For example: "{text}" {AFTER}'


# --- finding quotes ----------------------------------------------------------------------

def test_a_verbatim_training_question_is_one_passage():
    spans, windows, longest = find_leaks(_quoting(QUESTION), training_ngrams(TRAIN, 8), 8)
    assert len(spans) == 1 and windows >= 1 and longest == 18  # every word of the question
    prompt = _quoting(QUESTION)
    start, end = spans[0]
    assert prompt[start:end].startswith("I have a piano") and prompt[start:end].endswith("do I have")


def test_re_punctuating_or_re_casing_a_quote_does_not_hide_it():
    disguised = "i HAVE a piano; two flutes: a violin... and three trombones"
    spans, _, _ = find_leaks(_quoting(disguised), training_ngrams(TRAIN, 8), 8)
    assert len(spans) == 1


def test_answers_and_arithmetic_expressions_are_checked_too():
    grams = training_ngrams(TRAIN, 8)
    assert find_leaks(_quoting("apple kite lemon mango oak river stone zebra"), grams, 8)[0]
    assert find_leaks(_quoting("((-1 + 2 * 3) - (4 - -5))"), grams, 8)[0]


def test_fewer_shared_words_than_the_ngram_are_not_a_leak():
    grams = training_ngrams(TRAIN, 8)
    assert find_leaks(_quoting("I have a piano, two flutes, a"), grams, 8)[0] == []  # 7 words
    assert find_leaks(_quoting("I have a piano, two flutes, a"), training_ngrams(TRAIN, 7), 7)[0]
    assert find_leaks(BEFORE + " " + AFTER, grams, 8)[0] == []


# --- redact, refuse, off --------------------------------------------------------------------

def test_redact_removes_the_quote_and_keeps_the_rest():
    report = guard_prompt(_quoting(QUESTION), TRAIN, 8, "redact")
    assert "piano" not in report.prompt and "musical instruments" not in report.prompt
    assert report.prompt.startswith(BEFORE) and report.prompt.endswith(AFTER) and LEAK_MARKER in report.prompt
    assert report.redactions == report.passages == 1 and report.ngrams >= 1
    assert guard_prompt(report.prompt, TRAIN, 8, "redact").passages == 0  # nothing left to find


LOOK_ALIKE = str.maketrans({"o": "о", "e": "е", "a": "а", "c": "с", "p": "р"})  # Latin -> Cyrillic


@pytest.mark.parametrize("disguise", [
    pytest.param(lambda text: text.translate(LOOK_ALIKE), id="cyrillic-look-alikes"),
    pytest.param(lambda text: "\u200b".join(text), id="zero-width-spaces-inside-words"),
    pytest.param(lambda text: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text), id="fullwidth"),
    pytest.param(lambda text: "".join(c + "\u0301" if c.isalpha() else c for c in text), id="combining-accents"),
    pytest.param(lambda text: "\u00ad".join(text), id="soft-hyphens-inside-words"),
])
def test_a_quote_disguised_to_look_different_is_still_found_and_redacted(disguise):
    """Attack: a client's optimizer (steered by hidden text in the shared prompt) copies a training
    question with look-alike letters or invisible characters, so an exact match would miss it."""
    prompt = f"{BEFORE} For example: {disguise(QUESTION)} {AFTER}"
    assert prompt != _quoting(QUESTION)
    report = guard_prompt(prompt, TRAIN, 8, "redact")
    assert report.passages == 1 and report.redactions == 1, prompt
    assert report.prompt.startswith(BEFORE) and report.prompt.endswith(AFTER)
    folded_rest, _ = folded(report.prompt)
    assert "piano" not in folded_rest and "musical" not in folded_rest


def test_two_separate_quotes_are_two_redactions():
    prompt = _quoting(QUESTION) + " Also: " + "apple kite lemon mango oak river stone zebra."
    report = guard_prompt(prompt, TRAIN, 8, "redact")
    assert report.redactions == 2 and "zebra" not in report.prompt and report.prompt.count(LEAK_MARKER) == 2


def test_off_leaves_the_prompt_unchanged_but_still_counts():
    report = guard_prompt(_quoting(QUESTION), TRAIN, 8, "off")
    assert report.prompt == _quoting(QUESTION)
    assert report.passages == 1 and report.redactions == 0
    # the numbers that travel to the server: counts only
    assert report.counts == LeakCounts(passages=1, ngrams=report.ngrams, redactions=0, longest=18)
    assert report.counts.ngrams > 0


def test_refuse_raises_a_plain_error_that_does_not_repeat_the_training_text():
    settings = RunSettings.from_config(default_run_config(**{"leakage-guard": "refuse"}))
    with pytest.raises(LeakageError) as caught:
        check_leakage(_quoting(QUESTION), TRAIN, settings)
    message = str(caught.value)
    assert "refused" in message and "1 passage" in message and "leakage-guard='redact'" in message
    assert "piano" not in message and "trombones" not in message
    assert check_leakage(BEFORE, TRAIN, settings).passages == 0  # a clean prompt goes through


# --- in the client's round ------------------------------------------------------------------

RUN = {"local-steps": 1, "client-val-eval": False}


def _own_question(partition_id: int, num_partitions: int = 3) -> str:
    settings = RunSettings.from_config(default_run_config())
    data = load_client_data(settings, NodeIdentity(partition_id, num_partitions))
    return data.train[0].question


def _quoting_prompt(question: str) -> str:
    start = get_task("object_counting").start_prompt
    return start.replace("Think step by step.", f'Think step by step. For example: "{question}"')


def _train(run_config: dict, node_config: dict, prompt: str) -> TrainReply:
    """A client's training reply as the ClientApp gives it in Flower's simulation (the run config may set the guard)."""
    reply = answer(run_config, node_config, RoundRequest(phase=Phase.TRAIN.value, server_round=1, prompt=prompt),
                   pinned=False)
    assert isinstance(reply, TrainReply)
    return reply


@pytest.mark.parametrize("guard", ["redact", "off"])
def test_local_round_applies_the_runs_choice(guard):
    question = _own_question(0)
    reply = _train(default_run_config(**RUN, **{"leakage-guard": guard}),
                   {"partition-id": 0, "num-partitions": 3}, _quoting_prompt(question))
    prompt, leaks = reply.prompt, reply.leaks
    assert leaks.passages == 1
    if guard == "redact":
        assert question not in prompt and LEAK_MARKER in prompt and leaks.redactions == 1
        assert "Think step by step" in prompt and "'Answer: $VALUE'" in prompt
    else:
        assert question in prompt and leaks.redactions == 0


def test_a_nodes_own_choice_overrides_the_run_config():
    question = _own_question(0)
    with pytest.raises(LeakageError):
        _train(default_run_config(**RUN, **{"leakage-guard": "off"}),
               {"partition-id": 0, "num-partitions": 3, "leakage-guard": "refuse"}, _quoting_prompt(question))
    with pytest.raises(ConfigError, match="leakage-guard"):
        _train(default_run_config(**RUN), {"partition-id": 0, "num-partitions": 3, "leakage-guard": "block"},
               _quoting_prompt(question))


def test_through_flower_counts_reach_rounds_jsonl_and_a_refusing_node_is_a_reported_failure(tmp_path):
    """Client 0 redacts its own question; node 2 (whose question is quoted too) refuses by its node
    config; client 1 holds neither question, so for it the prompt is no leak."""
    run_config = default_run_config(**RUN, **{"num-server-rounds": 1, "merge": "concat", "min-train-clients": 2,
                                              "results-dir": str(tmp_path), "run-name": "run"})
    run = open_run(run_config, echo=lambda line: None)
    q0, q2 = _own_question(0), _own_question(2)
    run.state.global_prompt = _quoting_prompt(q0).replace("For example:", f'Or: "{q2}" For example:')
    grid = LoopbackGrid(run_config, node_overrides={2: {"leakage-guard": "refuse"}})
    PromptStrategy(run.federation).start(grid)
    [record] = RunFolder(run.recorder.path).read_rounds()
    uploads = {u.client.partition_id: u for u in record.uploads}
    assert set(uploads) == {0, 1} and {u.label for u in record.uploads} == {"0", "1"}
    # >= 1: besides its own question, the end of q2 (the last items and "How many objects do I
    # have") may repeat 8+ tokens of one of client 0's questions, and is then redacted as well
    assert uploads[0].reply.leaks.redactions >= 1 and q0 not in uploads[0].reply.prompt
    assert uploads[1].reply.leaks.passages == 0 and q0 in uploads[1].reply.prompt
    [failure] = record.failures  # node 2: refused, its prompt never left it
    assert failure.node_id == 102 and failure.stage == "train"
    assert "leakage guard" in failure.reason and q2 not in failure.reason
