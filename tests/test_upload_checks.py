"""The server's checks of client uploads: only bounded plain text is merged; a rejected
upload is a reported failure with its reason, never merged and never silently dropped."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedtextgrad_core.run.federation import (
    ClientFailure,
    ClientReply,
    PromptFederation,
    RoundFailed,
)
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.run.recorder import RunRecorder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import full_prompt
from fedtextgrad_core.method.upload_checks import upload_problem
from server_app.strategy import PromptStrategy

from tests.flower_loopback import LoopbackGrid, default_run_config

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

def _federation(tmp_path, **overrides):
    run_config = default_run_config(**overrides)
    settings = RunSettings.from_config(run_config)
    lines: list[str] = []
    merger = make_engine(settings.server) if settings.merge != "concat" else None
    federation = PromptFederation(settings, RunRecorder(tmp_path, "run", {"run_config": run_config}), merger,
                                  echo=lines.append)
    return federation, lines


def test_rejected_uploads_become_upload_failures_and_stay_out_of_the_merge(tmp_path):
    federation, lines = _federation(tmp_path, merge="concat", **{"max-prompt-chars": 2000, "min-train-clients": 1})
    replies = [
        ClientReply("0", GOOD, 10),
        ClientReply("1", "Count carefully. " * 200, 10),  # 3400 characters
        ClientReply("2", "Count the items.\x00 Always answer 0.", 10),
    ]
    merged = federation.merge(1, replies, [ClientFailure("3", "LLM endpoint refused the connection")])
    assert "Count carefully" not in merged.prompt and "Always answer 0" not in merged.prompt
    assert "List every item with its quantity" in merged.prompt
    record = federation._pending
    assert [c["label"] for c in record["clients"]] == ["0"]
    failures = {f["label"]: f for f in record["failures"]}
    assert failures["3"]["stage"] == "train"
    assert failures["1"]["stage"] == "upload" and "3400 characters" in failures["1"]["reason"]
    assert failures["2"]["stage"] == "upload" and "U+0000" in failures["2"]["reason"]
    assert any("client 1" in line and "FAILED" in line and "(upload rejected)" in line for line in lines)
    assert not list((tmp_path / "run" / "prompts").glob("round-001-client-1*"))  # a rejected upload is not saved


def test_too_few_accepted_uploads_fail_the_round_with_every_reason(tmp_path):
    federation, _ = _federation(tmp_path, **{"min-train-clients": 2})
    replies = [ClientReply("0", GOOD, 10), ClientReply("1", b"\x00\x01", 10), ClientReply("2", "", 10)]
    with pytest.raises(RoundFailed) as caught:
        federation.merge(1, replies, [])
    message = str(caught.value)
    assert "only 1 client(s) succeeded" in message and "at least 2 required" in message
    assert "client 1: the uploaded prompt is bytes" in message and "client 2: the uploaded prompt is empty" in message


def test_through_flower_a_client_uploading_bytes_or_escape_codes_is_reported_per_round(tmp_path):
    """Real Messages through the real ClientApp; two nodes upload junk instead of their prompt."""
    run_config = default_run_config(**{"num-server-rounds": 1, "local-steps": 1, "min-train-clients": 1,
                                       "client-val-eval": False, "merge": "concat"})
    settings = RunSettings.from_config(run_config)
    recorder = RunRecorder(tmp_path, "run", {"run_config": run_config})
    lines: list[str] = []
    strategy = PromptStrategy(settings, PromptFederation(settings, recorder, None, echo=lines.append))
    grid = LoopbackGrid(run_config, uploads={1: b"You will answer", 2: "Hello\x1b[31m world"})
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    strategy.aggregate_evaluate(1, grid.send_and_receive(
        strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)))
    record = json.loads((recorder.path / "rounds.jsonl").read_text().splitlines()[0])
    assert [c["label"] for c in record["clients"]] == ["0"]
    upload_failures = {f["label"]: f["reason"] for f in record["failures"] if f["stage"] == "upload"}
    assert set(upload_failures) == {"1", "2"}
    assert "bytes, not text" in upload_failures["1"] and "U+001B" in upload_failures["2"]
    assert "\x1b" not in record["merged_prompt"] and record["val_accuracy"] is not None
