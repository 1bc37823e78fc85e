"""The prompt strategy with real Flower Messages, real ClientApp code and error replies."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.run.messages import REPLY_RECORD, REQUEST_RECORD, EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.records import ClientId, Failure
from fedtextgrad_core.run.round_step import RoundFailed
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.sim import CATALOGUE, insert_instruction, instructions_in
from server_app.strategy import error_reason
from tests.support.flower_loopback import LoopbackGrid, PushPullLoopback, default_run_config, make_strategy

TIMEOUT = "no reply before the round's timeout"


def read(recorder):
    """The run's rounds (typed) and summary."""
    folder = RunFolder(recorder.path)
    return folder.read_rounds(), folder.read_summary()


def test_prompt_travels_as_text_in_a_config_record(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    strategy.grid = grid
    start = RunFolder(recorder.path).prompts.joinpath("round-000-initial.txt").read_text().rstrip("\n")
    request = RoundRequest(phase="train", server_round=1, prompt=start)
    replies = strategy.ask(request, grid.get_node_ids())
    assert len(grid.sent) == 3 and [m.metadata.dst_node_id for m in grid.sent] == [100, 101, 102]
    for message in grid.sent:
        assert list(message.content.keys()) == [REQUEST_RECORD]
        config = message.content[REQUEST_RECORD]
        assert isinstance(config, ConfigRecord)
        assert config["prompt"] == start and config["phase"] == "train" and config["server_round"] == 1
        assert set(config.keys()) == {"phase", "server_round", "prompt", "simulated_only", "uncached"}  # no round settings
        assert RoundRequest.decode(config) == request
        assert message.metadata.message_type == MessageType.TRAIN
    assert not replies.failures
    assert [(c.node_id, c.partition_id) for c, _ in replies.answers] == [(100, 0), (101, 1), (102, 2)]
    assert all(isinstance(reply, TrainReply) and reply.prompt for _, reply in replies.answers)
    # evaluation and test go as Flower's evaluate messages, the phase says which split
    for phase in (Phase.EVALUATE, Phase.TEST):
        replies = strategy.ask(RoundRequest(phase=phase.value, server_round=1, prompt=start), [101])
        assert grid.sent[-1].metadata.message_type == MessageType.EVALUATE
        assert grid.sent[-1].content[REQUEST_RECORD]["phase"] == phase.value
        ((client, reply),) = replies.answers
        assert client.node_id == 101 and isinstance(reply, EvalReply) and reply.scores.total > 0


def test_full_run_improves_and_writes_results(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 2})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    rounds, summary = read(recorder)
    assert summary.finished is True
    assert summary.rounds == 2
    assert summary.best_val_accuracy > summary.initial_val_accuracy
    assert summary.test_accuracy is not None and summary.test_examples == 100
    cost = summary.cost
    assert cost["client_training"]["llm_calls"] > 0 and cost["client_evaluation"]["llm_calls"] > 0
    assert cost["server_merge"]["llm_calls"] == 2  # one summarisation per round
    assert instructions_in(summary.best_prompt, "object_counting")  # learned something
    assert [r.round for r in rounds] == [1, 2]
    assert {u.label for u in rounds[0].uploads} == {"0", "1", "2"}
    assert {u.client.node_id for u in rounds[0].uploads} == {100, 101, 102}
    assert all(u.reply.local.llm_calls > 0 for u in rounds[0].uploads)
    assert rounds[0].val_examples == 100  # federated evaluation covers every client's validation share
    assert any("merged (summarize-uid)" in line and "(100)" in line for line in lines)
    # every prompt is measured; the sim gives no token log-probabilities, so surprisal is absent, not 0
    merged_metrics = rounds[0].merged_prompt_metrics
    assert merged_metrics["chars"] == len(rounds[0].merged_prompt) and merged_metrics["char_entropy"] > 0
    assert merged_metrics["surprisal_variance"] is None
    assert all(u.prompt_metrics["chars"] == len(u.reply.prompt) for u in rounds[0].uploads)
    assert (recorder.path / "prompt_metrics.png").read_bytes()[:4] == b"\x89PNG"
    for record in rounds:  # every upload of a round is in the round's clients file
        saved = [json.loads(line) for line in
                 (recorder.path / "prompts" / f"round-{record.round:03d}-clients.jsonl").read_text().splitlines()]
        assert [(s["label"], s["node_id"], s["prompt"]) for s in saved] == [
            (u.label, u.client.node_id, u.reply.prompt) for u in record.uploads]
    # the run ends with the explicit test phase, carrying the last finished round: first the best prompt,
    # then the last merged one and the start prompt (test-prompts), each scored once
    requests = [RoundRequest.decode(m.content[REQUEST_RECORD]) for m in grid.sent]
    tests = list(dict.fromkeys(r for r in requests if r.kind is Phase.TEST))
    assert requests[-1].kind is Phase.TEST and tests[0] == RoundRequest("test", 2, summary.best_prompt)
    assert {r.prompt for r in tests} == {summary.best_prompt, summary.final_prompt, summary.initial_prompt}
    assert len(tests) == len({summary.best_prompt, summary.final_prompt, summary.initial_prompt})
    assert all(r.server_round == 2 for r in tests)
    assert None not in (summary.last_test_accuracy, summary.initial_test_accuracy)
    # Flower's own Result is filled as other strategies fill it
    assert strategy.result.train_metrics_clientapp[1]["clients_ok"] == 3
    assert strategy.result.evaluate_metrics_clientapp[2]["val_examples"] == 100


