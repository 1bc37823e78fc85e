"""The run folder written by RunRecorder."""

from __future__ import annotations

import json
from pathlib import Path

from fedtextgrad_core.run.recorder import RunRecorder, default_run_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_folder_layout_and_config(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path / "results", "object_counting-homogeneous", {"merge": "concat", "rounds": 3})
    assert recorder.path == (tmp_path / "results" / "object_counting-homogeneous").resolve()
    assert json.loads((recorder.path / "config.json").read_text()) == {"merge": "concat", "rounds": 3}
    assert (recorder.path / "prompts").is_dir()
    assert (recorder.path / "rounds.jsonl").read_text() == ""


def test_unsafe_run_and_prompt_names_stay_inside_the_folder(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "../../escape me", {})
    assert recorder.path.parent == tmp_path.resolve()
    relative = recorder.save_prompt("../client/a b", "text")
    saved = recorder.path / relative
    assert saved.parent == recorder.path / "prompts"
    assert saved.read_text() == "text\n"
    assert RunRecorder(tmp_path, "///", {}).path.name == "run"


def test_rounds_are_on_disk_line_by_line(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "run", {})
    rounds_file = recorder.path / "rounds.jsonl"
    recorder.append_round({"round": 1, "val_accuracy": 0.5})
    # Read the file directly, as someone watching a running experiment would.
    assert [json.loads(line) for line in rounds_file.read_text().splitlines()] == [{"round": 1, "val_accuracy": 0.5}]
    recorder.append_round({"round": 2, "val_accuracy": 0.75, "when": Path("x")})
    lines = rounds_file.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == {"round": 2, "val_accuracy": 0.75, "when": "x"}
    assert recorder.read_rounds() == [json.loads(line) for line in lines]


def test_summary_is_replaced_whole(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "run", {})
    recorder.write_summary({"finished": False, "rounds": 1})
    recorder.write_summary({"finished": True, "rounds": 2})
    assert json.loads((recorder.path / "summary.json").read_text()) == {"finished": True, "rounds": 2}
    assert not list(recorder.path.glob("*.tmp"))


def test_accuracy_plot_is_a_png(tmp_path: Path) -> None:
    recorder = RunRecorder(tmp_path, "run", {})
    rounds = [
        {"round": 1, "val_accuracy": 0.6, "clients": [{"label": "0", "metrics": {"val_accuracy": 0.5}},
                                                       {"label": "1", "metrics": {}}]},
        {"round": 2, "val_accuracy": None, "clients": []},
    ]
    target = recorder.plot_accuracy(rounds, initial_accuracy=0.4)
    assert target == recorder.path / "accuracy.png"
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_default_run_name_names_the_experiment() -> None:
    name = default_run_name("object_counting", "homogeneous", "summarize-uid")
    assert name.startswith("object_counting-homogeneous-summarize-uid-")
    assert name.rsplit("-", 2)[-2].isdigit()  # the date stamp


def test_a_second_run_with_the_same_name_gets_its_own_folder(tmp_path) -> None:
    first = RunRecorder(tmp_path, "same", {"n": 1})
    first.append_round({"round": 1})
    second = RunRecorder(tmp_path, "same", {"n": 2})
    assert second.path != first.path and second.path.name == "same-2"
    assert first.read_rounds() == [{"round": 1}]  # the first run's rounds are untouched
