"""The server's loop and bookkeeping without Flower: Federation over a scripted ClientPool,
the round step's require_enough, client labels and the progress table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run import recorder as recorder_module
from fedtextgrad_core.run import report
from fedtextgrad_core.run.federation import ClientLabels, Replies
from fedtextgrad_core.run.messages import Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.recorder import weighted_accuracy
from fedtextgrad_core.run.records import ClientEvaluation, ClientId, Failure
from fedtextgrad_core.run.round_step import RoundFailed, require_enough
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.sim import insert_instruction, instructions_in
from tests.support.scripted_pool import (
    LEARNED,
    PNG_MAGIC,
    Answer,
    ScriptedPool,
    eval_reply,
    evals,
    make_federation,
    start_prompt,
    train_reply,
    uploads,
)


def read_clients_file(folder: Path, server_round: int) -> list[dict]:
    path = folder / "prompts" / f"round-{server_round:03d}-clients.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_keeps_the_best_prompt_and_leaves_its_folder(tmp_path: Path) -> None:
    start = start_prompt()
    round1 = uploads(start)
    seen: dict[tuple[str, int], list[int]] = {}

    def watch(request: RoundRequest) -> None:  # what a person watching the folder sees before each request
        seen[(request.phase, request.server_round)] = [r.round for r in RunFolder(tmp_path / "run").read_rounds()]
        if (request.phase, request.server_round) == ("train", 1):
            summary = RunFolder(tmp_path / "run").read_summary()
            assert summary.initial_val_accuracy == 0.5 and summary.finished is False

    def round_2_uploads(request: RoundRequest) -> dict[int, Answer]:  # built on round 1's merged prompt
        return {100: train_reply(0, insert_instruction(fed.state.global_prompt, LEARNED[2].sentence), 10),
                101: "LLMError: timeout"}

    pool = ScriptedPool(2, {
        (Phase.EVALUATE, 0): evals((4, 10), (6, 10)),
        (Phase.TRAIN, 1): round1,
        (Phase.EVALUATE, 1): evals((8, 10), (6, 10)),
        (Phase.TRAIN, 2): round_2_uploads,
        (Phase.EVALUATE, 2): {100: eval_reply(0, 5, 10), 101: "LLMError: evaluation timeout"},
        (Phase.TEST, 2): evals((9, 10), (7, 10)),
    }, watch)
    lines: list[str] = []
    fed = make_federation(tmp_path, pool, lines=lines)
    folder = fed.recorder.path
    assert folder == (tmp_path / "run").resolve()
    assert (folder / "prompts" / "round-000-initial.txt").read_text() == start + "\n"
    summary = fed.run()

    rounds = RunFolder(folder).read_rounds()
    assert [r.round for r in rounds] == [1, 2]
    assert seen[("train", 2)] == [1]  # round 1 was on disk before round 2 started
    assert seen[("train", 1)] == [] and seen[("test", 2)] == [1, 2]

    first, second = rounds
    merged1 = first.merged_prompt
    assert instructions_in(merged1, "object_counting") == ["quantities", "category"]
    assert first.val_accuracy == 0.7 and first.val_examples == 20
    assert [u.label for u in first.uploads] == ["0", "1"]  # partition order, not arrival order
    assert [u.client for u in first.uploads] == [ClientId(100, "", 0), ClientId(101, "", 1)]
    assert [u.reply for u in first.uploads] == [round1[100], round1[101]]
    assert [e.label for e in first.evaluations] == ["0", "1"] and first.failures == ()
    assert first.merge.method == "concat" and first.server_llm is None
    assert (folder / "prompts" / "round-001-merged.txt").read_text() == merged1 + "\n"
    assert read_clients_file(folder, 1) == [
        {"label": "0", "node_id": 100, "partition_id": 0, "left_out": False, "prompt": round1[100].prompt},
        {"label": "1", "node_id": 101, "partition_id": 1, "left_out": False, "prompt": round1[101].prompt},
    ]

    # Round 2: worse; the best prompt stays round 1's.
    merged2 = second.merged_prompt
    assert merged2 != merged1 and fed.state.global_prompt == merged2
    assert (fed.state.best_prompt, fed.state.best_accuracy, fed.state.best_round) == (merged1, 0.7, 1)
    assert [u.label for u in second.uploads] == ["0"]
    assert second.failures == (Failure("1", "train", "LLMError: timeout", 101),
                               Failure("1", "evaluate", "LLMError: evaluation timeout", 101))
    assert second.val_accuracy == 0.5 and second.val_examples == 10
    assert second.best_val_accuracy == 0.7 and second.best_round == 1

    # the final test (test-prompts=best): an explicit test phase on the best prompt, carrying the last round
    test_request, test_nodes = pool.asked[-1]
    assert test_request == RoundRequest(phase="test", server_round=2, prompt=merged1) and test_nodes == [100, 101]
    assert [request.phase for request, _ in pool.asked] == ["evaluate", "train", "evaluate", "train", "evaluate",
                                                            "test"]

    assert RunFolder(folder).read_summary() == summary
    assert summary.finished is True and summary.error == ""
    assert summary.initial_val_accuracy == 0.5
    assert summary.best_val_accuracy == 0.7 and summary.best_round == 1
    assert summary.best_prompt == merged1
    assert summary.final_prompt == merged2
    assert summary.test_accuracy == 0.8 and summary.test_examples == 20 and summary.test_failures == ()
    assert summary.rounds == 2 and summary.rounds_planned == 2
    assert summary.client_llms == {"0": "sim (test)", "1": "sim (test)"}
    cost = summary.cost
    assert cost["client_training"]["llm_calls"] == (10 + 11) + 10  # clients of round 1, then the one of round 2
    assert cost["client_training"]["tokens"] == 3 * 120
    # evaluations: the start prompt (20 examples), rounds 1 (20) and 2 (10), the test (20), one call
    # of 11 tokens each; and each upload's own validation (10 calls of 42 tokens each, three uploads)
    assert cost["client_evaluation"]["llm_calls"] == (20 + 20 + 10 + 20) + 3 * 10
    assert cost["client_evaluation"]["tokens"] == (20 + 20 + 10 + 20) * 11 + 3 * 42
    assert cost["server_merge"] == {"llm_calls": 0, "tokens": 0}  # concat asks no LLM
    assert cost["total"] == {key: cost["client_training"][key] + cost["client_evaluation"][key]
                             for key in ("llm_calls", "tokens")}
    assert (folder / "prompts" / "best.txt").read_text() == merged1 + "\n"
    assert (folder / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert "initial prompt: validation accuracy 50.0% [29.9-70.1] (n=20)" in lines
    assert any("client 1" in line and "FAILED" in line and "LLMError: timeout" in line for line in lines)
    assert any("client 1" in line and "FAILED" in line and "(evaluation) LLMError: evaluation timeout" in line
               for line in lines)
    assert any("merged (concat)" in line and "70.0% (20)" in line for line in lines)
    assert any(str(folder) in line for line in lines)


def test_a_tie_does_not_replace_the_best_prompt(tmp_path: Path) -> None:
    start = start_prompt()
    pool = ScriptedPool(1, {
        (Phase.EVALUATE, 0): evals((5, 10)), (Phase.TRAIN, 1): {100: uploads(start)[100]},
        (Phase.EVALUATE, 1): evals((5, 10)), (Phase.TEST, 1): evals((5, 10)),
    })
    fed = make_federation(tmp_path, pool, rounds=1)
    summary = fed.run()
    assert (fed.state.best_prompt, fed.state.best_round) == (start, 0)
    assert summary.best_prompt == start and summary.best_round == 0 and summary.final_prompt != start
    assert pool.asked[-1][0] == RoundRequest(phase="test", server_round=1, prompt=start)


def test_the_test_phase_scores_the_best_last_and_start_prompts(tmp_path: Path) -> None:
    start = start_prompt()

    def tests(request: RoundRequest) -> dict[int, Answer]:  # 9, 7 and 3 of 10 right: best, last, start prompt
        first, second = RunFolder(tmp_path / "run").read_rounds()
        correct = {first.merged_prompt: 9, second.merged_prompt: 7, start: 3}[request.prompt]
        return {100: eval_reply(0, correct, 10), 101: eval_reply(1, correct, 10)}

    def round_2_uploads(request: RoundRequest) -> dict[int, Answer]:
        return {node: train_reply(node - 100, insert_instruction(request.prompt, LEARNED[2].sentence), 1)
                for node in (100, 101)}

    pool = ScriptedPool(2, {
        (Phase.EVALUATE, 0): evals((4, 10), (4, 10)),
        (Phase.TRAIN, 1): uploads(start), (Phase.EVALUATE, 1): evals((8, 10), (8, 10)),
        (Phase.TRAIN, 2): round_2_uploads, (Phase.EVALUATE, 2): evals((6, 10), (6, 10)),
        (Phase.TEST, 2): tests,
    })
    fed = make_federation(tmp_path, pool, **{"test-prompts": "best,last,initial"})
    summary = fed.run()
    best, last = (r.merged_prompt for r in RunFolder(fed.recorder.path).read_rounds())
    tested = [request for request, _ in pool.asked if request.kind is Phase.TEST]
    assert tested == [RoundRequest("test", 2, best), RoundRequest("test", 2, last), RoundRequest("test", 2, start)]
    assert (summary.test_accuracy, summary.last_test_accuracy, summary.initial_test_accuracy) == (0.9, 0.7, 0.3)
    assert summary.test_examples == 20
    assert summary.cost["client_evaluation"]["llm_calls"] == (20 + 20 + 20) + 3 * 20 + 4 * 10  # val, test, own val


class SendingPool(ScriptedPool):
    """A ScriptedPool that can also send several requests at once (``send``); every such batch is
    kept in ``batches`` as sent, and each request is answered when its replies are asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[tuple[RoundRequest, list[int]]]] = []
        self.together: list[bool] = []  # per batch: whether a client may answer it in one message

    def send(self, requests: Sequence[tuple[RoundRequest, Sequence[int]]], together: bool = False):
        self.batches.append([(request, list(nodes)) for request, nodes in requests])
        self.together.append(together)
        pool = self

        class Sent:
            def replies(self, index: int) -> Replies:
                request, nodes = requests[index]
                return pool.ask(request, nodes)

        return Sent()