def test_one_failing_client_is_reported_and_the_round_goes_on(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1})
    grid = LoopbackGrid(run_config, failing=[2])
    strategy.start(grid)
    (record,), summary = read(recorder)
    assert len(record.uploads) == 2
    # node 102 never answered, so it never said which partition it holds: it is named by its node id
    stages = {(f.label, f.stage, f.node_id) for f in record.failures}
    assert stages == {("node 102", "train", 102), ("node 102", "evaluate", 102)}
    assert all("refused the connection" in f.reason for f in record.failures)
    assert [(f.label, f.stage) for f in summary.test_failures] == [("node 102", "test")]
    assert any("FAILED" in line and "refused the connection" in line for line in lines)


def test_too_few_clients_fails_loudly_with_their_errors_and_keeps_results(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(tmp_path, **{"num-server-rounds": 1})
    grid = LoopbackGrid(run_config, failing=[1, 2])
    with pytest.raises(RoundFailed) as failed:
        strategy.start(grid)
    message = str(failed.value)
    assert "only 1 client(s) succeeded, at least 2 required" in message
    assert message.count("refused the connection") == 2
    summary = RunFolder(recorder.path).read_summary()
    assert summary.finished is False and summary.error == f"RoundFailed: {message}"


def test_error_reply_reason_is_the_clients_own_message():
    grid = LoopbackGrid(default_run_config())
    request = RoundRequest(phase="train", server_round=1, prompt="p")
    instruction = Message(RecordDict({REQUEST_RECORD: ConfigRecord(request.encode())}), dst_node_id=100,
                          message_type=MessageType.TRAIN)
    ray_style = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
                 "  File \"client_app.py\", line 8, in train\n"
                 "Exception ClientAppException occurred. Message: setting 'llm-api-key-env' = 'KEY' is not accepted")
    reply = Message(Error(code=2, reason=ray_style), reply_to=instruction)
    assert error_reason(reply) == "setting 'llm-api-key-env' = 'KEY' is not accepted"
    assert error_reason(Message(Error(code=3, reason=""), reply_to=instruction)) == "error code 3"
    assert grid.get_node_ids() == [100, 101, 102]


def test_evaluation_is_weighted_by_examples(tmp_path):
    strategy, run_config, _, _ = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    request = ConfigRecord(RoundRequest(phase="evaluate", server_round=1, prompt="p").encode())
    messages = list(strategy.configure_evaluate(1, ArrayRecord(), request, grid, grid.get_node_ids()))
    replies = [
        Message(RecordDict({REPLY_RECORD: ConfigRecord(EvalReply(
            partition_id=i, llm="sim", simulated=True, scores=Scores(correct=c, total=t, malformed=0, seconds=0.0),
            usage=Usage(calls=t)).encode())}), reply_to=m)
        for i, (m, (c, t)) in enumerate(zip(messages, [(9, 10), (0, 30), (30, 60)]))
    ]
    decoded = strategy.decode(Phase.EVALUATE, replies)
    assert not decoded.failures
    assert [(c.node_id, c.partition_id, r.scores.total) for c, r in decoded.answers] == [
        (100, 0, 10), (101, 1, 30), (102, 2, 60)]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["val_accuracy"] == pytest.approx(39 / 100) and metrics["val_examples"] == 100


