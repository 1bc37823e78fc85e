"""Loading a task's examples and cutting them into the reference train/val/test splits.

Every file goes through the ``datasets`` library (local JSON as well as the Hub), so
local and online data are read by the same code. Whatever goes wrong inside
``datasets`` or pyarrow is re-raised as one plain-language ``DataError`` that names
the file and what was expected, because a pyarrow traceback tells a user nothing.

Results are cached in-process: in a Flower simulation several clients share one
process and all ask for the same task, and the data is read-only anyway.
"""

from __future__ import annotations

import os
import random
import re
import threading
from functools import cache
from pathlib import Path
from typing import Any

from fedtextgrad_core.data.checks import check_json_file, check_jsonl_file
from fedtextgrad_core.data.examples import Example, Splits, numbered
from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import TASKS, get_task
from fedtextgrad_core.errors import ConfigError, DataError

__all__ = ["BBH_URL", "GSM8K_HUB_NAME", "MAX_SYNTHETIC_SIZE", "largest_split", "load_splits"]

BBH_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/bbh/{task}.json"
GSM8K_HUB_NAME = ("openai/gsm8k", "main")

# Reference split of a BBH task (250 examples): train, val, test.
BBH_SIZE = 250
BBH_TRAIN, BBH_VAL, BBH_TEST = 50, 100, 100
# DSPy split of GSM8K: train and val come from the shuffled train file, test is all of the test file.
GSM8K_TRAIN, GSM8K_VAL = 200, 300
GSM8K_SHUFFLE_SEED = 0
# The FedTextGrad code's GSM8K split, cut from the same shuffles: train[:50], val train[200:300],
# test official_test[300:400], each question prefixed "Question: ".
GSM8K_SPLITS = ("textgrad", "fedtextgrad")
FEDTEXTGRAD_GSM8K = {"train": (0, 50), "val": (0, 100), "test": (300, 400)}  # slices of the textgrad split
QUESTION_PREFIX = "Question: "
MIN_SYNTHETIC_SIZE = 5  # smallest size that leaves at least one example in every split
# Largest synthetic data set: generating it takes seconds; a size like 2**62 would
# stall every client (and exhaust its memory) instead of failing at start.
MAX_SYNTHETIC_SIZE = 100_000

