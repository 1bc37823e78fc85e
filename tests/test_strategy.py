"""The prompt strategy with real Flower Messages, real ClientApp code and error replies."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedtextgrad_core.run.federation import PromptFederation, RoundFailed
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.run.recorder import RunRecorder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import instructions_in
from server_app.strategy import PromptStrategy, error_reason

from tests.flower_loopback import LoopbackGrid, default_run_config


def make_strategy(tmp_path, **overrides):
    run_config = default_run_config(**overrides)
    settings = RunSettings.from_config(run_config)
    recorder = RunRecorder(tmp_path, "run", {"run_config": run_config})
    lines: list[str] = []
    merger = make_engine(settings.server) if settings.merge != "concat" else None
    federation = PromptFederation(settings, recorder, merger, echo=lines.append)
    return PromptStrategy(settings, federation), run_config, recorder, lines


def test_prompt_travels_as_text_in_a_config_record(tmp_path):
    strategy, run_config, _, _ = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert len(messages) == 3
    for message in messages:
        config = message.content["config"]
        assert isinstance(config, ConfigRecord)
        assert config["prompt"] == strategy.federation.global_prompt
        assert config["server-round"] == 1
        assert config["local-steps"] == 3 and config["batch-size"] == 3 and config["proximal"] is True
        assert message.metadata.message_type == MessageType.TRAIN


def test_full_run_improves_and_writes_results(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 2})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    summary = json.loads((recorder.path / "summary.json").read_text())
    assert summary["finished"] is True
    assert summary["rounds"] == 2
    assert summary["best_val_accuracy"] > summary["initial_val_accuracy"]
    assert summary["test_accuracy"] is not None and summary["test_examples"] == 100
    cost = summary["cost"]
    assert cost["client_training"]["llm_calls"] > 0 and cost["client_evaluation"]["llm_calls"] > 0
    assert cost["server_merge"]["llm_calls"] == 2  # one summarisation per round
    assert instructions_in(summary["best_prompt"], "object_counting")  # learned something
    rounds = [json.loads(line) for line in (recorder.path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert {c["label"] for c in rounds[0]["clients"]} == {"0", "1", "2"}
    assert all(c["metrics"]["llm_calls"] > 0 for c in rounds[0]["clients"])
    assert rounds[0]["val_examples"] == 100  # federated evaluation covers every client's validation share
    assert any("merged (summarize-uid)" in line for line in lines)
    # every prompt is measured; the sim gives no token log-probabilities, so surprisal is absent, not 0
    merged_metrics = rounds[0]["merged_prompt_metrics"]
    assert merged_metrics["chars"] == len(rounds[0]["merged_prompt"]) and merged_metrics["char_entropy"] > 0
    assert merged_metrics["surprisal_variance"] is None
    assert all(c["prompt_metrics"]["chars"] == len(c["prompt"]) for c in rounds[0]["clients"])
    assert (recorder.path / "prompt_metrics.png").read_bytes()[:4] == b"\x89PNG"
    # the last messages evaluated the best prompt on the test split
    assert grid.sent[-1].content["config"]["split"] == "test"
    assert grid.sent[-1].content["config"]["prompt"] == summary["best_prompt"]


def test_one_failing_client_is_reported_and_the_round_goes_on(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1})
    grid = LoopbackGrid(run_config, failing=[2])
    strategy.start(grid)
    record = json.loads((recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert len(record["clients"]) == 2
    stages = {(f["label"], f["stage"]) for f in record["failures"]}
    assert ("node102", "train") in stages and ("node102", "evaluate") in stages
    assert all("refused the connection" in f["reason"] for f in record["failures"])
    assert any("FAILED" in line and "refused the connection" in line for line in lines)


def test_too_few_clients_fails_loudly_with_their_errors_and_keeps_results(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(tmp_path, **{"num-server-rounds": 1})
    grid = LoopbackGrid(run_config, failing=[1, 2])
    with pytest.raises(RoundFailed) as failed:
        strategy.start(grid)
    message = str(failed.value)
    assert "only 1 client(s) succeeded, at least 2 required" in message
    assert message.count("refused the connection") == 2


def test_error_reply_reason_is_the_clients_own_message():
    grid = LoopbackGrid(default_run_config())
    instruction = Message(RecordDict({"config": ConfigRecord({"prompt": "p"})}), dst_node_id=100,
                          message_type=MessageType.TRAIN)
    ray_style = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
                 "  File \"client_app.py\", line 8, in train\n"
                 "Exception ClientAppException occurred. Message: setting 'llm-api-key-env' = 'KEY' is not accepted")
    reply = Message(Error(code=2, reason=ray_style), reply_to=instruction)
    assert error_reason(reply) == "setting 'llm-api-key-env' = 'KEY' is not accepted"
    assert grid.get_node_ids() == [100, 101, 102]


def test_evaluation_is_weighted_by_examples(tmp_path):
    strategy, run_config, _, _ = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    messages = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"correct": c, "total": t, "partition_id": i})}), reply_to=m)
        for i, (m, (c, t)) in enumerate(zip(messages, [(9, 10), (0, 30), (30, 60)]))
    ]
    evals, failures = strategy.evaluation_replies(1, replies)
    assert not failures
    from fedtextgrad_core.run.federation import weighted_accuracy

    assert weighted_accuracy(evals) == pytest.approx(39 / 100)


def test_centralized_samples_one_client_holding_all_training_data(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(
        tmp_path, **{"partitioning": "centralized", "num-server-rounds": 1})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    record = json.loads((recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert len(record["clients"]) == 1
    assert record["clients"][0]["num_examples"] == 50  # the whole training split
    assert record["val_examples"] == 100


def test_heterogeneous_gives_each_client_its_own_task(tmp_path):
    strategy, run_config, recorder, _ = make_strategy(
        tmp_path, **{"partitioning": "heterogeneous", "num-server-rounds": 1})
    grid = LoopbackGrid(run_config)
    strategy.start(grid)
    summary = json.loads((recorder.path / "summary.json").read_text())
    assert summary["task"] == ["object_counting", "word_sorting", "multistep_arithmetic_two"]
    record = json.loads((recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert record["val_examples"] == 300  # each client's full validation split of its own task
    assert "Answer: $VALUE" in summary["best_prompt"]


def test_reply_without_a_prompt_is_a_reported_failure_not_a_crash(tmp_path):
    strategy, run_config, _, lines = make_strategy(tmp_path)
    grid = LoopbackGrid(run_config)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    good = grid.send_and_receive(messages[:2])
    bad = Message(RecordDict({"metrics": MetricRecord({"steps": 1.0})}), reply_to=messages[2])
    _, metrics = strategy.aggregate_train(1, good + [bad])
    assert metrics["clients_ok"] == 2 and metrics["clients_failed"] == 1
    assert any("FAILED" in line and "malformed reply: missing prompt.text" in line for line in lines)


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
        "llm-backend": "openai", "llm-base-url": sim_http, "llm-api-key-env": "FEDTEXTGRAD_TEST_KEY"})
    with pytest.raises(RoundFailed) as failed:
        strategy.start(LoopbackGrid(run_config))
    assert "setting 'llm-api-key-env' = 'FEDTEXTGRAD_TEST_KEY' is not accepted" in str(failed.value)


def test_a_client_that_never_replies_is_reported_not_dropped(tmp_path):
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **{"num-server-rounds": 1})
    strategy.start(LoopbackGrid(run_config, silent=[1]))
    record = json.loads((recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert len(record["clients"]) == 2
    assert {(f["label"], f["stage"], f["reason"]) for f in record["failures"]} == {
        ("node101", "train", "no reply before the round's timeout"),
        ("node101", "evaluate", "no reply before the round's timeout"),
    }