def test_centralized_samples_one_client_holding_all_training_data(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(
        tmp_path, **{"partitioning": "centralized", "num-server-rounds": 1})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    (record,), _ = read(recorder)
    assert len(record.uploads) == 1
    assert record.uploads[0].reply.num_examples == 50  # the whole training split
    assert record.val_examples == 100
    assert {m.metadata.dst_node_id for m in grid.sent} == {100}


def test_heterogeneous_gives_each_client_its_own_task(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(
        tmp_path, **{"partitioning": "heterogeneous", "num-server-rounds": 1})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    (record,), summary = read(recorder)
    assert summary.task == ("object_counting", "word_sorting", "multistep_arithmetic_two")
    assert record.val_examples == 300  # each client's full validation split of its own task
    assert "Answer: $VALUE" in summary.best_prompt


class MalformedGrid(LoopbackGrid):
    """Node 102's training reply is replaced by ``broken(reply)``: a reply no real ClientApp sends."""

    def __init__(self, run_config, broken, **kwargs):
        super().__init__(run_config, **kwargs)
        self.broken = broken

    def _deliver(self, message):
        reply = super()._deliver(message)
        if message.metadata.dst_node_id == 102 and message.metadata.message_type == MessageType.TRAIN:
            return self.broken(reply, message)
        return reply


def _without_reply_record(reply, message):
    return Message(RecordDict({"metrics": MetricRecord({"steps": 1.0})}), reply_to=message)


def _without_prompt(reply, message):
    fields = {key: value for key, value in reply.content[REPLY_RECORD].items() if key != "prompt"}
    return Message(RecordDict({REPLY_RECORD: ConfigRecord(fields)}), reply_to=message)


def _with_a_mistyped_field(reply, message):
    fields = {**reply.content[REPLY_RECORD], "num_examples": "many"}
    return Message(RecordDict({REPLY_RECORD: ConfigRecord(fields)}), reply_to=message)


@pytest.mark.parametrize("broken, reason", [
    (_without_reply_record, "malformed reply: the message holds no TrainReply record"),
    (_without_prompt, "malformed reply: missing prompt"),
    (_with_a_mistyped_field, "malformed reply: num_examples is not a whole number"),
], ids=["no-reply-record", "missing-field", "mistyped-field"])
def test_a_malformed_reply_is_a_reported_failure_not_a_crash(tmp_path, broken, reason):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1})
    grid = MalformedGrid(run_config, broken)
    strategy.start(grid)
    (record,), summary = read(recorder)
    assert summary.finished is True
    assert [u.label for u in record.uploads] == ["0", "1"]
    assert record.failures == (Failure("2", "train", reason, 102),)  # partition known from round 0
    assert [e.label for e in record.evaluations] == ["0", "1", "2"]  # it still evaluates
    assert any("client 2" in line and "FAILED" in line and reason in line for line in lines)
    assert strategy.result.train_metrics_clientapp[1]["clients_failed"] == 1


def test_aggregate_train_counts_malformed_replies_as_failures(tmp_path):
    strategy, run_config, _, _ = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    request = ConfigRecord(RoundRequest(phase="train", server_round=1, prompt="Count the items.").encode())
    messages = list(strategy.configure_train(1, ArrayRecord(), request, grid, grid.get_node_ids()))
    good = grid.send_and_receive(messages[:2])
    bad = Message(RecordDict({"metrics": MetricRecord({"steps": 1.0})}), reply_to=messages[2])
    _, metrics = strategy.aggregate_train(1, good + [bad])
    assert metrics["clients_ok"] == 2 and metrics["clients_failed"] == 1
    decoded = strategy.decode(Phase.TRAIN, good + [bad])
    ((client, why),) = decoded.failures
    assert client.node_id == 102 and why.startswith("malformed reply: ")


