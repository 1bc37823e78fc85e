"""An in-process stand-in for Flower's Grid that delivers real Messages to the real ClientApp.

Strategy tests need replies from clients, including error replies, without starting a
SuperLink (the end-to-end tests do that). Messages, records and error replies are
Flower's own objects; only the transport is replaced.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.client_app import app as client_app

ROOT = Path(__file__).resolve().parents[1]


def default_run_config(**overrides: object) -> dict[str, object]:
    """The run config exactly as pyproject.toml declares it, with test overrides."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        config = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    config.update(overrides)
    return config


class LoopbackGrid:
    """Delivers each message to the ClientApp of its destination node, in this process."""

    def __init__(self, run_config: dict[str, object], num_nodes: int = 3, failing: Iterable[int] = (),
                 node_overrides: dict[int, dict[str, object]] | None = None, silent: Iterable[int] = ()):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's identity
        self.run_config = run_config
        self.nodes = {
            100 + i: {"partition-id": i, "num-partitions": num_nodes, **(node_overrides or {}).get(i, {})}
            for i in range(num_nodes)
        }
        self.failing = {100 + i for i in failing}
        self.silent = {100 + i for i in silent}  # nodes whose replies never arrive (a timeout)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if node_id in self.silent:
                continue
            context = Context(run_id=1, node_id=node_id, node_config=self.nodes[node_id],
                              state=RecordDict(), run_config=self.run_config)
            try:
                if node_id in self.failing:
                    raise RuntimeError(f"LLM endpoint of node {node_id} refused the connection")
                replies.append(client_app(message, context))
            except Exception as exc:  # what Flower does with a ClientApp that raises
                replies.append(Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message))
        return replies