@pytest.mark.parametrize("server_backend", ["", "sim"], ids=["server-llm-unset", "server-llm-sim-on-purpose"])
def test_the_start_evaluation_travels_with_round_1s_training_marked_for_simulated_clients_when_the_server_would_be(
        tmp_path: Path, server_backend: str) -> None:
    """The start prompt's evaluation and round 1's training on the same prompt go in one message per
    client (one ClientApp process less per node in a deployment). When the server would merge with the
    simulated LLM only because server-backend is unset, every training request says it is for simulated
    clients only: a client with a real LLM refuses it at once, since the server stops the run on that
    client's evaluation (check_server_llm)."""
    start = start_prompt()
    pool = SendingPool(2, {
        (Phase.EVALUATE, 0): evals((4, 10), (4, 10)), (Phase.TRAIN, 1): uploads(start, LEARNED[:2]),
        (Phase.EVALUATE, 1): evals((6, 10), (6, 10)),
        (Phase.TRAIN, 2): lambda request: uploads(request.prompt, [LEARNED[2]] * 2),
        (Phase.EVALUATE, 2): evals((8, 10), (8, 10)), (Phase.TEST, 2): evals((8, 10), (8, 10)),
    })
    overrides = {"server-backend": server_backend} if server_backend else {}
    fed = make_federation(tmp_path, pool, merge="summarize-uid", **overrides)
    fed.run()
    first = pool.batches[0]
    assert [(r.phase, r.server_round, r.prompt) for r, _ in first] == [("evaluate", 0, start), ("train", 1, start)]
    assert pool.together[0] is True and first[0][1] == first[1][1] == [100, 101]
    trainings = [request for request, _ in pool.asked if request.kind is Phase.TRAIN]
    assert len(trainings) == 2 and {r.simulated_only for r in trainings} == {server_backend == ""}
    assert not any(r.simulated_only for r, _ in pool.asked if r.kind is not Phase.TRAIN)