def test_more_clients_than_examples_stops_the_run_at_round_zero_naming_the_setting(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(tmp_path, **{"synthetic-size": 5})  # 1 training example
    with pytest.raises(RoundFailed) as failed:
        strategy.start(LoopbackGrid(run_config))
    message = str(failed.value)
    assert message.startswith("round 0 evaluation: only 0 client(s) succeeded")
    assert "setting 'num-partitions' = 3 is not accepted; expected at most 1" in message
    assert not (recorder.path / "rounds.jsonl").read_text()  # no round was run


def test_missing_api_key_variable_on_the_clients_stops_the_run_at_round_zero(tmp_path, monkeypatch, sim_http):
    monkeypatch.delenv("FEDTEXTGRAD_TEST_KEY", raising=False)
    strategy, run_config, _, _ = make_strategy(tmp_path, **{
        "llm-backend": "openai", "llm-base-url": sim_http, "llm-api-key-env": "FEDTEXTGRAD_TEST_KEY",
        "server-backend": "sim"})  # the server's own LLM needs no key: only the clients' is missing
    with pytest.raises(RoundFailed) as failed:
        strategy.start(LoopbackGrid(run_config))
    assert "setting 'llm-api-key-env' = 'FEDTEXTGRAD_TEST_KEY' is not accepted" in str(failed.value)


def test_a_client_that_never_replies_is_reported_not_dropped(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1})
    strategy.start(LoopbackGrid(run_config, silent=[1]))
    (record,), summary = read(recorder)
    assert len(record.uploads) == 2
    assert {(f.label, f.stage, f.reason, f.node_id) for f in record.failures} == {
        ("node 101", "train", TIMEOUT, 101),
        ("node 101", "evaluate", TIMEOUT, 101),
    }
    assert summary.test_failures == (Failure("node 101", "test", TIMEOUT, 101),)
    assert any("client node 101" in line and "FAILED" in line and TIMEOUT in line for line in lines)


def test_two_nodes_reporting_the_same_partition_are_both_kept(tmp_path):
    """Node 101 is misconfigured with node 100's partition id: the server keeps both, tells them
    apart by node id, merges both uploads and warns."""
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1, "merge": "concat"})
    start = (recorder.path / "prompts" / "round-000-initial.txt").read_text().rstrip("\n")
    learned = CATALOGUE["object_counting"]
    # the two nodes hold the same data and would train the same prompt; their uploads differ
    # here so that the merged prompt shows whether both were used
    uploads = {0: insert_instruction(start, learned[0].sentence), 1: insert_instruction(start, learned[1].sentence)}
    grid = LoopbackGrid(run_config, node_overrides={1: {"partition-id": 0}}, uploads=uploads)
    strategy.start(grid)
    (record,), summary = read(recorder)

    assert [(u.label, u.client.node_id, u.client.partition_id) for u in record.uploads] == [
        ("0 (node 100)", 100, 0), ("0 (node 101)", 101, 0), ("2", 102, 2)]
    assert [u.reply.prompt for u in record.uploads[:2]] == [uploads[0], uploads[1]]
    assert record.failures == ()
    saved = [json.loads(line) for line in
             (recorder.path / "prompts" / "round-001-clients.jsonl").read_text().splitlines()]
    assert [(s["label"], s["node_id"], s["partition_id"], s["left_out"]) for s in saved] == [
        ("0 (node 100)", 100, 0, False), ("0 (node 101)", 101, 0, False), ("2", 102, 2, False)]
    assert [s["prompt"] for s in saved[:2]] == [uploads[0], uploads[1]]
    # the merge used both: each one's instruction is in the merged prompt
    assert {"quantities", "category"} <= set(instructions_in(record.merged_prompt, "object_counting"))
    assert [e.label for e in record.evaluations] == ["0 (node 100)", "0 (node 101)", "2"]
    assert set(summary.client_llms) == {"0 (node 100)", "0 (node 101)", "2"}
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "nodes 100, 101 all report partition 0" in warnings[0]
    assert any(line.startswith("1") and "client 0 (node 101)" in line for line in lines)


