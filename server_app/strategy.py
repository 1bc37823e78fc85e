"""A Flower strategy whose global "model" is a prompt, carried as text in a ConfigRecord.

Flower's built-in strategies average arrays; here the parameter is a string. The loop
itself (evaluate the start prompt, then train, merge and evaluate each round, then test
the best prompt) is the core's ``Federation``; this class is its connection to Flower:
it turns the core's ``RoundRequest`` into messages for the sampled nodes, and the replies
into typed ``TrainReply``/``EvalReply`` records or failures. Error replies are never
dropped: each one is a failure with its reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.client_round import PARTITION_PREFIX
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.federation import Federation, Replies
from fedtextgrad_core.run.messages import REPLY_RECORD, REQUEST_RECORD, EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.records import ClientId

NODE_WAIT_LOG_SECONDS = 10.0
MESSAGE_TYPES = {Phase.TRAIN: MessageType.TRAIN, Phase.EVALUATE: MessageType.EVALUATE, Phase.TEST: MessageType.EVALUATE}


def error_reason(message: Message) -> str:
    """The useful line of an error reply: the client's own line, or for an unexpected exception its
    message without Ray's traceback and repr."""
    reason = (message.error.reason or "").strip() if message.error else ""
    found = re.findall(r"occurred\. Message: (.+)", reason)
    if found:
        return found[-1].strip().removesuffix("'>").strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else f"error code {message.error.code if message.error else '?'}"


