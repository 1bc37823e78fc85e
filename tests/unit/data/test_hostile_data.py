"""Hostile data and hostile model replies.

Dataset files: every bad file must end in one ``DataError`` that names the file and what
is wrong with it (the line of a broken JSONL line, the missing field, "not UTF-8 text",
"empty file"), never a pyarrow/json/Unicode traceback and never a silent empty data set.
Model replies: the answer parser must return on any text, quickly, and count a malformed
reply instead of crashing on it.

Files are written under a temporary folder, each case in a fresh sub-folder: the loader
caches by path, so reusing a path would hand back an earlier result.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedtextgrad_core.data.examples import Splits
from fedtextgrad_core.data.loaders import BBH_SIZE, GSM8K_TRAIN, GSM8K_VAL, load_splits
from fedtextgrad_core.data.tasks import TASKS, get_task
from fedtextgrad_core.errors import ConfigError, DataError
from tests import SHARED_DATA

pytestmark = pytest.mark.slow  # thousands of generated inputs (~15 s a module): the full suite, not the quick loop

FIVE_MB = 5 * 1024 * 1024
MEGABYTE = 1024 * 1024
# Generous for a loaded 2-core machine; a catastrophic regex would take minutes, not seconds.
SECONDS_PER_MEGABYTE_REPLY = 5.0

QUICK = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-data")


def fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


def bbh_records(count: int) -> list[dict[str, object]]:
    return [{"input": f"I have {i} apples. How many fruits do I have?", "target": str(i)} for i in range(count)]


def gsm8k_lines(count: int, name: str = "train") -> list[str]:
    return [json.dumps({"question": f"{name} question {i}?", "answer": f"step\n#### {i}"}) for i in range(count)]


def write_gsm8k(folder: Path, train: bytes | None = None, test: bytes | None = None) -> Path:
    """A GSM8K folder with a valid train (500 lines) and test file, unless replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    valid_train = "\n".join(gsm8k_lines(GSM8K_TRAIN + GSM8K_VAL)).encode()
    (folder / "train.jsonl").write_bytes(valid_train if train is None else train)
    (folder / "test.jsonl").write_bytes("\n".join(gsm8k_lines(3, "test")).encode() if test is None else test)
    return folder


def data_error(task: str, source: Path, names: Path | None = None, *phrases: str) -> str:
    """The DataError message of loading ``task`` from ``source``: one line naming the file and ``phrases``."""
    with pytest.raises(DataError) as info:
        load_splits(task, str(source))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert str(names or source) in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    return message


# --- BIG-Bench Hard files: a fixed table of bad files ------------------------------------------

VALID_BBH = json.dumps({"examples": bbh_records(BBH_SIZE)}, indent=1)
LATIN1_ON_LINE_3 = '{\n "examples": [\n  {"input": "un café", "target": "1"}\n ]\n}'.encode("latin-1")