# --- requests sent at once, and together ----------------------------------------------------------


def _requests(prompt: str) -> tuple[RoundRequest, RoundRequest]:
    return (RoundRequest(phase="evaluate", server_round=1, prompt=prompt),
            RoundRequest(phase="train", server_round=2, prompt=prompt))


def test_requests_sent_together_travel_in_one_message_per_node_and_answer_as_apart(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(tmp_path)
    start = RunFolder(recorder.path).prompts.joinpath("round-000-initial.txt").read_text().rstrip("\n")
    evaluate, train = _requests(start)
    apart_grid = LoopbackGrid(run_config)
    strategy.grid = apart_grid
    apart = [strategy.ask(evaluate, [100, 101, 102]), strategy.ask(train, [101, 102])]
    grid = PushPullLoopback(run_config)
    strategy.grid = grid
    sent = strategy.send([(evaluate, [100, 101, 102]), (train, [101, 102])], together=True)
    # node 100 is asked one request: a plain message; nodes 101 and 102 both, in one message each
    assert [(m.metadata.dst_node_id, sorted(m.content.keys()), m.metadata.message_type) for m in grid.sent] == [
        (100, [REQUEST_RECORD], MessageType.EVALUATE), (101, [REQUEST_RECORD, "request-1"], MessageType.TRAIN),
        (102, [REQUEST_RECORD, "request-1"], MessageType.TRAIN)]
    together = [sent.replies(0), sent.replies(1)]

    def untimed(replies):  # what the clients answered, without how long it took
        return sorted((c.node_id, {k: v for k, v in r.encode().items() if "seconds" not in k})
                      for c, r in replies.answers)

    for got, expected in zip(together, apart):
        assert not got.failures and untimed(got) == untimed(expected)


def test_one_failed_request_of_several_is_a_failure_of_that_request_only(tmp_path, monkeypatch):
    import fedtextgrad_core.run.client_round as client_module
    from fedtextgrad_core.errors import ConfigError

    answer = client_module.answer

    def training_fails(run_config, node_config, request, pinned=True):
        if request.kind is Phase.TRAIN:
            raise ConfigError("batch-size", 99, "at most 5, the training examples this client holds")
        return answer(run_config, node_config, request, pinned)

    monkeypatch.setattr(client_module, "answer", training_fails)
    strategy, run_config, _, _ = make_strategy(tmp_path)
    grid = PushPullLoopback(run_config)
    strategy.grid = grid
    evaluate, train = _requests("Answer the question.")
    sent = strategy.send([(evaluate, [100]), (train, [100])], together=True)
    ((client, reply),) = sent.replies(0).answers
    assert client.node_id == 100 and isinstance(reply, EvalReply)
    ((failed, reason),) = sent.replies(1).failures
    assert failed == ClientId(node_id=100, name="", partition_id=0)
    assert reason == "setting 'batch-size' = 99 is not accepted; expected at most 5, the training examples this client holds"
    # a node whose whole message fails (an exception Flower turns into an error reply) fails every request
    grid = PushPullLoopback(run_config, failing=[1])
    strategy.grid = grid
    sent = strategy.send([(evaluate, [101]), (train, [101])], together=True)
    assert [len(sent.replies(i).failures) for i in (0, 1)] == [1, 1]
    assert all("refused the connection" in reason for i in (0, 1) for _, reason in sent.replies(i).failures)


def test_a_run_through_push_and_pull_ends_as_a_run_asked_one_request_at_a_time(tmp_path):
    results = {}
    for name, grid_class in (("apart", LoopbackGrid), ("together", PushPullLoopback)):
        strategy, run_config, recorder, _ = make_strategy(tmp_path / name, **{
            "num-server-rounds": 2, "fraction-train": 0.67, "local-steps": 1, "batch-size": 2, "synthetic-size": 60})
        strategy.start(grid_class(run_config))
        rounds, summary = read(recorder)
        results[name] = ([(r.merged_prompt, r.val_accuracy, [u.label for u in r.uploads],
                           sorted(e.label for e in r.evaluations)) for r in rounds],
                         summary.best_prompt, summary.test_accuracy, summary.cost)
    assert results["together"] == results["apart"]