class PromptStrategy(Strategy):
    """Federated prompt optimisation over Flower's grid; the loop is the core's ``Federation``."""

    def __init__(self, federation_factory, timeout: float = 3600.0):
        self._federation_factory = federation_factory  # (pool) -> Federation
        self.timeout = timeout
        self.grid: Grid | None = None
        self.result = Result()
        self.sent_to: dict[str, int] = {}  # message id -> the node it was sent to
        self.names: dict[int, str] = {}  # node id -> registered name or key fingerprint (deployments)

    # --- the ClientPool the core's loop uses ---------------------------------------------------------
    def connected(self, wanted: int, deadline: float) -> list[int]:
        grid = self._grid()
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < wanted and type(grid).__name__ == "InMemoryGrid":
            # a simulation's SuperNodes are all there from the start: waiting cannot help
            raise ConfigError("min-train-clients", wanted,
                              f"at most {len(nodes)}, the simulated SuperNodes of this federation (or more of "
                              f"them: flwr run ... --federation-config \"num-supernodes={wanted}\")")
        began = time.monotonic()
        said = began - NODE_WAIT_LOG_SECONDS
        while len(nodes) < wanted:
            waited = time.monotonic() - began
            if waited >= deadline:
                raise ConfigError("min-train-clients", wanted,
                                  f"at most the {len(nodes)} SuperNode(s) that connected within wait-for-clients = "
                                  f"{deadline:g} s (start the missing sites, or lower min-train-clients)")
            if time.monotonic() - said >= NODE_WAIT_LOG_SECONDS:
                print(f"waiting for clients: {len(nodes)} connected, {wanted} needed "
                      f"({waited:.0f} of at most {deadline:g} s, wait-for-clients)", flush=True)
                said = time.monotonic()
            time.sleep(1.0)
            nodes = sorted(grid.get_node_ids())
        self._learn_names(grid)
        return nodes

    def ask(self, request: RoundRequest, node_ids: Sequence[int]) -> Replies:
        config = ConfigRecord(request.encode())
        grid = self._grid()
        if request.kind is Phase.TRAIN:
            messages = self.configure_train(request.server_round, ArrayRecord(), config, grid, node_ids)
        else:
            messages = self.configure_evaluate(request.server_round, ArrayRecord(), config, grid, node_ids)
        messages = list(messages)
        answered = grid.send_and_receive(messages, timeout=self.timeout)
        self.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id})
        replies = self.decode(request.kind, answered)
        heard = {client.node_id for client, _ in replies.answers} | {client.node_id for client, _ in replies.failures}
        replies.failures.extend((self._client(m.metadata.dst_node_id), "no reply before the round's timeout")
                                for m in messages if m.metadata.dst_node_id not in heard)
        self._record_metrics(request, replies)
        return replies

    # --- Flower's Strategy interface: messages out, typed replies in ------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        node_ids: Sequence[int] = ()) -> Iterable[Message]:
        return self._messages(MessageType.TRAIN, config, node_ids)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                           node_ids: Sequence[int] = ()) -> Iterable[Message]:
        return self._messages(MessageType.EVALUATE, config, node_ids)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        decoded = self.decode(Phase.TRAIN, replies)
        return None, MetricRecord({"clients_ok": len(decoded.answers), "clients_failed": len(decoded.failures)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._evaluation_metrics(self.decode(Phase.EVALUATE, replies))

    def summary(self) -> None:
        """The run header is printed by the core's recorder (it knows the settings)."""

    def decode(self, phase: Phase, replies: Iterable[Message]) -> Replies:
        """Replies as typed records; error replies and malformed ones as failures with their reason."""
        kind = TrainReply if phase is Phase.TRAIN else EvalReply
        decoded = Replies()
        for reply in replies:
            node_id = self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                reason = error_reason(reply)
                said = PARTITION_PREFIX.match(reason)  # a failing client names the partition it holds
                partition = int(said.group(1)) if said else None
                decoded.failures.append((self._client(node_id, partition), reason[said.end():] if said else reason))
                continue
            try:
                record = kind.decode(reply.content.get(REPLY_RECORD))
            except MalformedRecord as exc:
                decoded.failures.append((self._client(node_id), f"malformed reply: {exc}"))
                continue
            decoded.answers.append((self._client(node_id, record.partition_id), record))
        return decoded

    # --- the run ---------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Run the core's loop over this grid. The base class threads an ArrayRecord through its own
        loop; a prompt has no arrays, and the run needs an evaluation before the first round and a
        test after the last, so the core drives the rounds."""
        self.grid = grid
        if timeout is not None:
            self.timeout = timeout
        federation: Federation = self._federation_factory(self)
        federation.run()
        return self.result

    # --- helpers ---------------------------------------------------------------------------------------
    def _grid(self) -> Grid:
        if self.grid is None:
            raise RuntimeError("the strategy has not been started")
        return self.grid

    def _messages(self, message_type: str, config: ConfigRecord, node_ids: Sequence[int]) -> list[Message]:
        return [Message(content=RecordDict({REQUEST_RECORD: config}), message_type=message_type, dst_node_id=node)
                for node in node_ids]

    def _client(self, node_id: int, partition_id: int | None = None) -> ClientId:
        return ClientId(node_id=node_id, name=self.names.get(node_id, ""), partition_id=partition_id)

    def _learn_names(self, grid: Grid) -> None:
        """With node authentication each SuperNode's key is registered with the SuperLink, under a name
        (deploy/register-node.sh names it after the key file): a node is then shown by that name, which
        it cannot choose for itself. Nodes that registered themselves (simulation, --insecure) carry
        keys of no meaning and no name, and are shown by partition and node id."""
        try:
            nodes = list(grid.get_nodes())
        except Exception:  # a grid without node details (older Flower, tests): node ids only
            return
        for info in nodes:
            name = getattr(info, "name", "") or ""
            if name:
                self.names[info.node_id] = name

    def _record_metrics(self, request: RoundRequest, replies: Replies) -> None:
        """Flower's own ``Result``, as other strategies fill it: per round, what the clients reported."""
        if request.kind is Phase.TRAIN:
            self.result.train_metrics_clientapp[request.server_round] = MetricRecord(
                {"clients_ok": len(replies.answers), "clients_failed": len(replies.failures)})
        elif request.kind is Phase.EVALUATE and (metrics := self._evaluation_metrics(replies)) is not None:
            self.result.evaluate_metrics_clientapp[request.server_round] = metrics

    @staticmethod
    def _evaluation_metrics(replies: Replies) -> MetricRecord | None:
        scores = [reply.scores for _, reply in replies.answers if isinstance(reply, EvalReply)]
        total = sum(s.total for s in scores)
        if not total:
            return None
        return MetricRecord({"val_accuracy": sum(s.correct for s in scores) / total, "val_examples": total})