_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def load_splits(
    task: str,
    source: str | os.PathLike[str] = "synthetic",
    seed: int = 0,
    synthetic_size: int = 250,
    gsm8k_split: str = "textgrad",
) -> Splits:
    """The reference splits of ``task`` from ``source``.

    ``source`` is "synthetic" (seeded generator, no files), "hub" (download), or a
    local path: a BBH ``.json`` file, a GSM8K folder with ``train.jsonl`` and
    ``test.jsonl``, a folder holding ``<task>.json``, or a data folder holding
    ``bbh/<task>.json`` and/or ``gsm8k/``. ``seed`` and ``synthetic_size`` only
    matter for synthetic data: real data always gets the fixed reference split, so
    results stay comparable with the paper's.

    ``gsm8k_split`` picks GSM8K's split: TextGrad's DSPy split or the FedTextGrad code's smaller one.

    The lists returned are fresh copies, so a caller may shuffle them without
    disturbing the cached data other clients receive.
    """
    spec = get_task(task)
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ConfigError("data-source", source, "'synthetic', 'hub' or the path of a data file or folder")
    source = str(source).strip() if isinstance(source, str) else os.fspath(source)

    if source == "synthetic":
        if not spec.synthetic:
            raise ConfigError(
                "data-source", "synthetic",
                f"a data folder or 'hub' for {task} (the synthetic generator covers "
                "object_counting, word_sorting, multistep_arithmetic_two)",
            )
        size_ok = isinstance(synthetic_size, int) and not isinstance(synthetic_size, bool)
        if not size_ok or not MIN_SYNTHETIC_SIZE <= synthetic_size <= MAX_SYNTHETIC_SIZE:
            raise ConfigError(
                "synthetic-size", synthetic_size,
                f"a whole number from {MIN_SYNTHETIC_SIZE} to {MAX_SYNTHETIC_SIZE} (20% train, 40% val, 40% test)",
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("seed", seed, "a whole number")
        cached = _synthetic_splits(task, seed, synthetic_size)
    elif source == "hub":
        cached = _real_splits(task, "hub")
    else:
        cached = _real_splits(task, str(_local_path(source)))
    train, val, test = cached
    if task == "gsm8k" and gsm8k_split == "fedtextgrad":
        def cut(examples: tuple[Example, ...], part: str) -> list[Example]:
            start, end = FEDTEXTGRAD_GSM8K[part]
            return [Example(QUESTION_PREFIX + e.question, e.answer) for e in examples[start:end]]

        return Splits(task=task, train=numbered(task, "train", cut(train, "train")),
                      val=numbered(task, "val", cut(val, "val")), test=numbered(task, "test", cut(test, "test")))
    if gsm8k_split not in GSM8K_SPLITS:
        raise ConfigError("gsm8k-split", gsm8k_split, ", ".join(GSM8K_SPLITS))
    return Splits(task=task, train=numbered(task, "train", train), val=numbered(task, "val", val),
                  test=numbered(task, "test", test))


def largest_split(task: str, split: str, synthetic_size: int, gsm8k_split: str) -> int:
    """The most examples a split of ``task`` can hold from any source: the reference split of the real
    data or the synthetic split, whichever is larger; GSM8K's TextGrad test split is the whole test file,
    of any size, so only MAX_SYNTHETIC_SIZE bounds it. What the server knows of a client's data."""
    n_train, n_val = synthetic_size // 5, 2 * synthetic_size // 5
    synthetic = {"train": n_train, "val": n_val, "test": synthetic_size - n_train - n_val}[split]
    if task == "gsm8k":
        if gsm8k_split == "fedtextgrad":
            start, end = FEDTEXTGRAD_GSM8K[split]
            real = end - start
        else:
            real = {"train": GSM8K_TRAIN, "val": GSM8K_VAL, "test": MAX_SYNTHETIC_SIZE}[split]
    else:
        real = {"train": BBH_TRAIN, "val": BBH_VAL, "test": BBH_TEST}[split]
    return max(real, synthetic)


def _local_path(source: str) -> Path:
    """The existing file or folder ``source`` names, or a DataError saying why not.

    The OS can refuse a path before looking (too long, a NUL byte, '~user' for an
    unknown user, no permission): that is a bad data-source too, not a crash.
    """
    try:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data-source path {source!r} does not exist")
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DataError(f"data-source path {source[:200]!r} cannot be used: {reason}") from exc


# --- cached loaders (they return tuples, so the cached values cannot be changed) ---

_Cached = tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]
_load_lock = threading.Lock()  # one read per (task, source) even when clients start together


@cache
def _synthetic_splits(task: str, seed: int, size: int) -> _Cached:
    examples = generate(task, size, seed)
    n_train, n_val = size // 5, 2 * size // 5
    return (
        tuple(examples[:n_train]),
        tuple(examples[n_train:n_train + n_val]),
        tuple(examples[n_train + n_val:]),
    )


def _real_splits(task: str, source: str) -> _Cached:
    with _load_lock:
        return _real_splits_cached(task, source)


@cache
def _real_splits_cached(task: str, source: str) -> _Cached:
    if task == "gsm8k":
        if source == "hub":
            train, test = _gsm8k_hub()
        else:
            train_file, test_file = _find_gsm8k(Path(source))
            train, test = _gsm8k_files(train_file, test_file)
        return _gsm8k_split(train, test, describe=source)
    if source == "hub":
        location = BBH_URL.format(task=task)
    else:
        bbh_file = _find_bbh(Path(source), task)
        check_json_file(bbh_file, "examples", {"input": (str,), "target": (str, int)}, _BBH_EXPECTED)
        location = str(bbh_file)
    return _bbh_split(_check_targets(task, _bbh_records(location), location), describe=location)


