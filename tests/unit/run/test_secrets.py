"""API keys come only from environment variables and never leave the process that uses them.

A federation runs through the real ServerApp, PromptStrategy and ClientApp (Flower
Messages delivered in-process) against the sim served over real HTTP, with every
endpoint's key in an environment variable. The key must reach the LLM server as the
``Authorization: Bearer`` header, and appear nowhere else: not in a log line, not on
stdout/stderr, not in any file of the run folder (or TextGrad's log folder), not in
any Flower message sent or received (serialised as it would go over the wire).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.messages import REQUEST_RECORD, RoundRequest
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim.server import make_server
from fedtextgrad_core.tools.cli import main as cli_main
from server_app.server_app import main as server_main
from tests.support.faulty_llm_server import closed_port
from tests.support.flower_loopback import LoopbackGrid, default_run_config

KEY_ENV = "FEDTEXTGRAD_TEST_SECRET_KEY"
# where textgrad_import sends TextGrad's own log file
TEXTGRAD_LOGS = Path(os.environ.get("TEXTGRAD_LOG_DIR") or Path(tempfile.gettempdir()) / "textgrad-logs")


def new_key() -> str:
    return "sk-fedtextgrad-test-" + secrets.token_hex(24)


class RecordingGrid(LoopbackGrid):
    """The loopback grid that also keeps every reply, so replies can be scanned like sent messages."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout)
        self.replies.extend(replies)
        return replies


@pytest.fixture(scope="module")
def sim_with_auth_log() -> Iterator[tuple[str, list[str]]]:
    """The sim over real HTTP; also returns the Authorization header of every request it received."""
    server = make_server(host="127.0.0.1", port=0)
    seen: list[str] = []
    base = server.RequestHandlerClass

    class Recording(base):  # type: ignore[misc, valid-type]
        def parse_request(self) -> bool:
            parsed = super().parse_request()
            if parsed:
                seen.append(self.headers.get("Authorization", ""))
            return parsed

    server.RequestHandlerClass = Recording
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def find_secret(secret: str, *, texts: dict[str, str] = {}, folders: Iterable[Path] = (),  # noqa: B006
                messages: Iterable[Message] = (), newer_than: float = 0.0) -> list[str]:
    """Every place ``secret`` occurs: named texts, files (under folders, changed after
    ``newer_than``), and Flower messages in their wire form (protobuf) and as text."""
    needle = secret.encode("utf-8")
    found = [name for name, text in texts.items() if secret in text]
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and path.stat().st_mtime >= newer_than and needle in path.read_bytes():
                found.append(str(path))
    for index, message in enumerate(messages):
        if needle in message_to_proto(message).SerializeToString():
            found.append(f"message {index} (serialised)")
        if secret in f"{message.metadata} {message.content if message.has_content() else message.error}":
            found.append(f"message {index} (as text)")
    return found


def run_federation(tmp_path: Path, url: str, grid_options: dict | None = None, **overrides) -> tuple[RecordingGrid, Path]:
    """The real ServerApp main on a recording loopback grid; every endpoint uses KEY_ENV."""
    results = tmp_path / "results"
    run_config = default_run_config(**{
        # small but complete: local steps, merges, client and test evaluation all run
        "num-server-rounds": 2, "local-steps": 1, "synthetic-size": 60,
        "results-dir": str(results), "run-name": "secrets",
        "llm-backend": "openai", "llm-base-url": url, "llm-model": "sim", "llm-api-key-env": KEY_ENV,
        "server-backend": "openai", "server-base-url": url, "server-model": "sim", "server-api-key-env": KEY_ENV,
        "llm-cache-path": str(results / "replies.sqlite"), **overrides,
    })
    grid = RecordingGrid(run_config, **(grid_options or {}))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_main(grid, context)
    return grid, results / "secrets"


def test_the_key_reaches_the_llm_server_and_nothing_else(sim_with_auth_log, tmp_path, monkeypatch, caplog, capfd):
    url, seen = sim_with_auth_log
    key = new_key()
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)  # every logger, every level: stricter than any real run
    started = time.time() - 1
    seen.clear()

    grid, run_dir = run_federation(tmp_path, url)

    # the key was really used: every request to the LLM server carried it, as a bearer token
    assert seen and all(header == f"Bearer {key}" for header in seen), set(seen) - {f"Bearer {key}"}
    assert (run_dir / "summary.json").is_file() and '"finished": true' in (run_dir / "summary.json").read_text()
    assert (run_dir.parent / "replies.sqlite").is_file()  # the reply cache is scanned too
    assert grid.sent and len(grid.replies) == len(grid.sent)

    out, err = capfd.readouterr()
    log_lines = [f"{record.name}: {record.getMessage()}" for record in caplog.records]
    assert log_lines, "no log record was captured: the log scan would prove nothing"
    assert "results folder" in out
    leaks = find_secret(key, texts={"stdout": out, "stderr": err, "log lines": "\n".join(log_lines)},
                        folders=[tmp_path, TEXTGRAD_LOGS], messages=[*grid.sent, *grid.replies], newer_than=started)
    assert leaks == []


