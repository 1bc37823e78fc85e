"""Checkpoint and resume, in process: a server that dies mid-run continues where it stopped.

The "crash" here is an exception that is not an ``Exception`` (as a SIGKILL, it skips the
server's own error handling, so nothing is written at the moment of death). The resumed
run must end with exactly the prompts, scores and sampled clients of an uninterrupted run
of the same seed. The same is shown with real processes killed by PID in
test_resume_processes.py.
"""

from __future__ import annotations

import json
import random

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_same_run,
    checkpoint_to_resume,
    rng_state,
)
from fedtextgrad_core.run.messages import REQUEST_RECORD, RoundRequest
from fedtextgrad_core.run.run_folder import RunFolder
from tests.support.flower_loopback import LoopbackGrid, default_run_config
from tests.support.resume_helpers import outcome, run_server

# two of three clients per round: the sampling generator matters for the comparison
SHORT = {"num-server-rounds": 3, "fraction-train": 0.67, "local-steps": 1, "batch-size": 2,
         "synthetic-size": 60, "run-name": "run"}


class ServerKilled(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the server runs."""


class DyingGrid(LoopbackGrid):
    """Delivers messages until the ``die_at``-th send, then the 'server process' dies."""

    def __init__(self, run_config, die_at: int, **kwargs):
        super().__init__(run_config, **kwargs)
        self.sends, self.die_at = 0, die_at

    def send_and_receive(self, messages, timeout=None):
        self.sends += 1
        if self.sends == self.die_at:
            raise ServerKilled()
        return super().send_and_receive(messages, timeout)


def asks_for_a_test(message) -> bool:
    """Whether a message asks for a final test (alone, or with other requests)."""
    return any(RoundRequest.decode(message.content[key]).phase == "test"
               for key in message.content if key.startswith(REQUEST_RECORD))


def final_test_clients(grid: LoopbackGrid) -> list[int]:
    """The nodes the grid was sent final tests for."""
    return sorted({message.metadata.dst_node_id for message in grid.sent if asks_for_a_test(message)})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's folder, and the clients that took its final tests."""
    results = tmp_path_factory.mktemp("reference")
    config = default_run_config(**SHORT, **{"results-dir": str(results)})
    grid = LoopbackGrid(config)
    run_server(config, grid)
    return results / "run", final_test_clients(grid)


@pytest.fixture(scope="module")
def uninterrupted(reference):
    return reference[0]


@pytest.mark.parametrize("die_at", [2, 3, 6, 8],
                         ids=["round-1-training", "round-1-evaluation", "round-3-training", "final-tests"])
def test_a_killed_server_resumes_and_ends_exactly_like_an_uninterrupted_run(tmp_path, reference, die_at):
    uninterrupted, test_clients = reference
    config = default_run_config(**SHORT, **{"results-dir": str(tmp_path)})
    # sends: 1 = initial evaluation, then (train, evaluate) per round, then test
    with pytest.raises(ServerKilled):
        run_server(config, DyingGrid(config, die_at=die_at))
    run_dir = tmp_path / "run"
    finished_before = (die_at - 2) // 2
    kept = (run_dir / "rounds.jsonl").read_text()
    assert kept.count("\n") == finished_before
    assert json.loads((run_dir / CHECKPOINT_FILE).read_text())["round"] == finished_before

    grid = LoopbackGrid(config)
    run, lines = run_server({**config, "resume-from": str(run_dir)}, grid)
    assert run.recorder.path == run_dir  # continued in the same folder
    assert [line for line in lines if line.startswith("resuming")] == [lines[2]]  # after the header and folder
    assert lines[2].startswith(f"resuming {run_dir} after round {finished_before}")
    # no finished round was redone (nor the start prompt's evaluation): the resumed server sent only
    # the rounds after it, then the test of the best prompt, which carries the last round
    sent = [RoundRequest.decode(m.content[REQUEST_RECORD]) for m in grid.sent]
    phases = list(dict.fromkeys((request.phase, request.server_round) for request in sent))  # in order, once
    assert phases == [*[(phase, n) for n in range(finished_before + 1, 4) for phase in ("train", "evaluate")],
                      ("test", 3)]
    assert (run_dir / "rounds.jsonl").read_text().startswith(kept)  # nor lost
    assert outcome(run_dir) == outcome(uninterrupted)
    # the final tests went to the clients the uninterrupted run drew for them (2 of 3)
    assert len(test_clients) == 2 and final_test_clients(grid) == test_clients
    summary = RunFolder(run_dir).read_summary()
    # what the run cost is counted once, as in the uninterrupted run: the start prompt's evaluation
    # (from the checkpoint), the finished rounds (from rounds.jsonl), the resumed rounds and the test
    assert summary.cost == RunFolder(uninterrupted).read_summary().cost
    assert summary.finished is True and summary.resumed_after_rounds == (finished_before,)


class DiesAtTheFinalTests(LoopbackGrid):
    """Delivers messages until it is asked to send a final test: the server dies after its last checkpoint."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(asks_for_a_test(message) for message in messages):
            raise ServerKilled()
        return super().send_and_receive(messages, timeout)


def test_a_server_killed_in_its_final_tests_resumes_them_on_the_clients_an_uninterrupted_run_drew(tmp_path):
    """The final tests are drawn before the last round's checkpoint (some go with the last evaluation),
    from a copy of the generator: a resumed run draws the same 4 of 8 clients (1 chance in 70 by luck)."""
    config = default_run_config(**{**SHORT, "num-server-rounds": 2, "fraction-train": 0.5, "min-train-clients": 2,
                                   "synthetic-size": 200, "results-dir": str(tmp_path)})
    reference = LoopbackGrid(config, num_nodes=8)
    run_server({**config, "run-name": "reference"}, reference)
    with pytest.raises(ServerKilled):
        run_server(config, DiesAtTheFinalTests(config, num_nodes=8))
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / CHECKPOINT_FILE).read_text())["round"] == 2
    resumed = LoopbackGrid(config, num_nodes=8)
    run_server({**config, "resume-from": str(run_dir)}, resumed)
    assert len(final_test_clients(reference)) == 4
    assert final_test_clients(resumed) == final_test_clients(reference)
    assert outcome(run_dir) == outcome(tmp_path / "reference")


def test_a_round_recorded_but_not_checkpointed_is_run_again_once(tmp_path, uninterrupted):
    """Death between writing round 2's record and its checkpoint, with a torn line after it:
    the record after the checkpoint and the torn line are dropped, round 2 is run again once."""
    config = default_run_config(**SHORT, **{"results-dir": str(tmp_path)})
    with pytest.raises(ServerKilled):
        run_server(config, DyingGrid(config, die_at=4))  # round 1 finished
    after_round_1 = (tmp_path / "run" / CHECKPOINT_FILE).read_text()
    with pytest.raises(ServerKilled):
        run_server({**config, "run-name": "late"}, DyingGrid(config, die_at=6))  # rounds 1 and 2 finished
    run_dir = tmp_path / "late"
    (run_dir / CHECKPOINT_FILE).write_text(after_round_1)
    with (run_dir / "rounds.jsonl").open("a") as handle:
        handle.write('{"round": 3, "half a line')
    run_server({**config, "run-name": "late", "resume-from": str(run_dir)}, LoopbackGrid(config))
    assert outcome(run_dir) == outcome(uninterrupted)


def test_the_sampling_generator_is_restored_exactly():
    generator = random.Random(7)
    generator.sample(range(100), 5)
    saved = Checkpoint(round=1, global_prompt="p", best_prompt="p", best_accuracy=0.5, best_round=1,
                       initial_accuracy=0.4, rng_state=json.loads(json.dumps(rng_state(generator))))
    assert saved.random().sample(range(100), 5) == generator.sample(range(100), 5)


def test_resume_from_refuses_what_is_not_an_unfinished_run(tmp_path, uninterrupted):
    with pytest.raises(ConfigError, match="is not a folder"):
        checkpoint_to_resume(str(tmp_path / "missing"), {})
    with pytest.raises(ConfigError, match="has none"):
        checkpoint_to_resume(str(tmp_path), {})
    (tmp_path / CHECKPOINT_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="is damaged"):
        checkpoint_to_resume(str(tmp_path), {})
    (tmp_path / "summary.json").write_text(json.dumps({"finished": True}))
    with pytest.raises(ConfigError, match="nothing to resume"):
        checkpoint_to_resume(str(tmp_path), {})


def test_resume_refuses_changed_settings_and_names_them(tmp_path):
    saved = default_run_config(**SHORT)
    check_same_run(saved, {**saved, "num-server-rounds": 5, "llm-base-url": "http://127.0.0.1:9/v1",
                           "resume-from": "x"}, tmp_path)  # allowed to change
    with pytest.raises(ConfigError) as caught:
        check_same_run(saved, {**saved, "merge": "concat", "seed": 3}, tmp_path)
    message = str(caught.value)
    assert "merge (saved 'summarize-uid', now 'concat')" in message and "seed (saved 0, now 3)" in message


def test_a_resumed_run_may_go_on_for_more_rounds(tmp_path):
    config = default_run_config(**{**SHORT, "num-server-rounds": 1}, **{"results-dir": str(tmp_path)})
    with pytest.raises(ServerKilled):
        run_server(config, DyingGrid(config, die_at=4))  # killed in round 1's evaluation
    run_server({**config, "num-server-rounds": 2, "resume-from": str(tmp_path / "run")}, LoopbackGrid(config))
    summary = RunFolder(tmp_path / "run").read_summary()
    assert summary.finished and summary.rounds == 2 and summary.rounds_planned == 2
    assert [r.round for r in RunFolder(tmp_path / "run").read_rounds()] == [1, 2]