def _check_targets(task: str, examples: list[Example], location: str) -> list[Example]:
    """Refuse data whose targets the task cannot score (a word where object counting needs a number):
    training on them would only ever teach from wrong scores."""
    spec = get_task(task)
    for index, example in enumerate(examples):
        if spec.normalize(example.answer) is None:
            kind = "a number" if spec.answer_kind == "number" else "words"
            raise DataError(f"record {index} in '{location}' has the target {example.answer[:80]!r}, which "
                            f"{task} cannot score; expected {kind}",
                            shared=f"record {index} of this site's {task} data has a target {task} cannot score; "
                                   f"expected {kind} (the site's log names the file and the value)")
    return examples


# --- BIG-Bench Hard ------------------------------------------------------------------


def _find_bbh(path: Path, task: str) -> Path:
    """The ``<task>.json`` that ``path`` designates (the file itself or one inside it)."""
    if path.is_file():
        stem = path.stem
        if stem != task and stem in TASKS:
            raise DataError(f"data file '{path}' holds the {stem} task, but the task is {task}")
        return path
    candidates = [path / "bbh" / f"{task}.json", path / f"{task}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"no {task} data in folder '{path}': expected {' or '.join(repr(str(c)) for c in candidates)}"
    )


_BBH_EXPECTED = "a JSON object with an 'examples' list of {\"input\", \"target\"} records"


def _bbh_records(location: str) -> list[Example]:
    expected = _BBH_EXPECTED
    table = _load_json(location, expected, field="examples")["train"]
    columns = _columns(table, location, ("input", "target"), expected)
    examples: list[Example] = []
    for row, (question, target) in enumerate(zip(columns["input"], columns["target"])):
        if isinstance(target, int) and not isinstance(target, bool):
            target = str(target)
        if not isinstance(question, str) or not isinstance(target, str) or not question.strip() or not target.strip():
            raise DataError(f"example {row} in '{location}' has no text 'input' or 'target'; expected {expected}")
        examples.append(Example(question=question, answer=target.strip()))
    return examples


def _bbh_split(examples: list[Example], describe: str) -> _Cached:
    if len(examples) < BBH_SIZE:
        raise DataError(
            f"'{describe}' has {len(examples)} examples, but the reference split needs {BBH_SIZE} "
            f"({BBH_TRAIN} train, {BBH_VAL} val, {BBH_TEST} test)"
        )
    return (
        tuple(examples[:BBH_TRAIN]),
        tuple(examples[BBH_TRAIN:BBH_TRAIN + BBH_VAL]),
        tuple(examples[-BBH_TEST:]),
    )


# --- GSM8K ---------------------------------------------------------------------------


