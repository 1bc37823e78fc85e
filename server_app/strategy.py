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
from collections.abc import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.federation import Federation, Replies
from fedtextgrad_core.run.messages import ErrorReply, EvalReply, Phase, RoundRequest, TrainReply, reply_key, request_key
from fedtextgrad_core.run.records import ClientId

from . import inmemory_index

NODE_WAIT_LOG_SECONDS = 10.0
# A simulation registers its SuperNodes while the ServerApp starts: the strategy waits while their
# number grows (checked every SIMULATION_REGISTRATION_CHECK s), at most SIMULATION_REGISTRATION_SECONDS.
SIMULATION_REGISTRATION_CHECK = 0.5
SIMULATION_REGISTRATION_SECONDS = 120.0
# How often the strategy asks for replies. Flower's own send_and_receive waits a fixed 3 s between
# asks in a deployment (a 1.5 s delay per message exchange on average) and 0.1 s in simulation,
# where one ask costs time in proportion to the replies still awaited (a tenth of a second or more
# for 10,000, holding the GIL the simulated clients' dispatch needs). So: every POLL_SECONDS, but
# spending at most ~1/(1 + POLL_COST_RATIO) of the time asking, and never waiting more than
# POLL_MAX_SECONDS. The wait adapts to what is still awaited: at the end of a phase, few replies are
# outstanding, an ask is cheap and the interval is back to POLL_SECONDS.
POLL_SECONDS = 0.1
POLL_COST_RATIO = 19.0
POLL_MAX_SECONDS = 2.0
MESSAGE_TYPES = {Phase.TRAIN: MessageType.TRAIN, Phase.EVALUATE: MessageType.EVALUATE, Phase.TEST: MessageType.EVALUATE}


def error_reason(message: Message) -> str:
    """The useful line of an error reply: the client's own line, or for an unexpected exception its
    message without Ray's traceback and repr."""
    reason = (message.error.reason or "").strip() if message.error else ""
    found = re.findall(r"occurred\. Message: (.+)", reason)
    if found:
        return str(found[-1]).strip().removesuffix("'>").strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else f"error code {message.error.code if message.error else '?'}"


