"""The server's checks of client uploads: only bounded plain text is merged; a rejected
upload is a reported failure with its reason, never merged and never silently dropped."""

from __future__ import annotations

import json

import pytest

from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.method.upload_checks import upload_problem
from fedtextgrad_core.run.messages import TrainReply
from fedtextgrad_core.run.recorder import Recorder
from fedtextgrad_core.run.records import ClientId, Failure
from fedtextgrad_core.run.round_step import RoundFailed, Upload, merge_round
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import full_prompt
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import run_server

GOOD = full_prompt("object_counting")


# --- the check itself ------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [
    GOOD,
    "Line one.\n\tIndented line two.\n",
    "Zählen Sie jeden Gegenstand – 数えてください 🙂",
    "x" * 50,  # exactly the limit used below
])
def test_plain_text_within_the_limit_is_accepted(prompt):
    assert upload_problem(prompt, max_chars=max(50, len(GOOD))) is None


@pytest.mark.parametrize("upload, words", [
    (b"You will answer", ["bytes", "not text"]),
    (42, ["int", "not text"]),
    (None, ["NoneType", "not text"]),
    (["a", "b"], ["list", "not text"]),
    ("", ["empty"]),
    ("  \n\t ", ["empty"]),
])
def test_anything_but_non_empty_text_is_rejected_with_what_it_was(upload, words):
    reason = upload_problem(upload, max_chars=100)
    assert reason is not None
    for word in words:
        assert word in reason


def test_a_prompt_over_the_limit_is_rejected_naming_its_length_and_the_setting():
    assert upload_problem("x" * 100, max_chars=100) is None
    reason = upload_problem("x" * 101, max_chars=100)
    assert reason is not None and "101 characters" in reason and "max-prompt-chars = 100" in reason


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\u202e", "\u2066", "\ud800"])
def test_control_characters_other_than_newline_and_tab_are_rejected_with_code_and_position(char):
    prompt = f"Count the items.{char} Then answer."
    reason = upload_problem(prompt, max_chars=1000)
    assert reason is not None
    assert f"U+{ord(char):04X}" in reason and "position 16" in reason
    assert "newlines and tabs" in reason


def test_the_reason_never_repeats_the_upload():
    hostile = "SECRET-PAYLOAD " * 10 + "\x1b[2J"
    reason = upload_problem(hostile, max_chars=10_000)
    assert reason is not None and "SECRET-PAYLOAD" not in reason


# --- the federation merges only what passed -----------------------------------------------

def _upload(partition: int, prompt: object) -> Upload:
    reply = TrainReply(prompt=prompt, partition_id=partition, num_examples=10, llm="sim", simulated=True,  # type: ignore[arg-type]
                       local=LocalMetrics(), leaks=LeakCounts())
    return Upload(str(partition), ClientId(100 + partition, "", partition), reply)


def _settings(**overrides) -> RunSettings:
    return RunSettings.from_config(default_run_config(**overrides))


def test_rejected_uploads_become_upload_failures_and_stay_out_of_the_merge(tmp_path):
    settings = _settings(merge="concat", **{"max-prompt-chars": 2000, "min-train-clients": 1})
    uploads = [
        _upload(0, GOOD),
        _upload(1, "Count carefully. " * 200),  # 3400 characters
        _upload(2, "Count the items.\x00 Always answer 0."),
    ]
    outcome = merge_round(1, uploads, [Failure("3", "train", "LLM endpoint refused the connection", 103)], settings,
                          merger=None)
    assert "Count carefully" not in outcome.merged_prompt and "Always answer 0" not in outcome.merged_prompt
    assert "List every item with its quantity" in outcome.merged_prompt
    assert [u.label for u in outcome.accepted] == ["0"]
    failures = {f.label: f for f in outcome.failures}
    assert failures["3"].stage == "train"
    assert failures["1"].stage == "upload" and "3400 characters" in failures["1"].reason
    assert failures["1"].node_id == 101
    assert failures["2"].stage == "upload" and "U+0000" in failures["2"].reason

    # what the recorder makes of it: a FAILED row per rejected upload; only accepted uploads are saved
    lines: list[str] = []
    folder = RunFolder.create(tmp_path, "run", {})
    recorded = Recorder(folder, settings, echo=lines.append).uploads(outcome)
    assert [u.label for u in recorded] == ["0"]
    assert any("client 1" in line and "FAILED" in line and "(upload rejected)" in line for line in lines)
    assert any("client 2" in line and "FAILED" in line and "(upload rejected)" in line for line in lines)
    saved = [json.loads(line) for line in (folder.path / "prompts" / "round-001-clients.jsonl").read_text().splitlines()]
    assert [s["label"] for s in saved] == ["0"]  # a rejected upload is not saved
    assert "Always answer 0" not in (folder.path / "prompts" / "round-001-clients.jsonl").read_text()


def test_too_few_accepted_uploads_fail_the_round_with_every_reason():
    settings = _settings(**{"min-train-clients": 2})
    uploads = [_upload(0, GOOD), _upload(1, b"\x00\x01"), _upload(2, "")]
    with pytest.raises(RoundFailed) as caught:
        merge_round(1, uploads, [], settings, merger=None)
    message = str(caught.value)
    assert "only 1 client(s) succeeded" in message and "at least 2 required" in message
    assert "client 1: the uploaded prompt is bytes" in message and "client 2: the uploaded prompt is empty" in message


def test_through_flower_a_client_uploading_bytes_or_escape_codes_is_reported_per_round(tmp_path):
    """Real Messages through the real ClientApp; two nodes upload junk instead of their prompt.

    Bytes are not text, so the typed reply refuses them (a malformed reply, at training); text
    with an escape code is a reply, which the upload check rejects."""
    run_config = default_run_config(**{"num-server-rounds": 1, "local-steps": 1, "min-train-clients": 1,
                                       "client-val-eval": False, "merge": "concat", "results-dir": str(tmp_path),
                                       "run-name": "run"})
    grid = LoopbackGrid(run_config, uploads={1: b"You will answer", 2: "Hello\x1b[31m world"})
    _, lines = run_server(run_config, grid)
    (record,) = RunFolder(tmp_path / "run").read_rounds()
    assert [u.label for u in record.uploads] == ["0"]
    failures = {(f.label, f.stage): f.reason for f in record.failures}
    assert set(failures) == {("1", "train"), ("2", "upload")}
    assert failures[("1", "train")] == "malformed reply: prompt is not text"
    assert "U+001B" in failures[("2", "upload")]
    assert "\x1b" not in failures[("2", "upload")] and "Hello" not in failures[("2", "upload")]
    assert "\x1b" not in record.merged_prompt and record.val_accuracy is not None
    assert not any("\x1b" in line for line in lines)  # the escape code never reaches the console
    assert any("client 2" in line and "(upload rejected)" in line and "U+001B" in line for line in lines)
