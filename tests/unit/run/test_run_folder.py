"""The run folder (RunFolder) and the typed records written into it."""

from __future__ import annotations

import json
from pathlib import Path

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run import figures
from fedtextgrad_core.run.messages import EvalReply, TrainReply
from fedtextgrad_core.run.records import (
    ROUND_RECORD_VERSION,
    ClientEvaluation,
    ClientId,
    ClientUpload,
    Failure,
    MergeRecord,
    RoundRecord,
    RunSummary,
)
from fedtextgrad_core.run.run_folder import RunFolder, default_run_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def upload(partition: int, prompt: str, val: Scores | None = None) -> ClientUpload:
    reply = TrainReply(prompt=prompt, partition_id=partition, num_examples=5, llm="sim", simulated=True,
                       local=LocalMetrics(steps=2, llm_calls=7, prompt_tokens=70), leaks=LeakCounts(), val=val,
                       val_usage=Usage(calls=4) if val else None)
    return ClientUpload(label=str(partition), client=ClientId(100 + partition, "", partition), reply=reply,
                        prompt_metrics={"chars": len(prompt)})


def evaluation(partition: int, correct: int, total: int) -> ClientEvaluation:
    reply = EvalReply(partition_id=partition, llm="sim", simulated=True, scores=Scores(correct, total, 0, 0.5),
                      usage=Usage(calls=total))
    return ClientEvaluation(label=str(partition), client=ClientId(100 + partition, "", partition), reply=reply)


def round_record(number: int, val_accuracy: float | None, uploads=(), failures=()) -> RoundRecord:
    evaluations = (evaluation(0, 3, 5), evaluation(1, 3, 5)) if val_accuracy is not None else ()
    return RoundRecord(round=number, uploads=tuple(uploads), failures=tuple(failures),
                       merge=MergeRecord(method="concat"), merged_prompt=f"merged {number}",
                       merged_prompt_metrics=None, evaluations=evaluations, val_accuracy=val_accuracy,
                       val_examples=10 if evaluations else 0, best_val_accuracy=val_accuracy, best_round=number)


def summary(finished: bool, rounds: int) -> RunSummary:
    return RunSummary(finished=finished, error="", rounds=rounds, rounds_planned=3, task=("object_counting",),
                      partitioning="homogeneous", merge="concat", initial_prompt="start", initial_val_accuracy=0.4,
                      best_val_accuracy=0.6, best_round=1, best_prompt="best", final_prompt="final",
                      results_dir="x", cost={"total": {"llm_calls": 3, "tokens": 30}})


def test_folder_layout_and_config(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path / "results", "object_counting-homogeneous", {"merge": "concat", "rounds": 3})
    assert folder.path == (tmp_path / "results" / "object_counting-homogeneous").resolve()
    assert json.loads((folder.path / "config.json").read_text()) == {"merge": "concat", "rounds": 3}
    assert (folder.path / "prompts").is_dir()
    assert (folder.path / "rounds.jsonl").read_text() == ""


def test_unsafe_run_and_prompt_names_stay_inside_the_folder(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "../../escape me", {})
    assert folder.path.parent == tmp_path.resolve()
    relative = folder.save_prompt("../client/a b", "text")
    saved = folder.path / relative
    assert saved.parent == folder.path / "prompts"
    assert saved.read_text() == "text\n"
    assert RunFolder.create(tmp_path, "///", {}).path.name == "run"


def test_rounds_are_on_disk_line_by_line(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "run", {})
    rounds_file = folder.path / "rounds.jsonl"
    first = round_record(1, 0.5, uploads=[upload(0, "p0", Scores(2, 4, 0, 0.1)), upload(1, "p1")])
    folder.append_round(first)
    # Read the file directly, as someone watching a running experiment would.
    (line,) = rounds_file.read_text().splitlines()
    on_disk = json.loads(line)
    assert on_disk == first.to_json()
    assert on_disk["round"] == 1 and on_disk["val_accuracy"] == 0.5 and on_disk["version"] == ROUND_RECORD_VERSION
    assert [u["label"] for u in on_disk["uploads"]] == ["0", "1"]
    assert on_disk["uploads"][0]["client"] == {"node_id": 100, "name": "", "partition_id": 0}
    assert on_disk["uploads"][0]["reply"]["local"]["llm_calls"] == 7
    second = round_record(2, None, failures=[Failure("1", "train", "LLMError: timeout", 101)])
    folder.append_round(second)
    lines = rounds_file.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["failures"] == [
        {"label": "1", "stage": "train", "reason": "LLMError: timeout", "node_id": 101}]
    assert folder.read_rounds() == [first, second]  # typed records survive the round trip exactly


