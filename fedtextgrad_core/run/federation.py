"""The server's loop, without Flower: evaluate the start prompt, then train, merge and evaluate each
round, then score the best prompt on the clients' test data.

The loop talks to clients through a ``ClientPool`` (the Flower strategy, or plain functions in
tests), samples and labels them, hands each round's uploads to the round step, and gives the
recorder every decision. Requests known in advance are sent together, one message per client,
because a deployment starts a process per message; replies are still handled in the order of
asking, so a seed gives the same run. Details and their price: docs/architecture.md,
"The server's loop", and docs/performance.md.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from fedtextgrad_core.fingerprint import code_fingerprint, code_location
from fedtextgrad_core.llm.engine import ChatEngine
from fedtextgrad_core.run.claims import SHOWN_CHARS, Bounds, cleaned, eval_problem, shown, train_problem
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.recorder import (
    FinalScore,
    Recorder,
    examples_of,
    interval_of,
    outcomes_of,
    usage_of,
    weighted_accuracy,
)
from fedtextgrad_core.run.records import ClientEvaluation, ClientId, Failure, RoundRecord, RunSummary
from fedtextgrad_core.run.round_step import RoundOutcome, Upload, merge_round, require_enough, required_clients
from fedtextgrad_core.run.settings import RunSettings, real_clients_need_a_server_llm
from fedtextgrad_core.run.state import FederationState

STAGES = {Phase.TRAIN: "train", Phase.EVALUATE: "evaluate", Phase.TEST: "test"}


@dataclass
class Replies:
    """What the clients asked in one phase delivered: their replies, and who failed and why."""

    answers: list[tuple[ClientId, TrainReply | EvalReply]] = field(default_factory=list)
    failures: list[tuple[ClientId, str]] = field(default_factory=list)


class Sent(Protocol):
    """Requests sent at once; ``replies(i)`` waits for (only) the i-th request's replies."""

    def replies(self, index: int) -> Replies:
        """What the clients asked in the i-th request delivered, failures included."""


