"""The server's loop, without Flower: evaluate the start prompt, then train, merge and evaluate each
round, then score the best prompt on the clients' test data.

The loop talks to clients through a ``ClientPool``, which the Flower strategy implements
with messages (and tests with plain functions). It samples clients with the state's
generator, labels them for people, hands each round's uploads to the round step, and gives
the recorder every decision to write down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.fingerprint import code_fingerprint, code_location
from fedtextgrad_core.llm.engine import ChatEngine
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.recorder import FinalScore, Recorder, examples_of, usage_of, weighted_accuracy
from fedtextgrad_core.run.records import ClientEvaluation, ClientId, Failure, RoundRecord, RunSummary
from fedtextgrad_core.run.round_step import RoundOutcome, Upload, merge_round, require_enough, required_clients
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.run.state import FederationState

STAGES = {Phase.TRAIN: "train", Phase.EVALUATE: "evaluate", Phase.TEST: "test"}


@dataclass
class Replies:
    """What the clients asked in one phase delivered: their replies, and who failed and why."""

    answers: list[tuple[ClientId, TrainReply | EvalReply]] = field(default_factory=list)
    failures: list[tuple[ClientId, str]] = field(default_factory=list)


class ClientPool(Protocol):
    """How the loop reaches clients: Flower's grid in the apps, plain functions in tests."""

    def connected(self, wanted: int, deadline: float) -> list[int]:
        """The node ids of the connected clients, once at least ``wanted`` are; a ConfigError naming
        min-train-clients when they cannot be (a simulation too small) or are not within ``deadline``
        seconds."""

    def ask(self, request: RoundRequest, node_ids: Sequence[int]) -> Replies:
        """Send ``request`` to each node and collect what came back, failures included."""


class ClientLabels:
    """The names people see for clients: the partition a node reports (or its registered name), unique.

    The server identifies a client by its node id; a partition id is only what the client says it
    holds. When two nodes report the same partition, both are kept and told apart by node id.
    """

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.partition: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._warned: set[int] = set()

    def see(self, client: ClientId) -> None:
        if client.name:
            self.names[client.node_id] = client.name
        if client.partition_id is None:
            return
        self.partition[client.node_id] = client.partition_id
        claimants = sorted(node for node, p in self.partition.items() if p == client.partition_id)
        if len(claimants) > 1 and client.partition_id not in self._warned:
            self._warned.add(client.partition_id)
            self.echo(f"warning: nodes {', '.join(map(str, claimants))} all report partition {client.partition_id}; "
                      "each is kept and shown with its node id (check their --node-config partition-id)")

    def label(self, node_id: int) -> str:
        partition = self.partition.get(node_id)
        name = self.names.get(node_id)
        if name:
            return name if partition is None else f"{partition} ({name})"
        if partition is None:
            return f"node {node_id}"
        shared = sum(1 for p in self.partition.values() if p == partition) > 1
        return f"{partition} (node {node_id})" if shared else str(partition)

    def client(self, node_id: int) -> ClientId:
        return ClientId(node_id=node_id, name=self.names.get(node_id, ""), partition_id=self.partition.get(node_id))

    def order(self, node_id: int) -> tuple[int, int]:
        """Replies are handled in partition order (then node id), never in arrival order: a seed
        gives the same merged prompt however fast each client was."""
        return self.partition.get(node_id, 1 << 62), node_id