def _find_gsm8k(path: Path) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl`` in ``path`` or in ``path/gsm8k``."""
    if path.is_file():
        raise DataError(f"gsm8k needs a folder with train.jsonl and test.jsonl, but '{path}' is a file")
    for folder in (path, path / "gsm8k"):
        train, test = folder / "train.jsonl", folder / "test.jsonl"
        if train.is_file() and test.is_file():
            return train, test
        if train.is_file() or test.is_file():
            missing = test if train.is_file() else train
            raise DataError(f"gsm8k folder '{folder}' has no {missing.name}; it needs train.jsonl and test.jsonl")
    raise DataError(
        f"no gsm8k data in folder '{path}': expected train.jsonl and test.jsonl in it or in '{path / 'gsm8k'}'"
    )


_GSM8K_EXPECTED = "JSON lines of {\"question\", \"answer\"} with the final number after '####'"


def _gsm8k_files(train_file: Path, test_file: Path) -> tuple[list[Example], list[Example]]:
    # Read separately so that an error names the one file that is wrong.
    for file in (train_file, test_file):
        check_jsonl_file(file, {"question": (str,), "answer": (str,)}, _GSM8K_EXPECTED)
    train = _gsm8k_records(_load_json(str(train_file), _GSM8K_EXPECTED)["train"], str(train_file))
    test = _gsm8k_records(_load_json(str(test_file), _GSM8K_EXPECTED)["train"], str(test_file))
    return train, test


def _gsm8k_hub() -> tuple[list[Example], list[Example]]:
    import datasets

    datasets.disable_progress_bars()
    name, config = GSM8K_HUB_NAME
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # network, Hub or parsing failure: one line for the user
        raise DataError(f"could not load gsm8k from the Hub ({name}, {config}): {_root_cause(exc)}"
                        + _offline_hint(exc)) from exc
    where = f"the Hub dataset {name}"
    if "train" not in loaded or "test" not in loaded:
        raise DataError(f"{where} has no train and test splits")
    return (
        _gsm8k_records(loaded["train"], f"{where} (train)"),
        _gsm8k_records(loaded["test"], f"{where} (test)"),
    )


def _gsm8k_records(table: Any, location: str) -> list[Example]:
    columns = _columns(table, location, ("question", "answer"), _GSM8K_EXPECTED)
    examples: list[Example] = []
    for row, (question, answer) in enumerate(zip(columns["question"], columns["answer"])):
        if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
            raise DataError(f"record {row} in '{location}' is not in the GSM8K format; expected {_GSM8K_EXPECTED}")
        target = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not _GSM8K_NUMBER.fullmatch(target):
            raise DataError(f"record {row} in '{location}' has {target!r} after '####'; expected a number",
                            shared=f"record {row} of this site's gsm8k data has no number after '####' "
                                   "(the site's log names the file and the value)")
        examples.append(Example(question=question, answer=target))
    return examples


def _gsm8k_split(train: list[Example], test: list[Example], describe: str) -> _Cached:
    needed = GSM8K_TRAIN + GSM8K_VAL
    if len(train) < needed:
        raise DataError(
            f"the gsm8k training data in '{describe}' has {len(train)} examples, but the reference split "
            f"needs {needed} ({GSM8K_TRAIN} train, {GSM8K_VAL} val)"
        )
    if not test:
        raise DataError(f"the gsm8k test data in '{describe}' is empty")
    train, test = list(train), list(test)
    random.Random(GSM8K_SHUFFLE_SEED).shuffle(train)
    random.Random(GSM8K_SHUFFLE_SEED).shuffle(test)
    return tuple(train[:GSM8K_TRAIN]), tuple(train[GSM8K_TRAIN:needed]), tuple(test)


# --- reading through datasets --------------------------------------------------------


def _load_json(location: str, expected: str, field: str | None = None) -> Any:
    """``datasets.load_dataset("json", ...)`` with any failure turned into a DataError."""
    import datasets  # imported here: it is slow to import and synthetic runs never need it

    datasets.disable_progress_bars()  # a progress bar inside the server's round table helps no one

    kwargs = {"field": field} if field else {}
    try:
        return datasets.load_dataset("json", data_files=location, **kwargs)
    except Exception as exc:  # datasets and pyarrow raise many types; the user needs one line
        hint = _offline_hint(exc) if location.startswith(("http://", "https://")) else ""
        if hint:
            raise DataError(f"could not download '{location}': {_root_cause(exc)}{hint}") from exc
        raise DataError(f"could not read '{location}': expected {expected} ({_root_cause(exc)})") from exc


def _columns(table: Any, location: str, names: tuple[str, ...], expected: str) -> dict[str, list[Any]]:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise DataError(
            f"the records in '{location}' have no {' or '.join(repr(m) for m in missing)} field; expected {expected}"
        )
    if table.num_rows == 0:
        raise DataError(f"'{location}' has no records; expected {expected}")
    return {name: list(table[name]) for name in names}


_OFFLINE = ("Name or service not known", "Temporary failure in name resolution", "Network is unreachable",
            "Failed to resolve", "Connection refused", "No route to host", "nodename nor servname",
            "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled", "Couldn't reach")


def _offline_hint(exc: BaseException) -> str:
    """'; the network is unreachable ...' when the failure was the network's, else ''."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if any(marker in text for text in chain for marker in _OFFLINE):
        return ("; the network is unreachable from here (offline?): set data-source to a local file or "
                "folder instead of 'hub'")
    return ""


def _root_cause(exc: BaseException) -> str:
    """The innermost error's type and message on one short line (the useful part)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