@pytest.mark.parametrize("last_round_wins", [True, False], ids=["last-round-improves", "earlier-round-stays-best"])
def test_the_final_tests_known_before_the_last_evaluation_go_with_it_and_only_the_others_after(
        tmp_path: Path, last_round_wins: bool) -> None:
    """The last merged prompt and the start prompt are known before the last evaluation: their tests
    travel with it (one message per client in a deployment, instead of one more exchange). The best
    prompt is known only after it: when the last round improves, it is the last merged prompt, already
    tested; when an earlier round stays best, its test follows, to the same clients, alone."""
    start = start_prompt()

    def round_2_uploads(request: RoundRequest) -> dict[int, Answer]:
        return {node: train_reply(node - 100, insert_instruction(request.prompt, LEARNED[2].sentence), 1)
                for node in (100, 101, 102)}

    def tests(request: RoundRequest) -> dict[int, Answer]:
        correct = 3 if request.prompt == start else 9 if request.prompt == fed.state.best_prompt else 7
        return {node: eval_reply(node - 100, correct, 10) for node in (100, 101, 102)}

    pool = SendingPool(3, {
        (Phase.EVALUATE, 0): evals((4, 10), (4, 10), (4, 10)),
        (Phase.TRAIN, 1): uploads(start, LEARNED[:3]), (Phase.EVALUATE, 1): evals((6, 10), (6, 10), (6, 10)),
        (Phase.TRAIN, 2): round_2_uploads,
        (Phase.EVALUATE, 2): evals(*[(8, 10) if last_round_wins else (5, 10)] * 3),
        (Phase.TEST, 2): tests,
    })
    fed = make_federation(tmp_path, pool, **{"test-prompts": "best,last,initial", "fraction-train": 0.67})
    summary = fed.run()
    first, last = (r.merged_prompt for r in RunFolder(fed.recorder.path).read_rounds())
    assert first != last and summary.best_prompt == (last if last_round_wins else first)

    with_evaluation = pool.batches[-1]
    assert [(r.phase, r.server_round, r.prompt) for r, _ in with_evaluation] == [
        ("evaluate", 2, last), ("test", 2, last), ("test", 2, start)]
    test_clients = with_evaluation[1][1]
    assert len(test_clients) == 2 and with_evaluation[2][1] == test_clients  # one draw of 2 of the 3 clients
    tested = [(request.prompt, nodes) for request, nodes in pool.asked if request.kind is Phase.TEST]
    if last_round_wins:  # nothing is tested twice, nothing after
        assert tested == [(last, test_clients), (start, test_clients)]
    else:  # the best, then (asked in test-prompts order) the two sent with the evaluation
        assert tested == [(first, test_clients), (last, test_clients), (start, test_clients)]
    assert (summary.test_accuracy, summary.last_test_accuracy, summary.initial_test_accuracy) == (
        (0.9, 0.9, 0.3) if last_round_wins else (0.9, 0.7, 0.3))


