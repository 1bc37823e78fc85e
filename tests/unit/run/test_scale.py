"""What keeps a large federation cheap on the server, and readable: the parts that were per-client
or quadratic. Each test is quick; the scale itself is shown by tests/benchmarks/bench_scale.py.

- a client's data share cut from one dealing per process equals ``client_data``'s own;
- client labels stay right (and linear) with thousands of nodes;
- the round table summarises beyond ``report.MAX_CLIENT_ROWS`` clients and lists at most
  ``report.MAX_FAILURE_ROWS`` failures, while rounds.jsonl keeps every client and failure;
- the figures draw a band instead of a line per client beyond ``figures.MAX_CLIENT_LINES``;
- the fast upload check agrees with ``upload_problem`` on every code point;
- Flower's in-memory link state with the per-node index hands out what Flower's own method does;
- the strategy sends requests together and hands each one's replies over when they are in.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedtextgrad_core.data.partitioning import client_data
from fedtextgrad_core.method.upload_checks import ALLOWED_CONTROLS, upload_problem
from fedtextgrad_core.run import figures, report
from fedtextgrad_core.run.client_round import NodeIdentity, load_client_data
from fedtextgrad_core.run.federation import ClientLabels
from fedtextgrad_core.run.messages import REPLY_RECORD, Phase, RoundRequest
from fedtextgrad_core.run.records import ClientId
from fedtextgrad_core.run.round_step import _problem, _refused
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.settings import RunSettings
from server_app import inmemory_index
from server_app.strategy import PromptStrategy
from tests.support.scripted_pool import PNG_MAGIC, ScriptedPool, eval_reply, make_federation, start_prompt, train_reply


@pytest.mark.parametrize(("size", "val_limit", "test_limit", "seed"), [(250, 0, 0, 0), (1000, 7, 0, 3), (333, 0, 11, 5)])
def test_a_share_cut_from_one_dealing_is_client_datas_own(size, val_limit, test_limit, seed):
    settings = RunSettings.from_config({"synthetic-size": size, "max-val-examples": val_limit,
                                        "max-test-examples": test_limit, "seed": seed})
    for partitions in (1, 2, 3, 7, 50):
        for partition in range(partitions):
            assert load_client_data(settings, NodeIdentity(partition, partitions)) == client_data(
                settings.partitioning, settings.tasks, partition, partitions, settings.data_source, settings.seed,
                settings.synthetic_size, settings.max_val_examples, settings.max_test_examples,
                settings.gsm8k_split), (partitions, partition)


def test_a_share_that_cannot_be_dealt_is_refused_as_before():
    settings = RunSettings.from_config({"synthetic-size": 250})
    for partition, partitions in ((0, 51), (3, 3), (-1, 2)):  # more clients than training examples; bad ids
        with pytest.raises(Exception) as fast:
            load_client_data(settings, NodeIdentity(partition, partitions))
        with pytest.raises(Exception) as slow:
            client_data(settings.partitioning, settings.tasks, partition, partitions, "synthetic", 0, 250)
        assert str(fast.value) == str(slow.value)


def test_client_labels_with_thousands_of_nodes_stay_right_and_quick():
    warnings: list[str] = []
    labels = ClientLabels(warnings.append)
    began = time.perf_counter()
    for node in range(10_000):
        labels.see(ClientId(node, "", node))
    labels.see(ClientId(20_000, "", 17))  # one node claims a partition another holds
    names = [labels.label(node) for node in range(10_000)]
    assert time.perf_counter() - began < 2.0  # linear: quadratic took minutes at this size
    assert names[16] == "16" and names[17] == "17 (node 17)" and labels.label(20_000) == "17 (node 20000)"
    assert warnings == ["warning: nodes 17, 20000 all report partition 17; each is kept and shown with its node id "
                        "(check their --node-config partition-id)"]
    labels.see(ClientId(20_000, "", 18))  # it reports another partition later: 17 is no longer shared
    assert labels.label(17) == "17" and labels.label(20_000) == "18 (node 20000)"


def test_a_large_round_prints_a_summary_and_keeps_every_client_on_disk(tmp_path: Path):
    clients = report.MAX_CLIENT_ROWS + 15
    failing = report.MAX_FAILURE_ROWS + 3
    start = start_prompt()
    answers = {100 + i: train_reply(i, start + f" Client {i % 3} says: count twice.", 10 + i) for i in range(clients)}
    for node in list(answers)[-failing:]:
        answers[node] = "LLMError: timeout"  # type: ignore[assignment]
    evaluations = {100 + i: eval_reply(i, i % 5, 5) for i in range(clients)}
    pool = ScriptedPool(clients, {(Phase.EVALUATE, 0): evaluations, (Phase.TRAIN, 1): answers,
                                  (Phase.EVALUATE, 1): evaluations, (Phase.TEST, 1): evaluations})
    lines: list[str] = []
    federation = make_federation(tmp_path, pool, rounds=1, lines=lines)
    federation.run()
    table = [line for line in lines if line.startswith("1 ")]
    summary = [line for line in table if "clients: " in line]
    ok = clients - failing
    assert [re.split(r"\s{2,}", line)[1] for line in summary] == [f"{ok} clients: min", f"{ok} clients: median",
                                                                 f"{ok} clients: max"]
    cells = [re.split(r"\s{2,}", line) for line in summary]
    assert cells[0][5] == "10" and cells[2][5] == str(10 + ok - 1)  # LLM calls: min and max over the clients
    assert not [line for line in table if re.split(r"\s{2,}", line)[1].startswith("client ")
                and "FAILED" not in line]  # no per-client row
    failed = [line for line in table if "FAILED" in line]
    assert len(failed) == report.MAX_FAILURE_ROWS + 1
    assert "and 3 more" in failed[-1] and "all in rounds.jsonl" in failed[-1]
    (record,) = RunFolder(federation.recorder.path).read_rounds()
    assert len(record.uploads) == ok and len([f for f in record.failures if f.stage == "train"]) == failing
    clients_file = federation.recorder.path / "prompts" / "round-001-clients.jsonl"
    assert len(clients_file.read_text().splitlines()) == ok
    assert all(u.prompt_metrics and u.prompt_metrics["chars"] == len(u.reply.prompt) for u in record.uploads)
    for name in ("accuracy.png", "prompt_metrics.png"):
        assert (federation.recorder.path / name).read_bytes().startswith(PNG_MAGIC)


def test_a_small_round_prints_one_row_per_client():
    replies = [(str(i), train_reply(i, "p" * (10 + i), 10 + i)) for i in range(report.MAX_CLIENT_ROWS)]
    rows = report.client_rows(1, replies)
    assert rows == [report.client_row(1, label, reply) for label, reply in replies]
    failures = [(str(i), "down") for i in range(report.MAX_FAILURE_ROWS)]
    assert report.failure_rows(2, failures) == [report.failure_row(2, label, reason) for label, reason in failures]


def test_figures_draw_a_band_beyond_the_line_limit(tmp_path: Path, monkeypatch):
    drawn: list[str] = []
    real_band = figures._band

    def band(ax, values, clients, what):
        drawn.append(f"{clients} {what}")
        real_band(ax, values, clients, what)

    monkeypatch.setattr(figures, "_band", band)
    clients = figures.MAX_CLIENT_LINES + 1
    answers = {100 + i: train_reply(i, start_prompt() + " Count twice." * (i % 4), 10) for i in range(clients)}
    evaluations = {100 + i: eval_reply(i, i % 5, 5) for i in range(clients)}
    pool = ScriptedPool(clients, {(Phase.EVALUATE, 0): evaluations, (Phase.TRAIN, 1): answers,
                                  (Phase.EVALUATE, 1): evaluations, (Phase.TEST, 1): evaluations})
    federation = make_federation(tmp_path, pool, rounds=1)
    federation.run()
    assert f"{clients} their own prompts" in drawn and f"{clients} own prompts" in drawn
    rounds = RunFolder(federation.recorder.path).read_rounds()
    band_values = figures.client_band(figures.client_series(rounds), "chars")
    lengths = sorted(len(a.prompt) for a in answers.values())
    assert band_values["round"] == [1] and band_values["min"] == [lengths[0]] and band_values["max"] == [lengths[-1]]


def test_the_fast_upload_check_agrees_with_upload_problem_everywhere():
    # every code point the fast check lets through, upload_problem lets through too, and the other way
    # round (the characters upload_problem refuses are those of categories Cc, Cs and Cf: controls,
    # surrogates and every invisible format character, the bidi controls and tag characters among them)
    refused = {code for code in range(0x110000) if _refused().match(chr(code))}
    refused_by_upload_problem = {code for code in range(0x110000) if chr(code) not in ALLOWED_CONTROLS and
                                 unicodedata.category(chr(code)) in ("Cc", "Cs", "Cf")}
    assert refused == refused_by_upload_problem
    assert {0x202A, 0x200B, 0xE0041, 0xFEFF} <= refused
    for code in sorted(refused)[::97] + [0x0A, 0x09, 0x41, 0x202A, 0xFEFF]:  # and the messages are upload_problem's
        text = f"Count the items {chr(code)} one by one."
        assert _problem(text, 8000) == upload_problem(text, 8000), hex(code)
    for value in ("", "  \n", "x" * 8001, 12, None, "tabs\tand\nnewlines"):
        assert _problem(value, 8000) == upload_problem(value, 8000)


# --- Flower's in-memory link state -----------------------------------------------------------------


def _link_state(nodes: int):
    """A simulation's link state, set up as Flower 1.42's simulation does: a run and ``nodes`` nodes."""
    import secrets

    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 8, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[8] = Task(task_id=8, run_id=7)
    ids = []
    for _ in range(nodes):
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                 heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        ids.append(node)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, ids


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are made as a ServerApp of run 7 makes them; the identity is put back afterwards."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, SUPERLINK_NODE_ID, 8
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _messages(nodes: list[int], tag: str) -> list[Message]:
    return [Message(content=RecordDict({"request": ConfigRecord({"tag": tag})}), message_type="train",
                    dst_node_id=node) for node in nodes]


def test_the_pending_index_hands_out_what_flowers_method_does():
    try:
        plain, plain_grid, plain_nodes = _link_state(6)
        indexed, indexed_grid, indexed_nodes = _link_state(6)
    except Exception as exc:  # the test builds Flower's state the way 1.42 does; another Flower differs
        pytest.skip(f"cannot build Flower's in-memory link state here: {exc}")
    assert inmemory_index.install(indexed) is True
    assert inmemory_index.install(indexed) is True  # once only

    def tags(state, node_ids):
        return [[m.content["request"]["tag"] for m in state.get_message_ins(node_id=node, limit=1)]
                for node in node_ids]

    for grid, nodes in ((plain_grid, plain_nodes), (indexed_grid, indexed_nodes)):
        grid.push_messages(_messages(nodes[:4], "a") + _messages(nodes[1:3], "b"))
    expected = [tags(plain, plain_nodes) for _ in range(3)]
    got = [tags(indexed, indexed_nodes) for _ in range(3)]
    assert got == expected == [[["a"], ["a"], ["a"], ["a"], [], []], [[], ["b"], ["b"], [], [], []],
                               [[], [], [], [], [], []]]


def test_the_pending_index_can_be_switched_off(monkeypatch):
    try:
        state, _, _ = _link_state(1)
    except Exception as exc:
        pytest.skip(f"cannot build Flower's in-memory link state here: {exc}")
    monkeypatch.setenv(inmemory_index.ENV_SWITCH, "0")
    assert inmemory_index.install(state) is False
    assert not hasattr(state, "_fedtextgrad_pending_index")
    assert inmemory_index.install(object()) is False


# --- the strategy's send-and-receive ------------------------------------------------------------------


class PushPullGrid:
    """A grid that answers each message on the ``after[node]``-th pull after it was pushed (None: never)."""

    def __init__(self, after: dict[int, int | None]):
        self.after = after
        self.pulls = 0
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}"
            self.pushed.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [m for m in self.pushed if m.metadata.message_id in message_ids
               and self.after[m.metadata.dst_node_id] is not None and self.after[m.metadata.dst_node_id] <= self.pulls]
        return [Message(RecordDict({REPLY_RECORD: ConfigRecord(eval_reply(m.metadata.dst_node_id, 1, 2).encode())}),
                        reply_to=m) for m in due]


def _strategy(grid, timeout: float) -> PromptStrategy:
    strategy = PromptStrategy(lambda pool: None, timeout=timeout)
    strategy.grid = grid  # type: ignore[assignment]
    return strategy


def test_requests_sent_together_are_answered_each_when_its_replies_are_in(monkeypatch):
    monkeypatch.setattr("server_app.strategy.POLL_SECONDS", 0.01)
    grid = PushPullGrid({1: 1, 2: 3, 3: 2})
    strategy = _strategy(grid, 10)
    first = RoundRequest(phase="evaluate", server_round=1, prompt="p")
    second = RoundRequest(phase="test", server_round=1, prompt="q")
    sent = strategy.send([(first, [1, 3]), (second, [2])])
    assert len(grid.pushed) == 3  # everything went out at once
    replies = sent.replies(0)
    assert sorted(c.node_id for c, _ in replies.answers) == [1, 3] and not replies.failures
    assert grid.pulls == 2  # node 2's reply was not waited for
    (answer,) = sent.replies(1).answers
    assert answer[0].node_id == 2 and grid.pulls == 3
    assert sent.replies(0) is replies  # each request's replies are taken once


def test_replies_not_in_by_the_timeout_are_failures(monkeypatch):
    monkeypatch.setattr("server_app.strategy.POLL_SECONDS", 0.01)
    grid = PushPullGrid({1: 1, 2: None})
    strategy = _strategy(grid, 0.2)
    began = time.monotonic()
    replies = strategy.ask(RoundRequest(phase="evaluate", server_round=1, prompt="p"), [1, 2])
    assert [c.node_id for c, _ in replies.answers] == [1]
    assert [(c.node_id, reason) for c, reason in replies.failures] == [(2, "no reply before the round's timeout")]
    assert 0.15 < time.monotonic() - began < 2.0


def test_a_run_with_many_clients_writes_rounds_jsonl_that_reads_back(tmp_path: Path):
    clients = 60
    answers = {100 + i: train_reply(i, start_prompt() + " Count twice.", 10) for i in range(clients)}
    evaluations = {100 + i: eval_reply(i, 3, 5) for i in range(clients)}
    pool = ScriptedPool(clients, {(Phase.EVALUATE, 0): evaluations, (Phase.TRAIN, 1): answers,
                                  (Phase.EVALUATE, 1): evaluations, (Phase.TEST, 1): evaluations})
    federation = make_federation(tmp_path, pool, rounds=1)
    summary = federation.run()
    line = json.loads((federation.recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert len(line["uploads"]) == clients and len(line["evaluations"]) == clients
    assert summary.finished and summary.test_examples == 5 * clients
