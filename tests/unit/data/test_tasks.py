"""Answer extraction, normalisation and exact-match scoring of the tasks."""

from __future__ import annotations

import pytest

from fedtextgrad_core.data.tasks import (
    GENERIC_FORMAT,
    NUMBER_FORMAT,
    PROMPT_OPENING,
    TASKS,
    WORDS_FORMAT,
    check_parser,
    format_for,
    get_task,
    last_number,
    start_prompt_for,
)
from fedtextgrad_core.errors import ConfigError

COUNTING = get_task("object_counting")
SORTING = get_task("word_sorting")


def test_last_answer_line_wins() -> None:
    reply = "First guess.\nAnswer: 4\nWait, I missed the two violins.\nAnswer: 6"
    assert COUNTING.extract_answer(reply) == "6"
    assert COUNTING.score(reply, "6") == (True, False)
    assert COUNTING.score(reply, "4") == (False, False)


def test_last_answer_wins_on_a_single_line() -> None:
    # Two marks on one line: the text after the *last* one is the answer.
    reply = "Answer: 5. Recounting, the final answer: 6"
    assert COUNTING.extract_answer(reply) == "6"
    assert COUNTING.score(reply, "6") == (True, False)


@pytest.mark.parametrize("reply", [
    "**Answer:** 15",
    "**Answer: 15**",
    "Answer: **15**",
    "answer:15",
    "ANSWER :  15  ",
])
def test_markdown_bold_and_spacing_are_stripped(reply: str) -> None:
    assert COUNTING.extract_answer(reply) == "15"


def test_answer_only_covers_its_own_line() -> None:
    reply = "Answer: 7\nI hope this helps with your 3 questions."
    assert COUNTING.extract_answer(reply) == "7"


@pytest.mark.parametrize("prediction, target", [
    ("15.0", "15"),
    ("$15", "15"),
    ("1,234", "1234"),
    ("$1,234.00", "1234"),
    ("-7", "-7"),
    ("There are 9 objects.", "9"),
])
def test_numbers_normalise_equal(prediction: str, target: str) -> None:
    assert COUNTING.normalize(prediction) == COUNTING.normalize(target)
    assert COUNTING.score(f"Answer: {prediction}", target) == (True, False)


def test_different_numbers_do_not_match() -> None:
    assert COUNTING.score("Answer: 15.5", "15") == (False, False)
    assert COUNTING.score("Answer: -7", "7") == (False, False)


def test_a_number_answer_without_a_number_is_wrong_not_malformed() -> None:
    assert COUNTING.normalize("seven") is None
    assert COUNTING.score("Answer: seven", "7") == (False, False)


def test_word_lists_compare_case_insensitively_and_ignore_punctuation() -> None:
    assert SORTING.score("Answer: Apple Banana cherry", "apple banana cherry") == (True, False)
    assert SORTING.score("Answer: apple, banana, cherry.", "apple banana cherry") == (True, False)
    assert SORTING.score("Answer: banana apple cherry", "apple banana cherry") == (False, False)
    assert SORTING.score("Answer: apple banana", "apple banana cherry") == (False, False)


@pytest.mark.parametrize("reply", [
    "",
    "The result is 6.",
    "Answer:",
    "Answer: **",
    "Answer:   \n",
])
def test_malformed_replies_are_detected(reply: str) -> None:
    assert COUNTING.extract_answer(reply) is None
    assert COUNTING.score(reply, "6") == (False, True)


def test_none_reply_is_malformed() -> None:
    assert COUNTING.score(None, "6") == (False, True)  # type: ignore[arg-type]


def test_unknown_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("object_count")
    message = str(info.value)
    assert "'task'" in message and "'object_count'" in message
    for name in TASKS:
        assert name in message


def test_prompts_and_formats() -> None:
    assert COUNTING.start_prompt == f"{PROMPT_OPENING} {NUMBER_FORMAT}"
    assert SORTING.start_prompt.endswith(WORDS_FORMAT)
    # Tasks sharing one format keep it; mixed formats fall back to the generic one.
    assert format_for(["object_counting", "multistep_arithmetic_two"]) == NUMBER_FORMAT
    assert format_for(["object_counting", "word_sorting"]) == GENERIC_FORMAT
    assert start_prompt_for(["word_sorting"]) == SORTING.start_prompt


# --- the reference code's parser (answer-parser = last-number) ----------------------------------


@pytest.mark.parametrize("reply, value", [
    ("There are 7 apples.\nAnswer: 12", 12),
    ("I count 3, then 4. So 1,000 in all", 1000),  # the last token with a digit; commas are not digits
    ("The result is 3.5 units", 3),  # cut at the first '.'
    ("The answer is -45", 45),  # minus signs are dropped, as in the reference
    ("no number at all", 0),  # the reference reads 0 when there is none
    ("", 0),
])
def test_last_number_reads_as_the_reference_code_does(reply: str, value: int) -> None:
    assert last_number(reply) == value


def test_last_number_scores_reply_and_target_alike_and_disagrees_with_the_answer_line() -> None:
    task = get_task("multistep_arithmetic_two")
    # the reference drops the minus sign on both sides, so a wrong sign still counts as right
    assert task.score("So the total is 45", "-45", "last-number") == (True, False)
    assert task.score("So the total is 45", "-45", "answer-line") == (False, True)
    # a reply with no digit reads 0: right when the target is 0, and flagged as malformed
    assert task.score("nothing", "0", "last-number") == (True, True)


def test_last_number_is_refused_for_word_tasks() -> None:
    assert check_parser("last-number", ["object_counting", "gsm8k"]) == "last-number"
    with pytest.raises(ConfigError, match="answer-line for word_sorting"):
        check_parser("last-number", ["object_counting", "word_sorting"])
    with pytest.raises(ConfigError, match="answer-line, last-number"):
        check_parser("first-number", ["object_counting"])