def test_summarize_merge_records_the_server_llm_usage(tmp_path: Path) -> None:
    start = start_prompt()
    pool = ScriptedPool(len(LEARNED), {
        (Phase.EVALUATE, 0): evals(*[(1, 2)] * len(LEARNED)), (Phase.TRAIN, 1): uploads(start, LEARNED),
        (Phase.EVALUATE, 1): evals(*[(2, 2)] * len(LEARNED)), (Phase.TEST, 1): evals(*[(2, 2)] * len(LEARNED)),
    })
    fed = make_federation(tmp_path, pool, merge="summarize-uid", rounds=1)
    summary = fed.run()
    (record,) = RunFolder(fed.recorder.path).read_rounds()
    assert instructions_in(record.merged_prompt, "object_counting") == [ins.id for ins in LEARNED]
    assert record.merge.method == "summarize-uid" and record.merge.fallback_reason == ""
    assert record.merge.format_repaired is False
    assert record.server_llm is not None
    assert record.server_llm.calls == 1 and record.server_llm.prompt_tokens > 0
    assert summary.cost["server_merge"]["llm_calls"] == 1
    assert summary.cost["server_merge"]["tokens"] == record.server_llm.prompt_tokens + record.server_llm.completion_tokens


def test_evaluation_failures_are_recorded(tmp_path: Path) -> None:
    start = start_prompt()
    lines: list[str] = []
    pool = ScriptedPool(2, {
        (Phase.EVALUATE, 0): evals((1, 2), (1, 2)), (Phase.TRAIN, 1): uploads(start),
        (Phase.EVALUATE, 1): {100: eval_reply(0, 1, 2), 101: "DataError: no file"},
        (Phase.TEST, 1): {100: eval_reply(0, 1, 2), 101: "DataError: no test file"},
    })
    fed = make_federation(tmp_path, pool, rounds=1, lines=lines)
    summary = fed.run()
    (record,) = RunFolder(fed.recorder.path).read_rounds()
    assert record.failures == (Failure("1", "evaluate", "DataError: no file", 101),)
    assert [e.label for e in record.evaluations] == ["0"] and record.val_examples == 2
    assert any("(evaluation) DataError: no file" in line for line in lines)
    assert summary.test_failures == (Failure("1", "test", "DataError: no test file", 101),)
    assert summary.test_examples == 2
    assert any("(test) DataError: no test file" in line for line in lines)


