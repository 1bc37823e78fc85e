"""Partitioning: every example with exactly one client, reproducibly, and plain errors."""

from __future__ import annotations

from collections import Counter

import pytest

from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.partitioning import (
    PARTITIONINGS,
    ClientData,
    client_data,
    partition,
)
from fedtextgrad_core.errors import ConfigError
from tests import SHARED_DATA

TASKS3 = ["object_counting", "word_sorting", "multistep_arithmetic_two"]


def _all_clients(splits, num_partitions: int, seed: int) -> list[ClientData]:
    return [partition(splits, i, num_partitions, seed) for i in range(num_partitions)]


@pytest.mark.parametrize("num_partitions", [1, 3, 7, 50])
def test_homogeneous_shares_are_disjoint_even_and_complete(num_partitions):
    splits = load_splits("word_sorting", "synthetic", seed=2)
    clients = _all_clients(splits, num_partitions, seed=2)
    for name in ("train", "val", "test"):
        whole = getattr(splits, name)
        shares = [getattr(c, name) for c in clients]
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1, (name, sizes)
        combined = Counter(e for share in shares for e in share)
        assert combined == Counter(whole), f"{name}: every example must be with exactly one client"
    assert all(c.task == "word_sorting" for c in clients)


def test_homogeneous_is_reproducible_and_seeded():
    splits = load_splits("object_counting", "synthetic", seed=0)
    assert _all_clients(splits, 4, seed=5) == _all_clients(splits, 4, seed=5)
    other = _all_clients(splits, 4, seed=6)
    assert [c.train for c in other] != [c.train for c in _all_clients(splits, 4, seed=5)]


def test_homogeneous_mixes_the_split_rather_than_cutting_it_in_order():
    splits = load_splits("multistep_arithmetic_two", "synthetic", seed=0)
    first = partition(splits, 0, 2, seed=0)
    assert first.train != splits.train[: len(first.train)]


def test_client_data_homogeneous_matches_partition():
    via_config = client_data("homogeneous", ["word_sorting"], 1, 3, "synthetic", seed=4)
    direct = partition(load_splits("word_sorting", "synthetic", seed=4), 1, 3, seed=4)
    assert via_config == direct
    assert client_data("homogeneous", "word_sorting", 1, 3, "synthetic", seed=4) == direct  # "a,b" config form


def test_synthetic_size_reaches_the_generator():
    small = client_data("homogeneous", ["object_counting"], 0, 2, "synthetic", seed=0, synthetic_size=20)
    assert (len(small.train), len(small.val), len(small.test)) == (2, 4, 4)


def test_more_clients_than_training_examples():
    splits = load_splits("object_counting", "synthetic", seed=0)
    with pytest.raises(ConfigError) as info:
        partition(splits, 0, 51, seed=0)
    assert info.value.setting == "num-partitions" and info.value.value == 51
    assert "50" in str(info.value)


def test_heterogeneous_gives_each_client_one_whole_task():
    for i, task in enumerate(TASKS3):
        got = client_data("heterogeneous", TASKS3, i, 3, "synthetic", seed=1)
        expected = load_splits(task, "synthetic", seed=1)
        assert (got.task, got.train, got.val, got.test) == (task, expected.train, expected.val, expected.test)
    listed = "object_counting, word_sorting,multistep_arithmetic_two"  # as the run config writes it
    as_text = client_data("heterogeneous", listed, 1, 3, "synthetic", 1)
    assert as_text.task == "word_sorting"


def test_heterogeneous_needs_one_task_per_client():
    with pytest.raises(ConfigError) as info:
        client_data("heterogeneous", TASKS3, 0, 2, "synthetic", seed=0)
    assert info.value.setting == "heterogeneous-tasks"
    assert "3 task" in str(info.value) and "2 clients" in str(info.value)


def test_heterogeneous_rejects_a_bad_task_name_on_every_client():
    with pytest.raises(ConfigError) as info:
        client_data("heterogeneous", ["object_counting", "chess"], 0, 2, "synthetic", seed=0)
    assert info.value.setting == "task" and info.value.value == "chess"


def test_centralized_gives_every_client_everything():
    whole = load_splits("multistep_arithmetic_two", "synthetic", seed=3)
    for i in range(3):
        got = client_data("centralized", ["multistep_arithmetic_two"], i, 3, "synthetic", seed=3)
        assert (got.train, got.val, got.test) == (whole.train, whole.val, whole.test)


@pytest.mark.parametrize("partitioning", ["homogeneous", "centralized"])
def test_single_task_partitionings_need_exactly_one_task(partitioning):
    with pytest.raises(ConfigError) as info:
        client_data(partitioning, ["object_counting", "word_sorting"], 0, 2, "synthetic", seed=0)
    assert info.value.setting == "task"
    with pytest.raises(ConfigError):
        client_data(partitioning, [], 0, 2, "synthetic", seed=0)


def test_unknown_partitioning():
    with pytest.raises(ConfigError) as info:
        client_data("random", ["object_counting"], 0, 2, "synthetic", seed=0)
    assert info.value.setting == "partitioning" and info.value.value == "random"
    assert "homogeneous, heterogeneous or centralized" in str(info.value)
    assert PARTITIONINGS == ("homogeneous", "heterogeneous", "centralized")


@pytest.mark.parametrize("partition_id, num_partitions", [(3, 3), (-1, 3), (0, 0)])
def test_partition_id_out_of_range(partition_id, num_partitions):
    splits = load_splits("object_counting", "synthetic", seed=0)
    with pytest.raises(ConfigError) as info:
        partition(splits, partition_id, num_partitions, seed=0)
    assert info.value.setting in ("partition-id", "num-partitions")
    with pytest.raises(ConfigError):
        client_data("centralized", ["object_counting"], partition_id, num_partitions, "synthetic", seed=0)


def test_real_gsm8k_homogeneous():
    if not (SHARED_DATA / "gsm8k").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    clients = [client_data("homogeneous", ["gsm8k"], i, 3, str(SHARED_DATA), seed=0) for i in range(3)]
    assert [len(c.train) for c in clients] == [67, 67, 66]
    assert [len(c.val) for c in clients] == [100, 100, 100]
    assert sum(len(c.test) for c in clients) == 1319
    questions = [e.question for c in clients for e in c.test]
    assert len(set(questions)) == len(questions)
