"""An in-process stand-in for Flower's Grid that delivers real Messages to the real ClientApp.

Strategy tests need replies from clients, including error replies, without starting a
SuperLink (the end-to-end tests do that). Messages, records and error replies are
Flower's own objects; only the transport is replaced.

By default the nodes answer one after another, which keeps failures easy to read in
tests; ``parallel=True`` delivers each message in its own thread, as a real federation
runs its clients at the same time (the overhead benchmark compares the two).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.client_app import reply as client_reply
from fedtextgrad_core.run.messages import REPLY_RECORD
from fedtextgrad_core.run.server_setup import open_run
from server_app.strategy import PromptStrategy
from tests import ROOT


def default_run_config(**overrides: object) -> dict[str, object]:
    """The run config exactly as pyproject.toml declares it, with test overrides."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        config = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    config.update(overrides)
    return config


class LoopbackGrid:
    """Delivers each message to the ClientApp of its destination node, in this process.

    ``simulation`` (default): the nodes are clients of Flower's simulation, as `flwr run . local` runs
    them (the run config may set site settings); False: they are the sites of a deployment."""

    def __init__(self, run_config: dict[str, object], num_nodes: int = 3, failing: Iterable[int] = (),
                 node_overrides: dict[int, dict[str, object]] | None = None, silent: Iterable[int] = (),
                 parallel: bool = False, uploads: dict[int, object] | None = None, simulation: bool = True):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's identity
        self.simulation = simulation
        self.run_config = run_config
        self.nodes = {
            100 + i: {"partition-id": i, "num-partitions": num_nodes, **(node_overrides or {}).get(i, {})}
            for i in range(num_nodes)
        }
        self.failing = {100 + i for i in failing}
        self.silent = {100 + i for i in silent}  # nodes whose replies never arrive (a timeout)
        self.sent: list[Message] = []
        self.parallel = parallel
        # node index -> what that node uploads instead of its trained prompt (a poisoned or
        # broken client); it still trains and evaluates for real, only the upload is swapped
        self.uploads = {100 + i: text for i, text in (uploads or {}).items()}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        delivered = [m for m in messages if m.metadata.dst_node_id not in self.silent]
        if self.parallel and len(delivered) > 1:
            with ThreadPoolExecutor(max_workers=len(delivered)) as pool:
                return list(pool.map(self._deliver, delivered))
        return [self._deliver(message) for message in delivered]

    def _deliver(self, message: Message) -> Message:
        """The node's reply to ``message``: the ClientApp's own, or an error reply if it raised."""
        node_id = message.metadata.dst_node_id
        context = Context(run_id=1, node_id=node_id, node_config=self.nodes[node_id],
                          state=RecordDict(), run_config=self.run_config)
        try:
            if node_id in self.failing:
                raise RuntimeError(f"LLM endpoint of node {node_id} refused the connection")
            reply = client_reply(message, context, pinned=not self.simulation)
        except Exception as exc:  # what Flower does with a ClientApp that raises
            return Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        answered = reply.content[REPLY_RECORD] if not reply.has_error() else {}
        if node_id in self.uploads and message.metadata.message_type == MessageType.TRAIN and "prompt" in answered:
            reply.content[REPLY_RECORD]["prompt"] = self.uploads[node_id]
        return reply


class PushPullLoopback(LoopbackGrid):
    """The loopback grid with Flower's push/pull: each message is delivered to the real ClientApp when
    it is pulled for the first time (so what is sent at once is answered at once)."""

    def __init__(self, run_config, **kwargs):
        super().__init__(run_config, **kwargs)
        self.pushed: dict[str, Message] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(message)
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self._deliver(self.pushed.pop(i)) for i in list(message_ids) if i in self.pushed]


def make_strategy(tmp_path, **overrides):
    """What server_app.main does, in process: the run opens its folder ``tmp_path/run``."""
    run_config = default_run_config(**{"results-dir": str(tmp_path), "run-name": "run", **overrides})
    lines: list[str] = []
    run = open_run(run_config, echo=lines.append)
    return PromptStrategy(run.federation), run_config, run.recorder, lines