class PromptStrategy(Strategy):
    """Federated prompt optimisation over Flower's grid; the loop is the core's ``Federation``."""

    def __init__(self, federation_factory: Callable[[PromptStrategy], Federation], timeout: float = 3600.0):
        self._federation_factory = federation_factory  # the core's loop over this strategy as its ClientPool
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
            # a simulation's SuperNodes are registered as the ServerApp starts (10,000 take a few seconds):
            # wait while their number grows, then no longer, since no more will come
            nodes = self._registered(grid, wanted)
        if len(nodes) < wanted and type(grid).__name__ == "InMemoryGrid":
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

    @staticmethod
    def _registered(grid: Grid, wanted: int) -> list[int]:
        """A simulation's node ids once they stop growing in number (or ``wanted`` are there)."""
        nodes = sorted(grid.get_node_ids())
        began = time.monotonic()
        while len(nodes) < wanted and time.monotonic() - began < SIMULATION_REGISTRATION_SECONDS:
            time.sleep(SIMULATION_REGISTRATION_CHECK)
            now = sorted(grid.get_node_ids())
            if nodes and len(now) == len(nodes):
                break
            nodes = now
        return nodes

    def ask(self, request: RoundRequest, node_ids: Sequence[int]) -> Replies:
        return self.send([(request, node_ids)]).replies(0)

    def send(self, requests: Sequence[tuple[RoundRequest, Sequence[int]]], together: bool = False) -> InFlight:
        """Every request's messages at once; ``replies(i)`` then waits for the i-th request's replies.
        ``together``: a node asked several of them gets them in one message (see InFlight)."""
        return InFlight(self, self._grid(), requests, together)

    def messages_for(self, request: RoundRequest, node_ids: Sequence[int]) -> list[Message]:
        config, grid = ConfigRecord(request.encode()), self._grid()
        if request.kind is Phase.TRAIN:
            return list(self.configure_train(request.server_round, ArrayRecord(), config, grid, node_ids))
        return list(self.configure_evaluate(request.server_round, ArrayRecord(), config, grid, node_ids))

    def replies_of(self, request: RoundRequest, node_ids: Sequence[int],
                   answered: Iterable[Message | tuple[Message, int]]) -> Replies:
        """The typed replies of the nodes asked; a node that did not answer is a failure."""
        replies = self.decode(request.kind, answered)
        heard = {client.node_id for client, _ in replies.answers} | {client.node_id for client, _ in replies.failures}
        replies.failures.extend((self._client(node), "no reply before the round's timeout")
                                for node in node_ids if node not in heard)
        self._record_metrics(request, replies)
        return replies

    def bundle(self, node_id: int, requests: Sequence[RoundRequest]) -> Message:
        """One message asking ``node_id`` for several requests, answered in order (client_app.py)."""
        kind = MessageType.TRAIN if any(r.phase == Phase.TRAIN.value for r in requests) else MessageType.EVALUATE
        return _message(node_id, kind, [ConfigRecord(request.encode()) for request in requests])

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

    def decode(self, phase: Phase, replies: Iterable[Message | tuple[Message, int]]) -> Replies:
        """Replies as typed records; error replies and malformed ones as failures with their reason.
        A reply to a message that carried several requests comes with the request's position in it."""
        kind = TrainReply if phase is Phase.TRAIN else EvalReply
        decoded = Replies()
        for item in replies:
            reply, position = item if isinstance(item, tuple) else (item, 0)
            node_id = self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():  # the ClientApp raised something this project did not name
                decoded.failures.append((self._client(node_id), error_reason(reply)))
                continue
            content = reply.content.get(reply_key(position))
            try:
                if isinstance(content, ConfigRecord) and ErrorReply.within(content):
                    failed = ErrorReply.decode(content)
                    decoded.failures.append((self._client(node_id, failed.partition_id), failed.error))
                    continue
                record = kind.decode(content)
            except MalformedRecord as exc:
                decoded.failures.append((self._client(node_id), f"malformed reply: {exc}"))
                continue
            decoded.answers.append((self._client(node_id, record.partition_id), record))
        return decoded

    # --- the run ---------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Run the core's loop over this grid. The base class threads an ArrayRecord through its own
        loop; a prompt has no arrays, and the run needs an evaluation before the first round and a
        test after the last, so the core drives the rounds."""
        self.grid = grid
        if timeout is not None:
            self.timeout = timeout
        if type(grid).__name__ == "InMemoryGrid":  # simulation: see inmemory_index.py
            inmemory_index.install(getattr(grid, "state", None))
        federation: Federation = self._federation_factory(self)
        federation.run()
        return self.result

    # --- helpers ---------------------------------------------------------------------------------------
    def _grid(self) -> Grid:
        if self.grid is None:
            raise RuntimeError("the strategy has not been started")
        return self.grid

    def _messages(self, message_type: str, config: ConfigRecord, node_ids: Sequence[int]) -> list[Message]:
        return [_message(node, message_type, [config]) for node in node_ids]

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


def _message(node_id: int, message_type: str, requests: Sequence[ConfigRecord]) -> Message:
    """A message to ``node_id`` carrying ``requests`` under their keys (messages.py), answered in order."""
    content = RecordDict({request_key(position): record for position, record in enumerate(requests)})
    return Message(content=content, message_type=message_type, dst_node_id=node_id)


class InFlight:
    """Requests sent together through Flower's grid, and their replies as they come in.

    This is Flower's ``Grid.send_and_receive`` (push the messages, then pull until every reply is
    in or the timeout) for several requests at once, asking for replies every POLL_SECONDS instead
    of Flower's fixed interval. ``replies(i)`` returns as soon as the i-th request's replies are in;
    the others' keep arriving meanwhile. With ``together``, a node asked several of the requests
    gets them in one message and answers them in one ClientApp process, one after another (a
    deployment starts a process per message). A grid without push/pull (the tests' loopback) is
    asked to send and receive each request itself, in order, when its replies are wanted.
    """

    def __init__(self, strategy: PromptStrategy, grid: Grid, requests: Sequence[tuple[RoundRequest, Sequence[int]]],
                 together: bool = False):
        self.strategy, self.grid = strategy, grid
        self.requests = [request for request, _ in requests]
        self.nodes = [list(node_ids) for _, node_ids in requests]
        self.answered: list[list[Message | tuple[Message, int]]] = [[] for _ in requests]
        self.done: dict[int, Replies] = {}
        self.deadline = time.monotonic() + strategy.timeout
        self.pushing = all(hasattr(grid, name) for name in ("push_messages", "pull_messages"))
        self.owner: dict[str, list[int]] = {}  # unanswered message id -> the requests it carries, in order
        self.waiting = [0] * len(requests)  # per request: replies still awaited
        if not self.pushing:
            strategy.sent_to = {}
            return
        bundles: list[tuple[Message, list[int]]] = []
        if together:
            asked: dict[int, list[int]] = {}
            for index, node_ids in enumerate(self.nodes):
                for node in node_ids:
                    asked.setdefault(node, []).append(index)
            for node, indices in asked.items():
                if len(indices) == 1:
                    bundles.extend((m, indices) for m in strategy.messages_for(self.requests[indices[0]], [node]))
                else:
                    bundles.append((strategy.bundle(node, [self.requests[i] for i in indices]), indices))
        else:
            for index, request in enumerate(self.requests):
                bundles.extend((m, [index]) for m in strategy.messages_for(request, self.nodes[index]))
        pushed = set(grid.push_messages([message for message, _ in bundles]))
        for message, indices in bundles:
            if message.metadata.message_id in pushed:
                self.owner[message.metadata.message_id] = indices
                for index in indices:
                    self.waiting[index] += 1
        # only this exchange's ids: a large federation would otherwise keep every message id of the run
        strategy.sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m, _ in bundles if m.metadata.message_id}

    def replies(self, index: int) -> Replies:
        if index not in self.done:
            if self.pushing:
                self._pull_until(index)
            else:
                messages = self.strategy.messages_for(self.requests[index], self.nodes[index])
                self.answered[index] = list(self.grid.send_and_receive(messages, timeout=self.strategy.timeout))
                self.strategy.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages
                                              if m.metadata.message_id})
            self.done[index] = self.strategy.replies_of(self.requests[index], self.nodes[index], self.answered[index])
            self.answered[index] = []
        return self.done[index]

    def _pull_until(self, index: int) -> None:
        while self.waiting[index]:
            asked = time.monotonic()
            for reply in self.grid.pull_messages(set(self.owner)):
                indices = self.owner.pop(reply.metadata.reply_to_message_id, None)
                for position, owner in enumerate(indices or ()):
                    self.answered[owner].append((reply, position) if len(indices or ()) > 1 else reply)
                    self.waiting[owner] -= 1
            spent = time.monotonic() - asked
            left = self.deadline - time.monotonic()
            if not self.waiting[index] or left <= 0:
                return
            time.sleep(min(max(POLL_SECONDS, spent * POLL_COST_RATIO), POLL_MAX_SECONDS, left))