def test_a_failed_round_leaves_an_unfinished_summary_with_the_error(tmp_path: Path) -> None:
    start = start_prompt()
    lines: list[str] = []
    pool = ScriptedPool(2, {
        (Phase.EVALUATE, 0): evals((3, 10), (3, 10)),
        (Phase.TRAIN, 1): uploads(start), (Phase.EVALUATE, 1): evals((6, 10), (6, 10)),
        (Phase.TRAIN, 2): {100: "LLMError: down", 101: "LLMError: down too"},
    })
    fed = make_federation(tmp_path, pool, rounds=3, lines=lines)
    with pytest.raises(RoundFailed) as failed:
        fed.run()
    assert str(failed.value).startswith("round 2 training: only 0 client(s) succeeded, at least 1 required")
    assert "client 0: LLMError: down" in str(failed.value) and "client 1: LLMError: down too" in str(failed.value)
    summary = RunFolder(fed.recorder.path).read_summary()
    assert summary.finished is False
    assert summary.error == f"RoundFailed: {failed.value}"
    assert summary.rounds == 1 and summary.best_val_accuracy == 0.6 and summary.best_round == 1
    assert summary.test_accuracy is None
    assert (fed.recorder.path / "prompts" / "best.txt").read_text().strip() == fed.state.best_prompt
    assert any(line.startswith("fedtextgrad: the run stopped: round 2 training") for line in lines)
    assert [r.round for r in RunFolder(fed.recorder.path).read_rounds()] == [1]


def test_require_enough_fails_loudly_with_every_clients_error() -> None:
    failures = [Failure("0", "train", "LLMError: connection refused", 100),
                Failure("2", "train", "DataError: missing file", 102)]
    with pytest.raises(RoundFailed) as info:
        require_enough("training", 3, 1, failures, 2)
    message = str(info.value)
    assert "round 3 training" in message and "only 1 client(s)" in message and "at least 2" in message
    assert "client 0: LLMError: connection refused" in message
    assert "client 2: DataError: missing file" in message
    with pytest.raises(RoundFailed, match="no replies arrived"):
        require_enough("evaluation", 1, 0, [], 1)


def test_require_enough_passes_when_enough_clients_answered() -> None:
    require_enough("training", 1, 2, [Failure("2", "train", "boom")], 2)
    require_enough("training", 1, 3, [], 2)


def test_weighted_accuracy_weighs_by_examples() -> None:
    evaluations = [ClientEvaluation("0", ClientId(100, "", 0), eval_reply(0, 9, 10)),
                   ClientEvaluation("1", ClientId(101, "", 1), eval_reply(1, 0, 30))]
    assert weighted_accuracy(evaluations) == 9 / 40
    assert weighted_accuracy([]) is None