class Federation:
    """One run of the loop over a ``ClientPool``."""

    def __init__(self, settings: RunSettings, pool: ClientPool, recorder: Recorder, state: FederationState,
                 merger: ChatEngine | None, scorer: Callable[[], ChatEngine] | None = None):
        self.settings = settings
        self.pool = pool
        self.recorder = recorder
        self.state = state
        self.merger = merger
        self.scorer = scorer
        self.labels = ClientLabels(recorder.echo)
        self._code_warned: set[int] = set()

    def run(self) -> RunSummary:
        try:
            return self._run()
        except BaseException as error:
            self.recorder.stopped(self.state, error)
            raise

    def _run(self) -> RunSummary:
        state, settings = self.state, self.settings
        if not state.resumed_after:
            evaluations, failures = self.evaluate(Phase.EVALUATE, 0, state.global_prompt)
            state.record_initial(weighted_accuracy(evaluations), usage_of(evaluations))
            self.recorder.initial(state, evaluations, failures)
        for server_round in range(state.finished_round + 1, settings.num_rounds + 1):
            self.round(server_round)
        return self.recorder.finished(state, self.final_tests())

    def final_tests(self) -> dict[str, FinalScore]:
        """The test phase: the best prompt (by validation), the last merged prompt and the start prompt,
        as ``test-prompts`` asks; a prompt that is two of them is scored once."""
        prompts = {"best": self.state.best_prompt, "last": self.state.global_prompt,
                   "initial": self.settings.start_prompt}
        scored: dict[str, FinalScore] = {}
        results: dict[str, FinalScore] = {}
        for name in self.settings.test_prompts:
            prompt = prompts[name]
            if prompt not in scored:
                evaluations, failures = self.evaluate(Phase.TEST, self.state.finished_round, prompt)
                scored[prompt] = FinalScore(weighted_accuracy(evaluations), examples_of(evaluations),
                                            usage_of(evaluations), tuple(failures))
                self.recorder.remember_llms(evaluations)
            results[name] = scored[prompt]
        return results

    # --- one round ------------------------------------------------------------------------------------
    def round(self, server_round: int) -> RoundRecord:
        started, started_at = time.perf_counter(), time.time()
        replies = self.ask(Phase.TRAIN, server_round, self.state.global_prompt)
        uploads = [Upload(self.labels.label(c.node_id), c, r) for c, r in replies.answers if isinstance(r, TrainReply)]
        failures = self.failures(replies, Phase.TRAIN)
        require_enough("training", server_round, len(uploads), failures,
                       required_clients(self.settings, len(uploads) + len(failures)))
        outcome = merge_round(server_round, uploads, failures, self.settings, self.merger, self.scorer)
        client_uploads = self.recorder.uploads(outcome)
        evaluations, eval_failures = self.evaluate(Phase.EVALUATE, server_round, outcome.merged_prompt)
        accuracy = weighted_accuracy(evaluations)
        self.state.adopt(outcome.merged_prompt, accuracy, server_round)
        record = RoundRecord(
            round=server_round, uploads=client_uploads, failures=(*outcome.failures, *eval_failures),
            merge=outcome.merge_record, merged_prompt=outcome.merged_prompt,
            merged_prompt_metrics=self.recorder.prompt_metrics(outcome.merged_prompt, with_surprisal=True),
            evaluations=tuple(evaluations), val_accuracy=accuracy, val_examples=examples_of(evaluations),
            best_val_accuracy=self.state.best_accuracy, best_round=self.state.best_round,
            server_llm=outcome.server_usage if self._server_llm_used(outcome) else None,
            robust_merge=self._robust_record(outcome), seconds=time.perf_counter() - started,
            started_at=started_at, ended_at=time.time(),
        )
        self.recorder.round_done(record, self.state)
        return record

    def _server_llm_used(self, outcome: RoundOutcome) -> bool:
        return self.merger is not None or outcome.robust_usage is not None

    @staticmethod
    def _robust_record(outcome: RoundOutcome) -> dict[str, object] | None:
        if outcome.robust is None:
            return None
        usage = outcome.robust_usage
        return {**outcome.robust.as_record(), "llm": usage.as_metrics() if usage is not None else {}}

    # --- talking to clients -----------------------------------------------------------------------------
    def sample(self) -> list[int]:
        nodes = sorted(self.pool.connected(self.settings.clients_needed, self.settings.wait_for_clients))
        if self.settings.partitioning == "centralized":
            return [nodes[0]]
        size = max(self.settings.clients_needed, round(len(nodes) * self.settings.fraction_train))
        return sorted(self.state.rng.sample(nodes, min(size, len(nodes))))

    def ask(self, phase: Phase, server_round: int, prompt: str) -> Replies:
        replies = self.pool.ask(RoundRequest(phase=phase.value, server_round=server_round, prompt=prompt),
                                self.sample())
        for client, _ in [*replies.answers, *replies.failures]:
            self.labels.see(client)
        self.check_server_llm(replies)
        self.check_code(replies)
        replies.answers.sort(key=lambda answer: self.labels.order(answer[0].node_id))
        return replies

    def check_server_llm(self, replies: Replies) -> None:
        """Stop a run whose clients use real LLMs while the server would merge with the simulator only
        because ``server-backend`` was left unset: its merged prompts would be a test double's."""
        s = self.settings
        if s.server_set or not s.server.simulated or not s.server_llm_used:
            return
        real = [(client, reply.llm) for client, reply in replies.answers if not reply.simulated]
        if real:
            client, llm = real[0]
            raise ConfigError("server-backend", "", (
                f"the server's own LLM when clients use real ones (client {self.labels.label(client.node_id)} "
                f"uses {llm}): set server-backend='openai' with server-base-url and server-model, or the run's "
                f"llm-backend/llm-base-url/llm-model for the server to use, or server-backend='sim' to merge with "
                f"the simulated LLM on purpose"))

    def check_code(self, replies: Replies) -> None:
        """Say once per client when it runs other code than the server (another version at a site, or
        a local SuperLink serving the app from another folder)."""
        mine = code_fingerprint()
        for client, reply in replies.answers:
            if reply.code and reply.code != mine and client.node_id not in self._code_warned:
                self._code_warned.add(client.node_id)
                self.recorder.echo(
                    f"warning: client {self.labels.label(client.node_id)} runs other code than the server (code "
                    f"{reply.code}, the server's {mine} at {code_location()}): a site with another version, or a "
                    "local SuperLink started in another folder, which serves the app from there (README: "
                    "\"Which code runs\")")

    def failures(self, replies: Replies, phase: Phase) -> list[Failure]:
        return [Failure(self.labels.label(client.node_id), STAGES[phase], reason, client.node_id)
                for client, reason in replies.failures]

    def evaluate(self, phase: Phase, server_round: int, prompt: str) -> tuple[list[ClientEvaluation], list[Failure]]:
        replies = self.ask(phase, server_round, prompt)
        evaluations = [ClientEvaluation(self.labels.label(c.node_id), c, r) for c, r in replies.answers
                       if isinstance(r, EvalReply)]
        failures = self.failures(replies, phase)
        stage = {Phase.EVALUATE: "evaluation", Phase.TEST: "test"}[phase]
        require_enough(stage, server_round, len(evaluations), failures,
                       required_clients(self.settings, len(evaluations) + len(failures)))
        return evaluations, failures
