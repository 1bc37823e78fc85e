"""The instruction catalogue: the sentences an optimiser can add, and prompt text helpers.

Each entry links one sentence to the mistake it prevents, so a prompt's accuracy under
the sim rises only by learning catalogue sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtextgrad_core.data.tasks import NUMBER_FORMAT, WORDS_FORMAT, get_task
from fedtextgrad_core.errors import SimUnsupportedError
from fedtextgrad_core.text import split_sentences

# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Instruction:
    """One sentence the optimiser can learn, and the mistake it prevents.

    ``key_phrases`` detect the instruction in a prompt (case-insensitive, any one
    suffices), so a prompt counts as having learned it even if it was worded by a
    real LLM, as long as it uses one of the phrases.
    """

    id: str
    sentence: str
    key_phrases: tuple[str, ...]
    topic: str  # completes "the system prompt does not say ..."
    mistake: str  # what the model does without the instruction
    rate: float  # share of susceptible questions on which the mistake fires
    susceptible: str  # which questions are prone to the mistake


CATALOGUE: dict[str, list[Instruction]] = {
    "object_counting": [
        Instruction(
            "quantities",
            "List every item with its quantity, and count a word like 'two' or 'three' "
            "as that many items.",
            ("with its quantity", "as that many items"),
            "how to handle quantities",
            "counted each entry as one item, ignoring quantity words such as 'two' or 'three'",
            0.6,
            "an entry of the asked category has a quantity above one",
        ),
        Instruction(
            "category",
            "Count only the items that belong to the category asked about, and ignore "
            "every other item.",
            ("belong to the category", "ignore every other item"),
            "that items of other categories must be left out",
            "also counted items that are not in the category asked about",
            0.5,
            "the list has items of other categories",
        ),
        Instruction(
            "recount",
            "Add the counts one at a time and double-check the total before answering.",
            ("double-check the total", "add the counts one at a time"),
            "to check the total",
            "added the counts wrongly and was off by one",
            0.2,
            "every question",
        ),
    ],
    "word_sorting": [
        Instruction(
            "letters",
            "Compare words letter by letter: when two words start with the same letter, "
            "order them by their next letters.",
            ("letter by letter", "by their next letters"),
            "how to order words that start with the same letter",
            "sorted by first letter only, keeping words with the same first letter "
            "in their original order",
            0.6,
            "two words share a first letter and this changes the order",
        ),
        Instruction(
            "complete",
            "Make sure every word of the list appears exactly once in the answer.",
            ("appears exactly once", "every word of the list"),
            "that every word must be kept",
            "dropped the last word of the list",
            0.3,
            "the list has more than three words",
        ),
    ],
    "multistep_arithmetic_two": [
        Instruction(
            "precedence",
            "Apply the order of operations: inside each parenthesis, multiply before "
            "adding or subtracting.",
            ("order of operations", "multiply before adding"),
            "to apply the order of operations",
            "evaluated each parenthesis strictly from left to right",
            0.6,
            "evaluating left to right changes the value",
        ),
        Instruction(
            "signs",
            "Track negative numbers carefully: subtracting a negative number means "
            "adding it.",
            ("subtracting a negative", "negative numbers carefully"),
            "how to subtract negative numbers",
            "treated subtracting a negative number as subtracting a positive one",
            0.5,
            "the expression subtracts a negative number",
        ),
        Instruction(
            "recount",
            "Recompute each intermediate result before answering.",
            ("recompute each intermediate", "recompute every intermediate"),
            "to check intermediate results",
            "made an arithmetic slip and was off by one",
            0.2,
            "every question",
        ),
    ],
}

FORMAT_INSTRUCTIONS: tuple[str, ...] = (NUMBER_FORMAT, WORDS_FORMAT)
_FORMAT_MARK = "answer:"


def has_answer_format(prompt: str) -> bool:
    """Whether a prompt states the answer format (detected by the text 'answer:')."""
    return _FORMAT_MARK in (prompt or "").lower()


def has_instruction(prompt_lower: str, instruction: Instruction) -> bool:
    return any(phrase.lower() in prompt_lower for phrase in instruction.key_phrases)


def instructions_in(prompt: str, task: str) -> list[str]:
    """Ids of the task's catalogue instructions present in ``prompt``, in catalogue order.

    The answer format is not a catalogue entry; see :func:`has_answer_format`.
    """
    lower = (prompt or "").lower()
    return [ins.id for ins in _catalogue(task) if has_instruction(lower, ins)]


def _catalogue(task: str) -> list[Instruction]:
    if task not in CATALOGUE:
        raise SimUnsupportedError(
            f"the sim backend has no instruction catalogue for task '{task}'; "
            f"it knows {', '.join(CATALOGUE)}"
        )
    return CATALOGUE[task]


# --------------------------------------------------------------------------- sentences

def is_format_sentence(sentence: str) -> bool:
    return _FORMAT_MARK in sentence.lower()


def insert_instruction(prompt: str, sentence: str) -> str:
    """Add ``sentence`` to ``prompt``: before the answer-format sentence, else at the end.

    The format sentence stays last because it describes the reply's last line, and
    that is where a reader (human or model) expects it. A format sentence itself is
    appended at the end.
    """
    sentences = split_sentences(prompt)
    if is_format_sentence(sentence):
        return " ".join(sentences + [sentence])
    for index in range(len(sentences) - 1, -1, -1):
        if is_format_sentence(sentences[index]):
            return " ".join(sentences[:index] + [sentence] + sentences[index:])
    return " ".join(sentences + [sentence])


def full_prompt(task: str) -> str:
    """The task's start prompt with every catalogue instruction learned (the sim's optimum)."""
    prompt = get_task(task).start_prompt
    for instruction in _catalogue(task):
        prompt = insert_instruction(prompt, instruction.sentence)
    return prompt


