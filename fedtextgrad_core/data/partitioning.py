"""Which examples each client of the federation holds.

Every client computes its own share from the same seed, so no one has to ship data
around and all clients agree on who holds what without talking to each other.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from fedtextgrad_core.data.examples import Example, Splits
from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError

__all__ = ["PARTITIONINGS", "ClientData", "client_data", "partition"]

PARTITIONINGS = ("homogeneous", "heterogeneous", "centralized")

_T = TypeVar("_T")


@dataclass(frozen=True)
class ClientData:
    """The examples one client trains, validates and tests on, all of one task."""

    task: str
    train: list[Example]
    val: list[Example]
    test: list[Example]


def partition(splits: Splits, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    """Client ``partition_id``'s share of ``splits`` when they are dealt out evenly.

    Each split is shuffled with ``random.Random(seed)`` and cut into ``num_partitions``
    contiguous runs whose sizes differ by at most one, so every example goes to exactly
    one client and the clients' shares are statistically alike (the homogeneous case).
    """
    _check_ids(partition_id, num_partitions)
    if num_partitions > len(splits.train):
        raise ConfigError(
            "num-partitions", num_partitions,
            f"at most {len(splits.train)}, the number of training examples of {splits.task} "
            "(every client needs at least one)",
        )
    rng = random.Random(seed)
    return ClientData(
        task=splits.task,
        train=_share(splits.train, partition_id, num_partitions, rng),
        val=_share(splits.val, partition_id, num_partitions, rng),
        test=_share(splits.test, partition_id, num_partitions, rng),
    )


def client_data(
    partitioning: str,
    tasks: list[str] | str,
    partition_id: int,
    num_partitions: int,
    source: str,
    seed: int,
    synthetic_size: int = 250,
    val_limit: int = 0,
    test_limit: int = 0,
    gsm8k_split: str = "textgrad",
) -> ClientData:
    """The data of client ``partition_id`` under the chosen ``partitioning``.

    - homogeneous: one task, its splits dealt out evenly (see ``partition``);
    - heterogeneous: client i holds all of ``tasks[i]``, one task per client;
    - centralized: every client holds all of the single task (the server then samples
      just one client, which makes it the non-federated baseline).

    ``val_limit``/``test_limit`` (0: all) keep only the first examples of a task's validation and
    test splits before they are dealt out: a smaller, fixed subset where scoring is slow (a CPU).
    """
    if partitioning not in PARTITIONINGS:
        raise ConfigError("partitioning", partitioning, "homogeneous, heterogeneous or centralized")
    _check_ids(partition_id, num_partitions)
    if isinstance(tasks, str):  # the run config writes a task list as "a,b,c"
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    tasks = list(tasks)
    for name in tasks:
        get_task(name)  # every client rejects a bad name, not just the one assigned it

    if partitioning == "heterogeneous":
        if len(tasks) != num_partitions:
            raise ConfigError(
                "heterogeneous-tasks", ",".join(tasks),
                f"one task per client: it lists {len(tasks)} task(s) but the federation has "
                f"{num_partitions} clients",
            )
        return _whole(limit(load_splits(tasks[partition_id], source, seed, synthetic_size, gsm8k_split), val_limit,
                            test_limit))

    if len(tasks) != 1:
        raise ConfigError("task", ",".join(tasks), f"exactly one task for {partitioning} partitioning")
    splits = limit(load_splits(tasks[0], source, seed, synthetic_size, gsm8k_split), val_limit, test_limit)
    if partitioning == "centralized":
        return _whole(splits)
    return partition(splits, partition_id, num_partitions, seed)


def limit(splits: Splits, val_limit: int, test_limit: int) -> Splits:
    """The splits with only the first ``val_limit``/``test_limit`` validation/test examples (0: all)."""
    return Splits(task=splits.task, train=splits.train, val=splits.val[:val_limit] if val_limit else splits.val,
                  test=splits.test[:test_limit] if test_limit else splits.test)


def _whole(splits: Splits) -> ClientData:
    return ClientData(task=splits.task, train=list(splits.train), val=list(splits.val), test=list(splits.test))


def _share(items: Sequence[_T], partition_id: int, num_partitions: int, rng: random.Random) -> list[_T]:
    order = list(range(len(items)))
    rng.shuffle(order)
    base, extra = divmod(len(items), num_partitions)
    start = partition_id * base + min(partition_id, extra)
    end = start + base + (1 if partition_id < extra else 0)
    return [items[i] for i in order[start:end]]


def _check_ids(partition_id: int, num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError("num-partitions", num_partitions, "a whole number of clients, 1 or more")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            "partition-id", partition_id,
            f"a whole number from 0 to {num_partitions - 1} (num-partitions is {num_partitions})",
        )
