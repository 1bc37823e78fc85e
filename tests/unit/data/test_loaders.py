"""Loading data: the reference splits of the real files, synthetic splits, and plain errors.

Expected values are computed here straight from the raw files with ``json``, not with
``datasets``, so the loader is checked against an independent reading.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fedtextgrad_core.data import loaders as data
from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.loaders import BBH_URL, load_splits
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, DataError
from tests import SHARED_DATA

BBH_TASKS = ("object_counting", "word_sorting", "multistep_arithmetic_two")


@pytest.fixture
def data_dir() -> Path:
    if not (SHARED_DATA / "bbh").is_dir() or not (SHARED_DATA / "gsm8k").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def _raw_bbh(task: str) -> list[dict]:
    return json.loads((SHARED_DATA / "bbh" / f"{task}.json").read_text())["examples"]


def _raw_gsm8k(split: str) -> list[dict]:
    lines = (SHARED_DATA / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _write_bbh(path: Path, count: int) -> Path:
    examples = [{"input": f"question {i}", "target": str(i)} for i in range(count)]
    path.write_text(json.dumps({"canary": "x", "examples": examples}))
    return path


def _write_gsm8k(folder: Path, train: int, test: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        rows = [{"question": f"{name} q{i}?", "answer": f"work\n#### {i},{i % 10}00"} for i in range(count)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# --- real files --------------------------------------------------------------------


@pytest.mark.parametrize("task", BBH_TASKS)
def test_bbh_reference_split(data_dir, task):
    raw = _raw_bbh(task)
    splits = load_splits(task, str(data_dir))
    assert splits.task == task
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 100, 100)
    assert splits.train[0] == Example(raw[0]["input"], raw[0]["target"])
    assert splits.train[-1] == Example(raw[49]["input"], raw[49]["target"])
    assert splits.val[0] == Example(raw[50]["input"], raw[50]["target"])
    assert splits.test[0] == Example(raw[150]["input"], raw[150]["target"])
    assert splits.test[-1] == Example(raw[-1]["input"], raw[-1]["target"])


@pytest.mark.parametrize("task", BBH_TASKS)
def test_bbh_file_and_bbh_folder_give_the_same_splits(data_dir, task):
    from_root = load_splits(task, data_dir)  # a Path works as well as a str
    assert load_splits(task, str(data_dir / "bbh" / f"{task}.json")) == from_root
    assert load_splits(task, str(data_dir / "bbh")) == from_root


def test_gsm8k_dspy_split(data_dir):
    train, test = _raw_gsm8k("train"), _raw_gsm8k("test")
    random.Random(0).shuffle(train)
    random.Random(0).shuffle(test)

    def target(record: dict) -> str:
        return record["answer"].split("####")[-1].strip().replace(",", "")

    splits = load_splits("gsm8k", str(data_dir))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (200, 300, 1319)
    assert splits.train[0] == Example(train[0]["question"], target(train[0]))
    assert splits.val[0] == Example(train[200]["question"], target(train[200]))
    assert splits.val[-1] == Example(train[499]["question"], target(train[499]))
    assert splits.test[0] == Example(test[0]["question"], target(test[0]))
    assert splits.test[-1] == Example(test[-1]["question"], target(test[-1]))
    assert load_splits("gsm8k", str(data_dir / "gsm8k")) == splits


def test_gsm8k_targets_drop_commas(data_dir):
    with_comma = [r for r in _raw_gsm8k("test") if "," in r["answer"].split("####")[-1]]
    assert with_comma, "the test file is expected to have answers like '#### 1,000'"
    questions = {e.question: e.answer for e in load_splits("gsm8k", str(data_dir)).test}
    for record in with_comma:
        assert questions[record["question"]] == record["answer"].split("####")[-1].strip().replace(",", "")


@pytest.mark.parametrize("task", BBH_TASKS + ("gsm8k",))
def test_every_real_target_scores_correct(data_dir, task):
    splits = load_splits(task, str(data_dir))
    scorer = get_task(task)
    for example in splits.train + splits.val + splits.test:
        assert scorer.score("Some reasoning.\nAnswer: " + example.answer, example.answer) == (True, False), example


def test_returned_lists_are_copies_of_the_cache(data_dir):
    first = load_splits("word_sorting", str(data_dir))
    expected = list(first.train)
    first.train.clear()
    first.test.reverse()
    again = load_splits("word_sorting", str(data_dir))
    assert again.train == expected
    assert again.test[-1].question == _raw_bbh("word_sorting")[-1]["input"]


# --- synthetic ---------------------------------------------------------------------


@pytest.mark.parametrize("size, sizes", [(250, (50, 100, 100)), (10, (2, 4, 4)), (7, (1, 2, 4)), (5, (1, 2, 2))])
def test_synthetic_split_fractions(size, sizes):
    splits = load_splits("object_counting", "synthetic", seed=1, synthetic_size=size)
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    everything = splits.train + splits.val + splits.test
    assert len({e.question for e in everything}) == size


def test_synthetic_is_seeded():
    a = load_splits("multistep_arithmetic_two", "synthetic", seed=0)
    assert a == load_splits("multistep_arithmetic_two", seed=0)
    assert a.train != load_splits("multistep_arithmetic_two", "synthetic", seed=1).train


def test_gsm8k_has_no_synthetic_data():
    with pytest.raises(ConfigError) as info:
        load_splits("gsm8k", "synthetic")
    assert info.value.setting == "data-source"
    assert "'hub'" in str(info.value) and "object_counting" in str(info.value)


@pytest.mark.parametrize("size", [0, 4, -3, "250"])
def test_bad_synthetic_size(size):
    with pytest.raises(ConfigError) as info:
        load_splits("word_sorting", "synthetic", synthetic_size=size)
    assert info.value.setting == "synthetic-size"


def test_unknown_task_and_empty_source():
    with pytest.raises(ConfigError) as info:
        load_splits("sudoku")
    assert info.value.setting == "task"
    with pytest.raises(ConfigError) as info:
        load_splits("word_sorting", "  ")
    assert info.value.setting == "data-source"


# --- local files in other layouts and bad input --------------------------------------


def test_small_valid_layouts(tmp_path):
    bbh = _write_bbh(tmp_path / "word_sorting.json", 260)
    splits = load_splits("word_sorting", str(bbh))
    assert [e.answer for e in splits.train] == [str(i) for i in range(50)]
    assert [e.answer for e in splits.val] == [str(i) for i in range(50, 150)]
    assert [e.answer for e in splits.test] == [str(i) for i in range(160, 260)]
    assert load_splits("word_sorting", str(tmp_path)) == splits  # folder holding <task>.json

    folder = _write_gsm8k(tmp_path / "gsm8k", train=520, test=7)
    gsm = load_splits("gsm8k", str(folder))
    assert (len(gsm.train), len(gsm.val), len(gsm.test)) == (200, 300, 7)
    assert all("," not in e.answer for e in gsm.train + gsm.test)
    assert {e.answer for e in gsm.test} == {f"{i}{i % 10}00" for i in range(7)}
    assert load_splits("gsm8k", str(tmp_path)) == gsm  # data folder holding gsm8k/


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"data-source path '.*nowhere' does not exist"):
        load_splits("object_counting", str(missing))


def _data_error(task: str, source: Path) -> str:
    with pytest.raises(DataError) as info:
        load_splits(task, str(source))
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    assert "Traceback" not in message
    return message


def test_bbh_file_that_is_not_json(tmp_path):
    bad = tmp_path / "object_counting.json"
    bad.write_text("this is { not json")
    message = _data_error("object_counting", bad)
    assert str(bad) in message and "'examples'" in message


def test_bbh_error_keeps_the_cause_for_debugging(tmp_path):
    bad = tmp_path / "object_counting.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(DataError) as info:
        load_splits("object_counting", str(bad))
    assert info.value.__cause__ is not None
    assert not isinstance(info.value.__cause__, DataError)


def test_bbh_json_without_examples(tmp_path):
    bad = tmp_path / "object_counting.json"
    bad.write_text(json.dumps({"canary": "x", "questions": [{"input": "a", "target": "1"}]}))
    message = _data_error("object_counting", bad)
    assert str(bad) in message and "examples" in message


def test_bbh_records_without_target(tmp_path):
    bad = tmp_path / "object_counting.json"
    bad.write_text(json.dumps({"examples": [{"input": f"q{i}", "answer": "1"} for i in range(260)]}))
    message = _data_error("object_counting", bad)
    assert str(bad) in message and "'target'" in message


def test_bbh_record_with_missing_input(tmp_path):
    bad = tmp_path / "object_counting.json"
    records = [{"input": f"q{i}", "target": "1"} for i in range(260)]
    records[7] = {"target": "1"}
    bad.write_text(json.dumps({"examples": records}))
    message = _data_error("object_counting", bad)
    assert str(bad) in message and "example 7" in message


def test_bbh_file_too_small(tmp_path):
    small = _write_bbh(tmp_path / "multistep_arithmetic_two.json", 120)
    message = _data_error("multistep_arithmetic_two", small)
    assert str(small) in message and "120" in message and "250" in message


def test_bbh_empty_examples(tmp_path):
    empty = tmp_path / "word_sorting.json"
    empty.write_text(json.dumps({"examples": []}))
    assert str(empty) in _data_error("word_sorting", empty)


def test_folder_without_the_task(tmp_path):
    _write_bbh(tmp_path / "word_sorting.json", 250)
    message = _data_error("object_counting", tmp_path)
    assert str(tmp_path) in message and "object_counting.json" in message


def test_file_of_another_task(tmp_path):
    other = _write_bbh(tmp_path / "word_sorting.json", 250)
    message = _data_error("object_counting", other)
    assert str(other) in message and "word_sorting" in message


def test_gsm8k_folder_missing_test_file(tmp_path):
    folder = _write_gsm8k(tmp_path / "g", train=600, test=3)
    (folder / "test.jsonl").unlink()
    message = _data_error("gsm8k", folder)
    assert "test.jsonl" in message and str(folder) in message


def test_gsm8k_given_a_file(tmp_path):
    folder = _write_gsm8k(tmp_path / "g", train=600, test=3)
    message = _data_error("gsm8k", folder / "train.jsonl")
    assert "folder" in message and "train.jsonl" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"question": "q?", "answer": "no final number"}', "####"),
        ('{"question": "q?", "answer": "#### many"}', "'many'"),
        ('{"prompt": "q?", "answer": "#### 4"}', "'question'"),
        ("not json at all", "question"),
    ],
)
def test_gsm8k_bad_lines(tmp_path, line, expected):
    folder = _write_gsm8k(tmp_path / "g", train=600, test=3)
    (folder / "test.jsonl").write_text(line + "\n")
    message = _data_error("gsm8k", folder)
    assert str(folder / "test.jsonl") in message and expected in message


def test_gsm8k_too_few_training_examples(tmp_path):
    folder = _write_gsm8k(tmp_path / "g", train=80, test=3)
    message = _data_error("gsm8k", folder)
    assert "80" in message and "500" in message


# --- the Hub (the network is replaced: tests stay offline) ---------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls: list[tuple[tuple, dict]] = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "json":
            rows = [{"input": f"q{i}", "target": str(i)} for i in range(250)]
            return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
        rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(600)]
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:9])}
        )

    data._real_splits_cached.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    yield calls
    data._real_splits_cached.cache_clear()  # forget the fake data


def test_hub_sources(fake_hub):
    bbh = load_splits("object_counting", "hub")
    assert fake_hub[-1] == (("json",), {"data_files": BBH_URL.format(task="object_counting"), "field": "examples"})
    assert "suzgunmirac/BIG-Bench-Hard/main/bbh/object_counting.json" in fake_hub[-1][1]["data_files"]
    assert (len(bbh.train), len(bbh.val), len(bbh.test)) == (50, 100, 100)

    gsm = load_splits("gsm8k", "hub")
    assert fake_hub[-1] == (("openai/gsm8k", "main"), {})
    assert (len(gsm.train), len(gsm.val), len(gsm.test)) == (200, 300, 9)

    load_splits("gsm8k", "hub")
    assert len(fake_hub) == 2, "a second load must come from the in-process cache"


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach huggingface.co")

    data._real_splits_cached.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"gsm8k.*Couldn't reach"):
        load_splits("gsm8k", "hub")
    with pytest.raises(DataError, match="BIG-Bench-Hard"):
        load_splits("word_sorting", "hub")


def test_gsm8k_fedtextgrad_split_is_the_reference_codes(data_dir):
    """train[:50], val train[200:300], test official_test[300:400] of the same shuffles, 'Question: ' first."""
    dspy = load_splits("gsm8k", str(data_dir))
    small = load_splits("gsm8k", str(data_dir), gsm8k_split="fedtextgrad")
    assert (len(small.train), len(small.val), len(small.test)) == (50, 100, 100)
    assert small.train[0] == Example("Question: " + dspy.train[0].question, dspy.train[0].answer)
    assert small.val[-1] == Example("Question: " + dspy.val[99].question, dspy.val[99].answer)
    assert small.test[0] == Example("Question: " + dspy.test[300].question, dspy.test[300].answer)
    assert small.test[-1].answer == dspy.test[399].answer