class ClientPool(Protocol):
    """How the loop reaches clients: Flower's grid in the apps, plain functions in tests.

    A pool may also have ``send(requests, together) -> Sent``: every request goes out at once, and
    the loop takes the replies of each when it needs them; with ``together``, a client asked several
    of them may answer them in one message. A pool without it is asked one request at a time.
    """

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
        self._holders: dict[int, set[int]] = {}  # partition -> the nodes that report it
        self._warned: set[int] = set()

    def see(self, client: ClientId) -> None:
        if client.name:
            self.names[client.node_id] = client.name
        if client.partition_id is None:
            return
        before = self.partition.get(client.node_id)
        if before == client.partition_id:
            return
        if before is not None:
            self._holders[before].discard(client.node_id)
        self.partition[client.node_id] = client.partition_id
        claimants = self._holders.setdefault(client.partition_id, set())
        claimants.add(client.node_id)
        if len(claimants) > 1 and client.partition_id not in self._warned:
            self._warned.add(client.partition_id)
            self.echo(f"warning: nodes {', '.join(map(str, sorted(claimants)))} all report partition "
                      f"{client.partition_id}; each is kept and shown with its node id (check their --node-config "
                      "partition-id)")

    def label(self, node_id: int) -> str:
        partition = self.partition.get(node_id)
        name = self.names.get(node_id)
        if name:
            return name if partition is None else f"{partition} ({name})"
        if partition is None:
            return f"node {node_id}"
        shared = len(self._holders.get(partition, ())) > 1
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
        self.bounds = Bounds.of(settings)
        self._code_warned: set[int] = set()
        self._tests_ahead: _Sent | None = None  # the last evaluation, and the final tests sent with it

    def run(self) -> RunSummary:
        try:
            return self._run()
        except BaseException as error:
            self.recorder.stopped(self.state, error)
            raise

    def _run(self) -> RunSummary:
        state, settings = self.state, self.settings
        rounds = range(state.finished_round + 1, settings.num_rounds + 1)
        ahead: Ahead | None = None
        if not state.resumed_after:
            # the start prompt's evaluation (start-eval-repeats times, by the same clients: the server's own
            # noise), and round 1's training on the same prompt, in one message per client
            clock = (time.perf_counter(), time.time())
            repeats = settings.start_eval_repeats
            sent = self.send([(Phase.EVALUATE, 0, state.global_prompt, index > 0) for index in range(repeats)],
                             ahead=[(Phase.TRAIN, rounds[0], state.global_prompt)] if rounds else [], together=True,
                             clients=self.sample())
            scored = [self.evaluations(Phase.EVALUATE, 0, sent.replies(index)) for index in range(repeats)]
            evaluations, failures = scored[0]
            state.record_initial(weighted_accuracy(evaluations), usage_of(evaluations), outcomes_of(evaluations))
            self.recorder.initial(state, evaluations, failures, [again for again, _ in scored[1:]])
            ahead = Ahead(sent, repeats, *clock) if sent.replay is not None else None
        for server_round in rounds:
            ahead = self.round(server_round, ahead)
        return self.recorder.finished(state, self.final_tests())

    def final_tests(self) -> dict[str, FinalScore]:
        """The test phase: the best prompt (by validation), the last merged prompt and the start prompt,
        as ``test-prompts`` asks; a prompt that is two of them is scored once. Every prompt is
        tested by the same clients (one draw), so their scores compare on the same data. Prompts
        already sent with the last evaluation are not sent again; only the others go now."""
        prompts = {"best": self.state.best_prompt, "last": self.state.global_prompt,
                   "initial": self.settings.start_prompt}
        distinct = list(dict.fromkeys(prompts[name] for name in self.settings.test_prompts))
        sources: dict[str, tuple[_Sent, int]] = {}
        if (early := self._tests_ahead) is not None:
            clients = self.replay(early)
            sources = {request.prompt: (early, index) for index, (request, _) in enumerate(early.requests)
                       if request.kind is Phase.TEST}
        else:
            clients = self.sample()
        missing = [prompt for prompt in distinct if prompt not in sources]
        if missing:
            rest = self.send([(Phase.TEST, self.state.finished_round, prompt) for prompt in missing], together=True,
                             clients=clients)
            sources.update({prompt: (rest, index) for index, prompt in enumerate(missing)})
        scored: dict[str, FinalScore] = {}
        for prompt in distinct:
            sent, index = sources[prompt]
            evaluations, failures = self.evaluations(Phase.TEST, self.state.finished_round, sent.replies(index))
            scored[prompt] = FinalScore(weighted_accuracy(evaluations), examples_of(evaluations),
                                        usage_of(evaluations), tuple(failures), tuple(evaluations))
            self.recorder.remember_llms(evaluations)
        return {name: scored[prompts[name]] for name in self.settings.test_prompts}

    # --- one round ------------------------------------------------------------------------------------
    def round(self, server_round: int, ahead: Ahead | None = None) -> Ahead | None:
        """Train, merge and evaluate; returns the next round's training, sent with this evaluation.

        ``ahead``: this round's training requests, sent earlier (with the last evaluation), and when.
        """
        if ahead is None:
            started, started_at = time.perf_counter(), time.time()
            replies = self.ask(Phase.TRAIN, server_round, self.state.global_prompt)
        else:
            started, started_at = ahead.started, ahead.started_at
            self.replay(ahead.sent)
            replies = ahead.sent.replies(ahead.index)
        uploads = [Upload(self.labels.label(c.node_id), c, r) for c, r in replies.answers if isinstance(r, TrainReply)]
        failures = self.failures(replies, Phase.TRAIN)
        require_enough("training", server_round, len(uploads), failures,
                       required_clients(self.settings, len(uploads) + len(failures)))
        outcome = merge_round(server_round, uploads, failures, self.settings, self.merger, self.scorer,
                              previous_prompt=self.state.global_prompt, secret=self.state.secret)
        client_uploads = self.recorder.uploads(outcome)
        # the merged prompt is scored, and is the next round's starting prompt whatever it scores;
        # after the last round, the final tests whose prompts are known already go with it
        clock = (time.perf_counter(), time.time())
        last = server_round == self.settings.num_rounds
        later = ([(Phase.TEST, server_round, prompt) for prompt in self.tests_known_before(outcome.merged_prompt)]
                 if last else [(Phase.TRAIN, server_round + 1, outcome.merged_prompt)])
        sent = self.send([(Phase.EVALUATE, server_round, outcome.merged_prompt)], ahead=later, together=True)
        if last and later:
            self._tests_ahead = sent
        evaluations, eval_failures = self.evaluations(Phase.EVALUATE, server_round, sent.replies(0))
        accuracy = weighted_accuracy(evaluations)
        against_best = self.state.adopt(outcome.merged_prompt, accuracy, server_round, outcomes_of(evaluations),
                                        self.settings.best_rule)
        record = RoundRecord(
            round=server_round, uploads=client_uploads, failures=(*outcome.failures, *eval_failures),
            merge=outcome.merge_record, merged_prompt=outcome.merged_prompt,
            merged_prompt_metrics=self.recorder.prompt_metrics(outcome.merged_prompt, with_surprisal=True),
            evaluations=tuple(evaluations), val_accuracy=accuracy, val_examples=examples_of(evaluations),
            val_interval=interval_of(evaluations), best_comparison=against_best,
            best_val_accuracy=self.state.best_accuracy, best_round=self.state.best_round,
            server_llm=outcome.server_usage if self._server_llm_used(outcome) else None,
            robust_merge=self._robust_record(outcome), seconds=time.perf_counter() - started,
            started_at=started_at, ended_at=time.time(),
        )
        self.recorder.round_done(record, self.state)
        return None if last else Ahead(sent, 1, *clock)

    def tests_known_before(self, merged_prompt: str) -> list[str]:
        """The final tests' prompts known before the last round's evaluation: the last merged prompt
        and the start prompt when ``test-prompts`` names them, and the best prompt when that
        evaluation cannot change it. Otherwise the best is the merged prompt or the previous best,
        whichever scores higher, and is tested after the evaluation: nothing is tested in vain."""
        names = self.settings.test_prompts
        known = {"last": merged_prompt, "initial": self.settings.start_prompt}
        if self.state.best_prompt == merged_prompt:
            known["best"] = merged_prompt
        return list(dict.fromkeys(known[name] for name in names if name in known))

    def replay(self, sent: _Sent) -> list[int]:
        """The draw of requests sent ahead, made now on the state's generator (see ``send``): the
        clients they went to."""
        assert sent.replay is not None
        nodes, drawn = sent.replay
        if self.draw(nodes, self.state.rng) != drawn:
            raise RuntimeError("the clients of requests sent ahead differ from the state's draw")
        return drawn

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
        return self.draw(self.connected(), self.state.rng)

    def connected(self) -> list[int]:
        return sorted(self.pool.connected(self.settings.clients_needed, self.settings.wait_for_clients))

    def draw(self, nodes: list[int], rng: random.Random) -> list[int]:
        """The clients of one request, drawn from the connected ``nodes`` with ``rng``."""
        if self.settings.partitioning == "centralized":
            return [nodes[0]]
        size = max(self.settings.clients_needed, round(len(nodes) * self.settings.fraction_train))
        return sorted(rng.sample(nodes, min(size, len(nodes))))

    def ask(self, phase: Phase, server_round: int, prompt: str) -> Replies:
        return self.send([(phase, server_round, prompt)]).replies(0)

    def send(self, asks: Sequence[tuple[Phase, int, str] | tuple[Phase, int, str, bool]],
             ahead: Sequence[tuple[Phase, int, str]] = (),
             together: bool = False, clients: list[int] | None = None) -> _Sent:
        """Sample the clients of each request, in order (or send each to ``clients``), and send them
        all (one at a time to a pool that cannot send several). ``together``: a client asked several
        of them may get them in one message (in a deployment, one ClientApp process instead of one each).

        ``ahead``: requests sent now but belonging to what comes after this round (the next round's
        training, or the final tests), all to the same clients. They are drawn from a copy of the
        state's generator, so the checkpoint written at the end of this round holds the generator as
        it was before that draw, and a resumed run draws them again alike; the next step then makes the
        same draw on the state's generator (``replay``).
        """
        requests = [(self.request(*ask), list(clients) if clients is not None else self.sample()) for ask in asks]
        replay: tuple[list[int], list[int]] | None = None
        if ahead:
            copy = random.Random()
            copy.setstate(self.state.rng.getstate())
            nodes = self.connected()
            drawn = self.draw(nodes, copy)
            requests.extend((self.request(*ask), drawn) for ask in ahead)
            replay = (nodes, drawn)
        send = getattr(self.pool, "send", None)
        return _Sent(self, requests, send(requests, together) if send is not None and len(requests) > 1 else None,
                     replay)

    def request(self, phase: Phase, server_round: int, prompt: str, uncached: bool = False) -> RoundRequest:
        """A request as it goes out. A training request is for simulated clients only when the server
        would merge with the simulator by default: a client with a real LLM then refuses it at once
        instead of training for a run that stops on its evaluation (``check_server_llm``). ``uncached``:
        a repeated evaluation, scored without the client's reply cache."""
        return RoundRequest(phase=phase.value, server_round=server_round, prompt=prompt, uncached=uncached,
                            simulated_only=phase is Phase.TRAIN and self.settings.server_sim_by_default)

    def received(self, replies: Replies, phase: Phase) -> Replies:
        """Replies as the loop uses them: checked as claims (claims.py; a reply that cannot be true is that
        client's failure), their text made safe to show, clients labelled, in partition order."""
        answers, failures = [], [(client, shown(reason, SHOWN_CHARS["error"])) for client, reason in replies.failures]
        for client, reply in replies.answers:
            problem = (train_problem(reply, self.bounds, self.settings.max_prompt_chars) if isinstance(reply, TrainReply)
                       else eval_problem(reply, self.bounds.split(phase.data_split)))
            if problem is None:
                answers.append((client, cleaned(reply)))
            else:  # nothing it claimed counts, not even the partition it named
                failures.append((replace(client, partition_id=None), f"reply refused: {problem}"))
        replies = Replies(answers, failures)
        for client, _ in [*replies.answers, *replies.failures]:
            self.labels.see(client)
        self.check_server_llm(replies)
        self.check_code(replies)
        replies.answers.sort(key=lambda answer: self.labels.order(answer[0].node_id))
        return replies

    def check_server_llm(self, replies: Replies) -> None:
        """Stop a run whose clients use real LLMs while the server would merge with the simulator only
        because ``server-backend`` was left unset: its merged prompts would be a test double's."""
        if not self.settings.server_sim_by_default:
            return
        real = [(client, reply.llm) for client, reply in replies.answers if not reply.simulated]
        if real:
            client, llm = real[0]
            raise real_clients_need_a_server_llm(f"client {self.labels.label(client.node_id)} uses {llm}")

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
                    "local SuperLink started in another folder, which serves the app from there (docs/troubleshooting.md: "
                    "\"Which SuperLink, which code\")")

    def failures(self, replies: Replies, phase: Phase) -> list[Failure]:
        return [Failure(self.labels.label(client.node_id), STAGES[phase], reason, client.node_id)
                for client, reason in replies.failures]

    def evaluations(self, phase: Phase, server_round: int,
                    replies: Replies) -> tuple[list[ClientEvaluation], list[Failure]]:
        """An evaluation or test phase's replies as scores and failures; RoundFailed when too few."""
        evaluations = [ClientEvaluation(self.labels.label(c.node_id), c, r) for c, r in replies.answers
                       if isinstance(r, EvalReply)]
        failures = self.failures(replies, phase)
        stage = {Phase.EVALUATE: "evaluation", Phase.TEST: "test"}[phase]
        require_enough(stage, server_round, len(evaluations), failures,
                       required_clients(self.settings, len(evaluations) + len(failures)))
        return evaluations, failures


class _Sent:
    """The loop's side of requests sent together: each request's replies, received once, in any order."""

    def __init__(self, federation: Federation, requests: list[tuple[RoundRequest, list[int]]], sent: Sent | None,
                 replay: tuple[list[int], list[int]] | None = None):
        self.federation = federation
        self.requests = requests
        self.sent = sent
        self.replay = replay  # the last request was sent ahead: (the connected nodes, the clients drawn)
        self.done: dict[int, Replies] = {}

    def replies(self, index: int) -> Replies:
        if index not in self.done:
            if self.sent is not None:
                replies = self.sent.replies(index)
            else:
                request, node_ids = self.requests[index]
                replies = self.federation.pool.ask(request, node_ids)
            self.done[index] = self.federation.received(replies, self.requests[index][0].kind)
        return self.done[index]


@dataclass(frozen=True)
class Ahead:
    """A round's training requests, sent before the round (with the previous evaluation), and when."""

    sent: _Sent
    index: int
    started: float  # perf_counter
    started_at: float  # wall clock