def test_a_round_line_of_the_older_format_reads_as_a_typed_record(tmp_path: Path) -> None:
    """Folders written before typed records (version 1) still resume and compare."""
    v1 = {
        "round": 1,
        "clients": [
            {"label": "0", "num_examples": 5, "prompt": "prompt of 0", "prompt_file": "prompts/round-001-client-0.txt",
             "prompt_metrics": {"chars": 11},
             "metrics": {"partition_id": 0.0, "llm_calls": 12.0, "prompt_tokens": 300.0, "completion_tokens": 40.0,
                         "steps": 3.0, "steps_accepted": 1.0, "val_accuracy": 0.75, "val_examples": 8.0,
                         "eval_llm_calls": 8.0, "eval_tokens": 200.0}},
            {"label": "1", "num_examples": 6, "prompt": "prompt of 1", "metrics": {"llm_calls": 10.0}},
        ],
        "failures": [{"label": "2", "stage": "train", "reason": "LLMError: timeout"}],
        "merge_method": "summarize-uid", "merge_fallback_reason": "", "merge_format_repaired": False,
        "merged_prompt": "merged", "merged_prompt_file": "prompts/round-001-merged.txt",
        "merged_prompt_metrics": {"chars": 6, "surprisal_variance": 2.5},
        "server_llm": {"calls": 1, "prompt_tokens": 90, "completion_tokens": 30},
        "robust_merge": None,
        "val_accuracy": 0.6, "val_examples": 20,
        "val_per_client": {"0": {"correct": 6.0, "total": 10.0, "partition_id": 0.0, "llm_calls": 10.0, "tokens": 99.0},
                           "1": {"correct": 6.0, "total": 10.0, "partition_id": 1.0}},
        "best_val_accuracy": 0.6, "best_round": 1, "seconds": 4.5, "started_at": 1.0, "ended_at": 5.5,
    }
    folder = RunFolder.create(tmp_path, "old", {})
    folder.rounds_file.write_text(json.dumps(v1) + "\n")
    (record,) = folder.read_rounds()
    assert record.version == ROUND_RECORD_VERSION and record.round == 1
    assert [(u.label, u.client.partition_id, u.reply.prompt, u.reply.num_examples) for u in record.uploads] == [
        ("0", 0, "prompt of 0", 5), ("1", 1, "prompt of 1", 6)]
    assert record.uploads[0].reply.local.llm_calls == 12 and record.uploads[0].reply.local.completion_tokens == 40
    assert record.uploads[0].reply.val.accuracy == 0.75 and record.uploads[0].reply.val_usage.calls == 8
    assert record.uploads[1].reply.val is None
    assert record.failures == (Failure("2", "train", "LLMError: timeout", None),)
    assert record.merge.method == "summarize-uid" and record.merged_prompt == "merged"
    assert record.merged_prompt_metrics["surprisal_variance"] == 2.5
    assert record.server_llm == Usage(calls=1, prompt_tokens=90, completion_tokens=30)
    assert [(e.label, e.reply.scores.correct, e.reply.scores.total) for e in record.evaluations] == [
        ("0", 6, 10), ("1", 6, 10)]
    assert record.evaluations[0].reply.usage.calls == 10
    assert (record.val_accuracy, record.val_examples, record.best_round) == (0.6, 20, 1)


def test_summary_is_replaced_whole(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "run", {})
    folder.write_summary(summary(False, 1))
    folder.write_summary(summary(True, 2))
    assert json.loads((folder.path / "summary.json").read_text()) == summary(True, 2).to_json()
    assert folder.read_summary() == summary(True, 2)
    assert not list(folder.path.glob("*.tmp"))


def test_client_prompts_of_a_round_are_one_file(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "run", {})
    entries = [{"label": "0", "node_id": 100, "partition_id": 0, "left_out": False, "prompt": "a\nb"},
               {"label": "node 7", "node_id": 7, "partition_id": None, "left_out": True, "prompt": "c"}]
    relative = folder.save_client_prompts(3, entries)
    assert relative == "prompts/round-003-clients.jsonl"
    assert [json.loads(line) for line in (folder.path / relative).read_text().splitlines()] == entries


def test_accuracy_plot_is_a_png(tmp_path: Path) -> None:
    rounds = [round_record(1, 0.6, uploads=[upload(0, "p0", Scores(1, 2, 0, 0.1)), upload(1, "p1")]),
              round_record(2, None)]
    target = figures.plot_accuracy(rounds, tmp_path / "accuracy.png", initial_accuracy=0.4, title="run",
                                   simulated=True)
    assert target == tmp_path / "accuracy.png"
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_the_accuracy_figure_bands_each_known_accuracy_with_its_wilson_interval(tmp_path: Path) -> None:
    from dataclasses import replace

    from fedtextgrad_core.stats import wilson

    rounds = [replace(round_record(1, 0.6), val_interval=wilson(12, 20)), round_record(2, None)]
    band = figures.merged_interval_band(rounds, initial=wilson(8, 20))
    assert band["round"] == [0, 1] and band["n"] == [20, 20]  # round 2 recorded no interval: no band there
    assert band["low"][1] < 0.6 < band["high"][1] and (band["low"][1], band["high"][1]) == (wilson(12, 20).low,
                                                                                          wilson(12, 20).high)
    target = figures.plot_accuracy(rounds, tmp_path / "accuracy.png", initial_accuracy=0.4, title="run",
                                   simulated=True, initial_interval=wilson(8, 20))
    assert target.read_bytes().startswith(PNG_MAGIC)


def test_default_run_name_names_the_experiment() -> None:
    name = default_run_name("object_counting", "homogeneous", "summarize-uid")
    assert name.startswith("object_counting-homogeneous-summarize-uid-")
    assert name.rsplit("-", 2)[-2].isdigit()  # the date stamp


def test_a_second_run_with_the_same_name_gets_its_own_folder(tmp_path) -> None:
    first = RunFolder.create(tmp_path, "same", {"n": 1})
    record = round_record(1, 0.5)
    first.append_round(record)
    second = RunFolder.create(tmp_path, "same", {"n": 2})
    assert second.path != first.path and second.path.name == "same-2"
    assert first.read_rounds() == [record]  # the first run's rounds are untouched
    assert json.loads((first.path / "config.json").read_text()) == {"n": 1}