def test_the_scanner_finds_a_planted_key(tmp_path, capfd):
    """The control case: the same scan reports the key wherever it is put on purpose."""
    key = new_key()
    results = tmp_path / "results" / "run"
    (results / "prompts").mkdir(parents=True)
    (results / "prompts" / "best.txt").write_text(f"You answer questions. key={key}\n")
    (results / "clean.json").write_text("{}")
    logger = logging.getLogger("fedtextgrad_core.test_secrets")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("calling the endpoint with %s", key)
    finally:
        logger.removeHandler(handler)
    print(f"Authorization: Bearer {key}")
    sent = Message(content=RecordDict({REQUEST_RECORD: ConfigRecord(
        RoundRequest(phase="train", server_round=1, prompt=f"Think step by step. {key}").encode())}),
                   message_type=MessageType.TRAIN, dst_node_id=100)
    clean = Message(content=RecordDict({REQUEST_RECORD: ConfigRecord(
        RoundRequest(phase="train", server_round=1, prompt="Think step by step.").encode())}),
                    message_type=MessageType.TRAIN, dst_node_id=101)
    out, err = capfd.readouterr()

    leaks = find_secret(key, texts={"stdout": out, "stderr": err, "log lines": "\n".join(records)},
                        folders=[tmp_path], messages=[clean, sent])
    assert leaks == ["stdout", "log lines", str(results / "prompts" / "best.txt"),
                     "message 1 (serialised)", "message 1 (as text)"]
    assert find_secret(key, folders=[tmp_path], newer_than=time.time() + 60) == []  # older files are skipped


def test_a_key_pasted_into_the_setting_is_refused_without_being_shown(monkeypatch):
    key = new_key()
    for role in ("llm", "backward", "server"):
        with pytest.raises(ConfigError) as refused:
            RunSettings.from_config(default_run_config(**{f"{role}-api-key-env": key}))
        assert f"'{role}-api-key-env'" in str(refused.value) and key not in str(refused.value)
        assert key not in repr(refused.value.value)


def test_a_pasted_key_in_a_node_config_fails_that_client_without_leaking(sim_with_auth_log, tmp_path, monkeypatch,
                                                                          caplog, capfd):
    """A site pastes its key into its node config: that client fails, the run goes on, the key stays put."""
    url, _ = sim_with_auth_log
    key, pasted = new_key(), new_key()
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    started = time.time() - 1
    grid, run_dir = run_federation(tmp_path, url, {"node_overrides": {0: {"llm-api-key-env": pasted}}},
                                   **{"num-server-rounds": 1})
    (record,) = RunFolder(run_dir).read_rounds()
    # that client's failures are reported, naming the setting; the other two went on
    assert {(f.node_id, f.stage) for f in record.failures} == {(100, "train"), (100, "evaluate")}
    assert all("'llm-api-key-env'" in f.reason for f in record.failures), record.failures
    assert [u.label for u in record.uploads] == ["1", "2"]
    assert RunFolder(run_dir).read_summary().finished is True
    out, err = capfd.readouterr()
    log_lines = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (pasted, key):
        assert find_secret(secret, texts={"stdout": out, "stderr": err, "log lines": log_lines},
                           folders=[tmp_path, TEXTGRAD_LOGS], messages=[*grid.sent, *grid.replies],
                           newer_than=started) == []


@pytest.mark.parametrize("command", [
    ["eval", "--task", "object_counting", "--prompt-file", "{prompt}", "--backend", "openai"],
    ["analyze", "{prompt}"],
    ["bench", "endpoint", "--out", ""],
], ids=["eval", "analyze", "bench-endpoint"])
def test_cli_commands_refuse_a_pasted_key_without_showing_it(command, tmp_path, capfd):
    url = f"http://127.0.0.1:{closed_port()}/v1"  # refused before any request: nothing listens here
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Think step by step.\n")
    key = new_key()
    args = [part.replace("{prompt}", str(prompt)) for part in command]
    assert cli_main([*args, "--base-url", url, "--model", "sim", "--api-key-env", key]) == 2
    out, err = capfd.readouterr()
    assert "api-key-env" in err
    assert find_secret(key, texts={"stdout": out, "stderr": err}) == []
