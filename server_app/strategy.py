"""A Flower strategy whose global "model" is a prompt, carried as text in a ConfigRecord.

Flower's built-in strategies average arrays; here the parameter is a string, so the
strategy sends it in ``config["prompt"]``, merges the returned prompts with the core's
merge methods, and evaluates the merged prompt on the clients' validation data.
Error replies are never dropped: they are counted, reported with their reason, and
a round with fewer successes than ``min-train-clients`` stops the run loudly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtextgrad_core.run.federation import (
    ClientFailure,
    ClientReply,
    EvalReply,
    PromptFederation,
    require_enough,
)
from fedtextgrad_core.run.settings import RunSettings

NODE_WAIT_LOG_SECONDS = 10.0


def error_reason(message: Message) -> str:
    """The useful line of an error reply: the client's own exception message, not Ray's traceback."""
    reason = (message.error.reason or "").strip() if message.error else ""
    found = re.findall(r"occurred\. Message: (.+)", reason)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else f"error code {message.error.code if message.error else '?'}"


def _order(label: str) -> tuple[int, str]:
    """Sort key: partition ids numerically, unknown nodes after them."""
    return (int(label), "") if label.isdigit() else (1 << 62, label)


class PromptStrategy(Strategy):
    """Federated prompt optimisation: send the prompt, merge the replies, evaluate, repeat."""

    def __init__(self, settings: RunSettings, federation: PromptFederation):
        self.settings = settings
        self.federation = federation
        self.labels: dict[int, str] = {}  # node id -> "partition id" once a node has answered
        self.sent_to: dict[str, int] = {}  # message id -> the node it was sent to
        self.unanswered: list[int] = []  # nodes of the last send that never replied

    # --- sampling ------------------------------------------------------------------
    def _sample(self, grid: Grid) -> list[int]:
        wanted = self.settings.clients_needed
        waited_since = time.monotonic() - NODE_WAIT_LOG_SECONDS
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() - waited_since >= NODE_WAIT_LOG_SECONDS:
                print(f"waiting for clients: {len(nodes)} connected, {wanted} needed", flush=True)
                waited_since = time.monotonic()
            time.sleep(1.0)
        if self.settings.partitioning == "centralized":
            return [nodes[0]]
        size = max(wanted, round(len(nodes) * self.settings.fraction_train))
        return sorted(self.federation.rng.sample(nodes, min(size, len(nodes))))

    def label(self, node_id: int) -> str:
        return self.labels.get(node_id, f"node{node_id}")

    def _send(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Send and wait, remembering where each message went: the SuperLink answers for a node
        that vanished (NODE_UNAVAILABLE) with its own id as the sender, not the node's."""
        messages = list(messages)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        self.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id})
        answered = {self._sender(reply) for reply in replies}
        self.unanswered = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
        return replies

    def _sender(self, reply: Message) -> int:
        return self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _messages(self, grid: Grid, message_type: str, config: ConfigRecord) -> list[Message]:
        return [
            Message(content=RecordDict({"config": config}), message_type=message_type, dst_node_id=node_id)
            for node_id in self._sample(grid)
        ]

    def _split_replies(self, replies: Iterable[Message], needed: dict[str, tuple[str, ...]]
                       ) -> tuple[list[Message], list[ClientFailure]]:
        """Successful replies, and failures: error replies, replies missing ``needed`` fields,
        and clients that never replied (a timeout must not drop a client silently)."""
        ok: list[Message] = []
        failures = [ClientFailure(self.label(node), "no reply before the round's timeout")
                    for node in self.unanswered]
        self.unanswered = []
        for reply in replies:
            if reply.has_error():
                failures.append(ClientFailure(self.label(self._sender(reply)), error_reason(reply)))
                continue
            missing = [f"{record}.{key}" for record, keys in needed.items() for key in keys
                       if record not in reply.content or key not in reply.content[record]]
            if missing:
                failures.append(ClientFailure(self.label(reply.metadata.src_node_id),
                                              f"malformed reply: missing {', '.join(missing)}"))
                continue
            metrics = reply.content["metrics"]
            if "partition_id" in metrics:
                self.labels[reply.metadata.src_node_id] = str(int(metrics["partition_id"]))
            ok.append(reply)
        return ok, failures

    # --- Strategy interface --------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config = ConfigRecord({
            **dict(config),
            "prompt": self.federation.global_prompt,
            "server-round": server_round,
            "local-steps": self.settings.local.steps,
            "batch-size": self.settings.local.batch_size,
            "proximal": self.settings.local.proximal,
        })
        return self._messages(grid, MessageType.TRAIN, config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, failures = self._split_replies(replies, {"prompt": ("text",), "metrics": ()})
        required = min(self.settings.clients_needed, max(1, len(ok) + len(failures)))
        require_enough("training", server_round, len(ok), failures, required)
        client_replies = [
            ClientReply(
                label=self.label(r.metadata.src_node_id),
                prompt=r.content["prompt"]["text"],  # as sent: the federation rejects anything but text
                num_examples=int(r.content["metrics"].get("num-examples", 0)),
                metrics={k: float(v) for k, v in r.content["metrics"].items()},
            )
            for r in ok
        ]
        # arrival order is timing; merge in a fixed order so a seed gives the same prompt
        client_replies.sort(key=lambda reply: _order(reply.label))
        merged = self.federation.merge(server_round, client_replies, failures)
        return None, MetricRecord({"clients_ok": len(ok), "clients_failed": len(failures),
                                   "merged_prompt_chars": len(merged.prompt)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config = ConfigRecord({
            **dict(config),
            "prompt": str(config.get("prompt", self.federation.global_prompt)),
            "server-round": server_round,
            "split": str(config.get("split", "val")),
        })
        return self._messages(grid, MessageType.EVALUATE, config)

    def evaluation_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[list[EvalReply], list[ClientFailure]]:
        ok, failures = self._split_replies(replies, {"metrics": ("correct", "total")})
        required = min(self.settings.clients_needed, max(1, len(ok) + len(failures)))
        require_enough("evaluation", server_round, len(ok), failures, required)
        evals = [
            EvalReply(
                label=self.label(r.metadata.src_node_id),
                correct=int(r.content["metrics"]["correct"]),
                total=int(r.content["metrics"]["total"]),
                metrics={k: float(v) for k, v in r.content["metrics"].items()},
            )
            for r in ok
        ]
        return sorted(evals, key=lambda reply: _order(reply.label)), failures

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        evals, failures = self.evaluation_replies(server_round, replies)
        record = self.federation.finish_round(server_round, evals, failures)
        if record["val_accuracy"] is None:
            return None
        return MetricRecord({"val_accuracy": record["val_accuracy"], "best_val_accuracy": record["best_val_accuracy"]})

    def summary(self) -> None:
        s = self.settings
        print(
            f"FedTextGrad: {s.num_rounds} round(s), task {', '.join(s.tasks)} ({s.partitioning}), "
            f"merge {s.merge}, {s.local.steps} local step(s) of batch {s.local.batch_size}, "
            f"proximal {'on' if s.local.proximal else 'off'}, client LLM {s.forward.describe()}",
            flush=True,
        )

    # --- the run -------------------------------------------------------------------
    def _evaluate(self, grid: Grid, server_round: int, prompt: str, split: str, timeout: float):
        messages = self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord({"prompt": prompt, "split": split}), grid)
        return self.evaluation_replies(server_round, self._send(grid, messages, timeout))

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Round 0 evaluation, then train/merge/evaluate rounds, then the best prompt on test.

        The base class threads an ArrayRecord through its loop; a prompt strategy has
        no arrays, and it needs the two extra evaluations, so it drives the loop itself.
        A resumed federation (``resume-from``) starts after its last finished round.
        """
        self.summary()
        num_rounds = num_rounds or self.settings.num_rounds
        if not self.federation.resumed_after:
            initial, _ = self._evaluate(grid, 0, self.federation.global_prompt, "val", timeout)
            self.federation.record_initial(initial)
        result = Result()
        for server_round in range(self.federation.finished_rounds + 1, num_rounds + 1):
            self.federation.start_round(server_round)
            train_messages = self.configure_train(server_round, ArrayRecord(), train_config or ConfigRecord(), grid)
            replies = self._send(grid, train_messages, timeout)
            _, train_metrics = self.aggregate_train(server_round, replies)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            eval_messages = self.configure_evaluate(server_round, ArrayRecord(), evaluate_config or ConfigRecord(), grid)
            eval_metrics = self.aggregate_evaluate(server_round, self._send(grid, eval_messages, timeout))
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
        test, failures = self._evaluate(grid, num_rounds + 1, self.federation.best_prompt, "test", timeout)
        self.federation.finish(test, failures)
        return result
