"""The server's bookkeeping without Flower: PromptFederation, require_enough and the progress table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtextgrad_core.run import report
from fedtextgrad_core.run.federation import (
    ClientFailure,
    ClientReply,
    EvalReply,
    PromptFederation,
    RoundFailed,
    require_enough,
    weighted_accuracy,
)
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.run.recorder import RunRecorder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import CATALOGUE, insert_instruction, instructions_in

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEARNED = CATALOGUE["object_counting"]


def federation(tmp_path: Path, merge: str = "concat", lines: list[str] | None = None) -> PromptFederation:
    settings = RunSettings.from_config({"merge": merge, "num-server-rounds": 3})
    recorder = RunRecorder(tmp_path, "run", settings.as_dict())
    merger = make_engine(settings.server) if merge != "concat" else None
    return PromptFederation(settings, recorder, merger, echo=(lines if lines is not None else []).append)


def client_replies(start: str, learned=LEARNED[:2]) -> list[ClientReply]:
    return [
        ClientReply(str(i), insert_instruction(start, ins.sentence), 5,
                    {"llm_calls": 10.0 + i, "prompt_tokens": 100.0, "completion_tokens": 20.0,
                     "val_accuracy": 0.5, "steps": 3.0, "steps_accepted": 1.0})
        for i, ins in enumerate(learned)
    ]


def read_json(path: Path):
    return json.loads(path.read_text())


def read_rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def test_a_run_keeps_the_best_prompt_and_leaves_its_folder(tmp_path: Path) -> None:
    lines: list[str] = []
    fed = federation(tmp_path, lines=lines)
    folder = fed.recorder.path
    start = fed.global_prompt
    assert (folder / "prompts" / "round-000-initial.txt").read_text() == start + "\n"

    assert fed.record_initial([EvalReply("0", 4, 10), EvalReply("1", 6, 10)]) == 0.5
    assert read_json(folder / "summary.json")["initial_val_accuracy"] == 0.5

    # Round 1: better than the start.
    merged1 = fed.merge(1, client_replies(start), [])
    assert instructions_in(merged1.prompt, "object_counting") == ["quantities", "category"]
    assert fed.global_prompt == merged1.prompt
    fed.finish_round(1, [EvalReply("0", 8, 10), EvalReply("1", 6, 10)], [])
    on_disk = read_rounds(folder)
    assert [r["round"] for r in on_disk] == [1]  # on disk before round 2 starts
    assert on_disk[0]["val_accuracy"] == 0.7 and on_disk[0]["merged_prompt"] == merged1.prompt
    assert [c["label"] for c in on_disk[0]["clients"]] == ["0", "1"]
    assert (folder / on_disk[0]["merged_prompt_file"]).read_text() == merged1.prompt + "\n"
    assert (folder / on_disk[0]["clients"][1]["prompt_file"]).read_text().strip() == client_replies(start)[1].prompt

    # Round 2: worse; the best prompt stays round 1's.
    merged2 = fed.merge(2, client_replies(merged1.prompt, LEARNED[2:]), [ClientFailure("1", "LLMError: timeout")])
    fed.finish_round(2, [EvalReply("0", 5, 10)], [])
    assert fed.global_prompt == merged2.prompt != merged1.prompt
    assert (fed.best_prompt, fed.best_accuracy, fed.best_round) == (merged1.prompt, 0.7, 1)
    rounds = read_rounds(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["failures"] == [{"label": "1", "stage": "train", "reason": "LLMError: timeout"}]
    assert rounds[1]["best_val_accuracy"] == 0.7 and rounds[1]["best_round"] == 1

    summary = fed.finish([EvalReply("0", 9, 10), EvalReply("1", 7, 10)])
    on_disk_summary = read_json(folder / "summary.json")
    assert on_disk_summary == summary
    assert summary["finished"] is True and summary["error"] == ""
    assert summary["initial_val_accuracy"] == 0.5
    assert summary["best_val_accuracy"] == 0.7
    assert summary["best_prompt"] == merged1.prompt
    assert summary["final_prompt"] == merged2.prompt
    assert summary["test_accuracy"] == 0.8 and summary["test_examples"] == 20
    assert summary["rounds"] == 2
    cost = summary["cost"]
    assert cost["client_training"]["llm_calls"] == (10 + 11) + 10  # clients of round 1, then the one of round 2
    assert cost["client_training"]["tokens"] == 3 * 120
    assert cost["server_merge"]["llm_calls"] == 0  # concat asks no LLM
    assert cost["total"] == cost["client_training"]
    assert (folder / "prompts" / "best.txt").read_text() == merged1.prompt + "\n"
    assert (folder / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert any("client 1" in line and "FAILED" in line and "LLMError: timeout" in line for line in lines)
    assert any(str(folder) in line for line in lines)


def test_a_tie_does_not_replace_the_best_prompt(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    start = fed.global_prompt
    fed.record_initial([EvalReply("0", 5, 10)])
    fed.merge(1, client_replies(start), [])
    fed.finish_round(1, [EvalReply("0", 5, 10)], [])
    assert (fed.best_prompt, fed.best_round) == (start, 0)


def test_summarize_merge_records_the_server_llm_usage(tmp_path: Path) -> None:
    fed = federation(tmp_path, merge="summarize-uid")
    fed.record_initial([EvalReply("0", 1, 2)])
    merged = fed.merge(1, client_replies(fed.global_prompt, LEARNED), [])
    record = fed.finish_round(1, [EvalReply("0", 2, 2)], [])
    assert instructions_in(merged.prompt, "object_counting") == [ins.id for ins in LEARNED]
    assert record["merge_method"] == "summarize-uid" and record["merge_fallback_reason"] == ""
    assert record["merge_format_repaired"] is False
    assert record["server_llm"]["calls"] == 1 and record["server_llm"]["prompt_tokens"] > 0


def test_evaluation_failures_are_recorded(tmp_path: Path) -> None:
    lines: list[str] = []
    fed = federation(tmp_path, lines=lines)
    fed.record_initial([EvalReply("0", 1, 2)])
    fed.merge(1, client_replies(fed.global_prompt), [])
    record = fed.finish_round(1, [EvalReply("0", 1, 2)], [ClientFailure("1", "DataError: no file")])
    assert record["failures"] == [{"label": "1", "stage": "evaluate", "reason": "DataError: no file"}]
    assert any("(evaluation) DataError: no file" in line for line in lines)


def test_record_error_leaves_an_unfinished_summary_with_the_error(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    fed.record_initial([EvalReply("0", 3, 10)])
    fed.merge(1, client_replies(fed.global_prompt), [])
    fed.finish_round(1, [EvalReply("0", 6, 10)], [])
    fed.record_error(RoundFailed("round 2 training: only 0 client(s) succeeded"))
    summary = read_json(fed.recorder.path / "summary.json")
    assert summary["finished"] is False
    assert summary["error"] == "RoundFailed: round 2 training: only 0 client(s) succeeded"
    assert summary["rounds"] == 1 and summary["best_val_accuracy"] == 0.6
    assert summary["test_accuracy"] is None
    assert (fed.recorder.path / "prompts" / "best.txt").read_text().strip() == fed.best_prompt


def test_require_enough_fails_loudly_with_every_clients_error() -> None:
    failures = [ClientFailure("0", "LLMError: connection refused"), ClientFailure("2", "DataError: missing file")]
    with pytest.raises(RoundFailed) as info:
        require_enough("training", 3, 1, failures, 2)
    message = str(info.value)
    assert "round 3 training" in message and "only 1 client(s)" in message and "at least 2" in message
    assert "client 0: LLMError: connection refused" in message
    assert "client 2: DataError: missing file" in message
    with pytest.raises(RoundFailed, match="no replies arrived"):
        require_enough("evaluation", 1, 0, [], 1)


def test_require_enough_passes_when_enough_clients_answered() -> None:
    require_enough("training", 1, 2, [ClientFailure("2", "boom")], 2)
    require_enough("training", 1, 3, [], 2)


def test_weighted_accuracy_weighs_by_examples() -> None:
    assert weighted_accuracy([EvalReply("0", 9, 10), EvalReply("1", 0, 30)]) == 9 / 40
    assert weighted_accuracy([]) is None


def test_report_rows() -> None:
    assert report.percent(None) == "-" and report.percent(0.5) == "50.0%"
    header = report.header().splitlines()
    assert header[0].startswith("round") and set(header[1]) == {"-"}
    row = report.client_row(2, "1", {"batch_accuracy_before": 0.5, "batch_accuracy_after": 1.0, "val_accuracy": 0.75,
                                     "steps_accepted": 2, "steps": 3, "llm_calls": 17, "prompt_tokens": 900,
                                     "completion_tokens": 100, "seconds": 1.25}, "x" * 321)
    for cell in ("client 1", "50.0%>100.0%", "75.0%", "2/3", "17", "1000", "1.2", "321"):
        assert cell in row
    assert report.failure_row(1, "0", "LLMError: down").endswith("LLMError: down")
    merged = report.merged_row(1, "concat", 0.6, 0.7, "p" * 42, 3.0)
    assert "merged (concat)" in merged and "60.0%" in merged and "best 70.0%" in merged and "42" in merged