def test_client_labels_are_partitions_then_node_ids_then_names() -> None:
    warnings: list[str] = []
    labels = ClientLabels(warnings.append)
    assert labels.label(123) == "node 123"  # nothing reported yet
    labels.see(ClientId(100, "", 0))
    labels.see(ClientId(101, "", 1))
    assert (labels.label(100), labels.label(101)) == ("0", "1") and warnings == []
    labels.see(ClientId(102, "", 0))  # a second node claims partition 0: both kept, told apart by node id
    assert (labels.label(100), labels.label(102), labels.label(101)) == ("0 (node 100)", "0 (node 102)", "1")
    assert len(warnings) == 1 and "nodes 100, 102 all report partition 0" in warnings[0]
    labels.see(ClientId(102, "", 0))
    assert len(warnings) == 1  # warned once per partition
    assert labels.client(102) == ClientId(102, "", 0)
    assert sorted([102, 101, 100], key=labels.order) == [100, 102, 101]
    labels.see(ClientId(104, "site-b", 3))  # a registered name (deployment with node authentication)
    labels.see(ClientId(105, "site-c"))
    assert labels.label(104) == "3 (site-b)" and labels.label(105) == "site-c"


def test_report_rows() -> None:
    assert report.percent(None) == "-" and report.percent(0.5) == "50.0%"
    header = report.header().splitlines()
    assert header[0].startswith("round") and "val acc (n)" in header[0] and set(header[1]) == {"-"}
    reply = TrainReply(prompt="x" * 321, partition_id=1, num_examples=5, llm="sim", simulated=True,
                       local=LocalMetrics(steps=3, steps_accepted=2, batch_accuracy_before=0.5,
                                          batch_accuracy_after=1.0, llm_calls=17, prompt_tokens=900,
                                          completion_tokens=100, seconds=1.0),
                       leaks=LeakCounts(), val=Scores(correct=6, total=8, malformed=0, seconds=0.25))
    row = report.client_row(2, "1", reply)
    for cell in ("client 1", "50.0%>100.0%", "75.0% (8)", "2/3", "17", "1000", "1.2", "321"):
        assert cell in row
    assert report.failure_row(1, "0", "LLMError: down").endswith("LLMError: down")
    merged = report.merged_row(1, "concat", 0.6, 34, 0.7, "p" * 42, 3.0)
    assert "merged (concat)" in merged and "60.0% (34)" in merged and "best 70.0%" in merged and "42" in merged
    assert "-" in report.merged_row(1, "concat", None, 0, None, "p", 0.0)


def test_a_client_that_trained_in_milliseconds_does_not_show_zero_seconds():
    assert report.secs(0.0045) == "0.004" and report.secs(0.25) == "0.2" and report.secs(12.34) == "12.3"
    assert report.secs(0.0) == "0.0"  # nothing measured (e.g. an old run folder) stays as it was


@pytest.mark.parametrize("redraw_every", [0.0, 3600.0])
def test_figures_are_redrawn_at_most_every_so_often_and_are_complete_when_a_run_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redraw_every: float) -> None:
    """A quick round does not redraw the figures (drawing holds the GIL that in-process clients
    need); a round after REDRAW_EVERY_SECONDS does; the last round and a stopped run always do."""
    monkeypatch.setattr(recorder_module, "REDRAW_EVERY_SECONDS", redraw_every)
    start = start_prompt()
    seen: dict[int, bool] = {}

    def watch(request: RoundRequest) -> None:
        if request.kind is Phase.TRAIN and request.server_round == 3:  # round 1's drawing has finished by now
            seen[3] = (tmp_path / "run" / "accuracy.png").exists()

    script = {(Phase.EVALUATE, 0): evals((3, 10), (3, 10))}
    for server_round in (1, 2, 3):
        script[(Phase.TRAIN, server_round)] = uploads(start)
        script[(Phase.EVALUATE, server_round)] = evals((5, 10), (5, 10))
    script[(Phase.TEST, 3)] = evals((5, 10), (5, 10))
    fed = make_federation(tmp_path, ScriptedPool(2, script, watch=watch), rounds=3)
    fed.run()
    assert seen == {3: redraw_every == 0.0}
    for name in ("accuracy.png", "prompt_metrics.png"):
        assert (fed.recorder.path / name).read_bytes().startswith(PNG_MAGIC)

    stopped_at = tmp_path / "stopped"
    script[(Phase.TRAIN, 2)] = {100: "LLMError: down", 101: "LLMError: down too"}
    fed = make_federation(stopped_at, ScriptedPool(2, script), rounds=3)
    with pytest.raises(RoundFailed):
        fed.run()
    assert (fed.recorder.path / "accuracy.png").read_bytes().startswith(PNG_MAGIC)  # round 1, drawn on stopping