BAD_BBH_FILES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "empty": (b"", ("empty file",)),
    "only-whitespace": (b"  \n\n\t\n", ("empty file",)),
    "latin-1": (LATIN1_ON_LINE_3, ("not UTF-8 text", "0xe9", "line 3")),
    "utf-16-with-bom": (VALID_BBH.encode("utf-16"), ("not UTF-8 text", "UTF-16")),
    "utf-16-le-no-bom": (VALID_BBH.encode("utf-16-le"), ("not UTF-8 text", "NUL bytes", "line 1")),
    "binary-garbage": (bytes(range(256)) * 40, ("not UTF-8 text",)),
    "truncated-json": (VALID_BBH[: len(VALID_BBH) // 2].encode(), ("not valid JSON", "line ", "'examples'")),
    "top-level-list": (json.dumps(bbh_records(BBH_SIZE)).encode(), ("holds a JSON list, not an object",)),
    "top-level-string": (b'"examples"', ("holds a JSON string",)),
    "top-level-null": (b"null", ("holds a JSON null",)),
    "no-examples-field": (json.dumps({"questions": bbh_records(3)}).encode(), ("no 'examples' field",)),
    "examples-not-a-list": (json.dumps({"examples": {"input": "a", "target": "1"}}).encode(), ("not a list",)),
    "examples-empty": (b'{"examples": []}', ("empty list",)),
    "record-not-an-object": (json.dumps({"examples": [*bbh_records(3), "just text"]}).encode(),
                             ("example 3 is a JSON string",)),
    "record-without-target": (json.dumps({"examples": [*bbh_records(7), {"input": "q"}]}).encode(),
                              ("example 7", "'target'")),
    "record-without-input": (json.dumps({"examples": [{"target": "1"}]}).encode(), ("example 0", "'input'")),
    "float-targets": (json.dumps({"examples": [{"input": "q", "target": 1.5}] * BBH_SIZE}).encode(),
                      ("example 0: 'target' is a JSON number, not text or a whole number",)),
    "null-input": (json.dumps({"examples": [*bbh_records(5), {"input": None, "target": "1"}]}).encode(),
                   ("example 5: 'input' is a JSON null, not text",)),
    "too-few-examples": (json.dumps({"examples": bbh_records(17)}).encode(), ("has 17 examples", "250")),
    "nested-too-deep": (b"[" * 100_000 + b"]" * 100_000, ("nests JSON too deeply",)),
    "five-mb-garbage-line": (b"{" + b"x" * FIVE_MB, ("not valid JSON", "line 1")),
}


@pytest.mark.parametrize("case", sorted(BAD_BBH_FILES))
def test_bad_bbh_file(workdir: Path, case: str) -> None:
    content, phrases = BAD_BBH_FILES[case]
    path = fresh(workdir) / "object_counting.json"
    path.write_bytes(content)
    data_error("object_counting", path, None, *phrases)


def test_a_five_megabyte_question_is_read_and_judged_on_the_count(workdir: Path) -> None:
    """A 5 MB single-line record is valid JSON: it is read (in seconds) and the file is then
    refused for having too few examples, not for its size and not by a hang."""
    path = fresh(workdir) / "word_sorting.json"
    path.write_text(json.dumps({"examples": [{"input": "zebra apple " * (FIVE_MB // 12), "target": "apple zebra"}]}))
    started = time.perf_counter()
    data_error("word_sorting", path, None, "has 1 examples")
    assert time.perf_counter() - started < 60


def test_a_utf8_byte_order_mark_is_named(workdir: Path) -> None:
    """Windows editors write a BOM; datasets' JSON reader fails on it with "Expected object
    or value", so the user is told what to change instead (JSONL files with a BOM load)."""
    path = fresh(workdir) / "object_counting.json"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_BBH.encode())
    data_error("object_counting", path, None, "byte-order mark", "without BOM")


def test_a_folder_where_the_task_file_should_be(workdir: Path) -> None:
    root = fresh(workdir)
    (root / "bbh" / "object_counting.json").mkdir(parents=True)
    data_error("object_counting", root, None, "no object_counting data", "object_counting.json")
    data_error("object_counting", root / "bbh" / "object_counting.json", None, "no object_counting data")


# --- GSM8K JSON lines: a fixed table of bad files ----------------------------------------------


def _lines_with(bad: str, at: int, count: int = 6) -> bytes:
    lines = gsm8k_lines(count, "test")
    lines.insert(at - 1, bad)
    return "\n".join(lines).encode()


BAD_GSM8K_TEST_FILES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "empty": (b"", ("empty file",)),
    "blank-lines-only": (b"\n\n   \n", ("empty file",)),
    "broken-json-line-4": (_lines_with('{"question": "q?", "answer": "#### 1"', 4), ("line 4 is not valid JSON",)),
    "list-on-line-2": (_lines_with('["q?", "#### 1"]', 2), ("line 2 is a JSON list",)),
    "no-answer-on-line-3": (_lines_with('{"question": "q?"}', 3), ("line 3", "'answer'")),
    "no-question-on-line-1": (_lines_with('{"prompt": "q?", "answer": "#### 2"}', 1), ("line 1", "'question'")),
    "no-final-number": (_lines_with('{"question": "q?", "answer": "it is 4"}', 2), ("####",)),
    "not-a-number": (_lines_with('{"question": "q?", "answer": "#### 1e5"}', 2), ("'1e5'", "expected a number")),
    "question-is-a-number": (_lines_with('{"question": 7, "answer": "#### 7"}', 5),
                             ("line 5: 'question' is a JSON number, not text",)),
    "latin-1-on-line-5": (_lines_with('{"question": "très?", "answer": "#### 1"}', 5).replace(
        "très".encode(), "très".encode("latin-1")), ("not UTF-8 text", "line 5")),
    "utf-16": ("\n".join(gsm8k_lines(4)).encode("utf-16"), ("UTF-16",)),
    # A file holding only JSON null crashed the whole process (a segfault inside datasets 5.2 /
    # pyarrow 26) before the text checks existed: it must stop at the check.
    "only-null": (b"null\n", ("line 1 is a JSON null",)),
    "five-mb-garbage-line-2": (_lines_with("q" * FIVE_MB, 2), ("line 2 is not valid JSON",)),
}


@pytest.mark.parametrize("case", sorted(BAD_GSM8K_TEST_FILES))
def test_bad_gsm8k_file(workdir: Path, case: str) -> None:
    content, phrases = BAD_GSM8K_TEST_FILES[case]
    folder = write_gsm8k(fresh(workdir), test=content)
    data_error("gsm8k", folder, folder / "test.jsonl", *phrases)


def test_a_bad_train_file_is_named_not_the_test_file(workdir: Path) -> None:
    folder = write_gsm8k(fresh(workdir), train=b"\xff\xfe garbage")
    message = data_error("gsm8k", folder, folder / "train.jsonl", "UTF-16")
    assert "test.jsonl" not in message


def test_a_folder_where_train_jsonl_should_be(workdir: Path) -> None:
    folder = write_gsm8k(fresh(workdir))
    (folder / "train.jsonl").unlink()
    (folder / "train.jsonl").mkdir()
    data_error("gsm8k", folder, folder, "train.jsonl")


def test_crlf_bom_and_blank_lines_still_load(workdir: Path) -> None:
    """Harmless variations of a JSONL file are not errors."""
    lines = gsm8k_lines(GSM8K_TRAIN + GSM8K_VAL)
    lines[10:10] = ["", "   "]
    folder = write_gsm8k(fresh(workdir), train=b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    splits = load_splits("gsm8k", str(folder))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (GSM8K_TRAIN, GSM8K_VAL, 3)


def test_the_real_files_pass_the_checks() -> None:
    """The checks must not refuse the real data sets (read from the shared folder, never copied)."""
    if not (SHARED_DATA / "bbh").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    for task in TASKS:
        splits = load_splits(task, str(SHARED_DATA))
        assert splits.train and splits.val and splits.test


# --- property-based: random bytes, random JSON, one bad line among good ones ---------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["examples", "input", "target", "question", "answer", "x"]) | st.text(max_size=5),
        children, max_size=5),
    max_leaves=30,
)


@QUICK
@given(content=st.binary(max_size=4000))
def test_random_bytes_never_escape_as_another_error(workdir: Path, content: bytes) -> None:
    bbh = fresh(workdir) / "object_counting.json"
    bbh.write_bytes(content)
    data_error("object_counting", bbh)
    folder = write_gsm8k(fresh(workdir), test=content)
    with pytest.raises(DataError):
        load_splits("gsm8k", str(folder))


@QUICK
@given(document=JSON_VALUES | st.builds(lambda v: {"examples": v}, JSON_VALUES))
def test_random_json_documents_are_refused_by_name(workdir: Path, document: object) -> None:
    path = fresh(workdir) / "multistep_arithmetic_two.json"
    path.write_text(json.dumps(document))
    data_error("multistep_arithmetic_two", path)  # never 250 valid records by chance


NOT_A_RECORD = st.one_of(
    st.text(max_size=60).filter(lambda s: s.strip() and not _is_json_object(s)),
    st.builds(json.dumps, JSON_VALUES).filter(lambda s: not s.startswith("{")),
    st.builds(lambda d: json.dumps(d), st.dictionaries(st.sampled_from(["question", "x", "q"]), st.text(max_size=5))),
)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


@QUICK
@given(good=st.integers(0, 30), at=st.integers(0, 30), bad=NOT_A_RECORD)
def test_one_bad_line_is_reported_with_its_line_number(workdir: Path, good: int, at: int, bad: str) -> None:
    assume("\n" not in bad and "\r" not in bad and not set(bad) & set("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))
    lines = gsm8k_lines(good, "test")
    at = min(at, good)
    lines.insert(at, bad)
    folder = write_gsm8k(fresh(workdir), test="\n".join(lines).encode())
    data_error("gsm8k", folder, folder / "test.jsonl", f"line {at + 1} ")


WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.floats(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(""), st.just("  "),
                        st.integers())


@QUICK
@given(row=st.integers(0, BBH_SIZE - 1), field=st.sampled_from(["input", "target"]), value=WRONG_TYPES)
def test_a_field_of_the_wrong_type_is_refused_with_its_example(workdir: Path, row: int, field: str,
                                                              value: object) -> None:
    """The load stops at the record that is wrong, by its index, never with a pyarrow
    traceback: a number target among text targets is wrong too (one column, one type)."""
    records = bbh_records(BBH_SIZE + 10)
    records[row][field] = value
    path = fresh(workdir) / "object_counting.json"
    path.write_text(json.dumps({"examples": records}))
    message = data_error("object_counting", path)
    assert re.search(rf"example {row}\b", message), message


def test_number_targets_are_read_as_text_when_all_targets_are_numbers(workdir: Path) -> None:
    path = fresh(workdir) / "object_counting.json"
    path.write_text(json.dumps({"examples": [{"input": f"q{i}", "target": i} for i in range(BBH_SIZE)]}))
    assert load_splits("object_counting", str(path)).train[7].answer == "7"
    records = [{"input": f"q{i}", "target": i} for i in range(BBH_SIZE)]
    records[9]["target"] = "9"
    path = fresh(workdir) / "object_counting.json"
    path.write_text(json.dumps({"examples": records}))
    data_error("object_counting", path, None, "example 9: 'target' is a JSON string, but it is a number at")


@QUICK
@given(source=st.one_of(st.text(max_size=50), st.text(max_size=3).map(lambda s: "/" + "x" * 5000 + s),
                        st.sampled_from(["~nosuchuser-hostile/data", "\x00", "/proc/self/mem", "/dev/null", "."])))
def test_any_data_source_text_is_loaded_or_refused_by_name(source: str) -> None:
    assume(source.strip() != "hub")  # that one goes to the network: tested offline in test_data.py
    try:
        splits = load_splits("object_counting", source, synthetic_size=20)
    except ConfigError as error:
        assert error.setting == "data-source"
        return
    except DataError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(splits, Splits) and source.strip() == "synthetic"


# --- model replies --------------------------------------------------------------------------------


@QUICK
@given(reply=st.one_of(st.text(), st.text(alphabet=" \n\t:*Answer0123456789.-$,a")),
       task=st.sampled_from(sorted(TASKS)), target=st.sampled_from(["5", "-12", "3.5", "apple banana"]))
def test_any_reply_is_scored_without_raising(reply: str, task: str, target: str) -> None:
    spec = get_task(task)
    correct, malformed = spec.score(reply, target)
    assert isinstance(correct, bool) and isinstance(malformed, bool)
    answer = spec.extract_answer(reply)
    assert malformed == (answer is None)
    assert not (correct and malformed)
    if answer is not None:
        assert "\n" not in answer and answer == answer.strip()


NUMBERS = st.one_of(st.integers(-(10**12), 10**12).map(str),
                    st.decimals(-1000, 1000, places=2, allow_nan=False, allow_infinity=False).map(str))
WORDS = st.lists(st.from_regex(r"[a-z]{1,10}", fullmatch=True), min_size=1, max_size=12).map(" ".join)


@QUICK
@given(junk=st.text(max_size=200), number=NUMBERS, words=WORDS)
def test_a_well_formed_answer_after_any_junk_is_read(junk: str, number: str, words: str) -> None:
    """The parser is not merely silent: whatever came before, a final 'Answer:' line is read."""
    assume("answer" not in junk.lower())
    for task, target in (("object_counting", number), ("gsm8k", number), ("word_sorting", words)):
        assert get_task(task).score(f"{junk}\nAnswer: {target}", target) == (True, False), (task, target)


ADVERSARIAL_REPLIES: dict[str, Callable[[], str]] = {
    "answer-without-colon": lambda: "answer " * (MEGABYTE // 7),
    "answer-then-spaces": lambda: "answer" + " " * MEGABYTE,
    "many-answer-marks": lambda: "Answer: 1 " * (MEGABYTE // 10),
    "mark-then-one-long-line": lambda: "Answer: " + "a" * MEGABYTE,
    "digits": lambda: "Answer: " + "9" * MEGABYTE,
    "dotted-digits": lambda: "Answer: " + "1." * (MEGABYTE // 2),
    "minus-signs": lambda: "Answer: " + "-" * MEGABYTE + "1",
    "punctuation": lambda: "Answer: " + "&'-,$*" * (MEGABYTE // 6),
    "unicode-and-controls": lambda: "Answer: " + "ü\x00\u202e漢" * (MEGABYTE // 4),
    "newlines": lambda: "\n" * MEGABYTE + "Answer: 4",
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL_REPLIES))
def test_a_megabyte_reply_is_scored_quickly(case: str) -> None:
    reply = ADVERSARIAL_REPLIES[case]()
    assert len(reply) >= MEGABYTE - 16
    for task in sorted(TASKS):
        started = time.perf_counter()
        correct, malformed = get_task(task).score(reply, "4")
        elapsed = time.perf_counter() - started
        assert elapsed < SECONDS_PER_MEGABYTE_REPLY, f"{case} on {task} took {elapsed:.1f} s"
        assert malformed == (re.search(r"answer\s*:", reply, re.IGNORECASE) is None)
        assert correct == (case == "newlines"), (case, task)


def test_a_number_too_big_for_a_float_is_a_wrong_answer_not_a_crash() -> None:
    task = get_task("gsm8k")
    huge = "1" + "0" * 400
    assert task.score(f"Answer: {huge}", "5") == (False, False)
    assert task.score(f"Answer: {huge}", huge) == (True, False)
    assert task.score(f"Answer: -{huge}", huge) == (False, False)


def test_no_reply_at_all_is_malformed() -> None:
    for task in TASKS.values():
        assert task.score(None, "4") == (False, True)  # type: ignore[arg-type]
        assert task.score("", "4") == (False, True)
