"""Experiment tracking (run/tracking.py) against the real MLflow package and real local stores.

A tiny real federation (simulated LLM, in-process Flower loopback) is run once; its run
folder's records are then fed to trackers writing a folder store and a SQLite store, and
everything is read back with ``MlflowClient``: params, per-round metric histories,
tags, artifacts, status, nesting. A tracker pointed at a store it cannot use must say so
once, quickly, and never raise; ``tracker = none`` must never import MLflow.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.records import RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.run.tracking import (
    MAX_PARAM_CHARS,
    MlflowTracker,
    NoTracker,
    finish_parent,
    make_tracker,
    start_parent,
)
from tests import ROOT

needs_mlflow = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                    "sys.exit(importlib.util.find_spec('mlflow') is None)"]).returncode != 0,
    reason="mlflow (an optional dependency) is not installed")

# MLflow's dependencies (SQLAlchemy, typer) warn about their own internals
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class Federation:
    """A finished run: what the recorder holds when it calls a tracker."""

    run_config: dict[str, object]
    settings: RunSettings
    folder: Path
    rounds: list[RoundRecord]
    summary: RunSummary


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    """Two rounds of three simulated clients, through the real ServerApp and ClientApp."""
    from flwr.app import Context, RecordDict

    from server_app.server_app import main
    from tests.support.flower_loopback import LoopbackGrid, default_run_config

    results = tmp_path_factory.mktemp("results")
    config = default_run_config(**{"results-dir": str(results), "run-name": "tracked", "num-server-rounds": 2,
                                   "local-steps": 1, "batch-size": 2, "synthetic-size": 40})
    main(LoopbackGrid(config, num_nodes=3),
         Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    folder = RunFolder(results / "tracked")
    rounds, summary = folder.read_rounds(), folder.read_summary()
    assert [r.round for r in rounds] == [1, 2] and summary.finished
    return Federation(config, RunSettings.from_config(config), folder.path, rounds, summary)


def track(tracker: MlflowTracker, run: Federation, run_config: dict[str, object] | None = None,
          error: str = "") -> None:
    """Drive a tracker as the recorder does: start, the initial evaluation, each round, the end."""
    tracker.start(run.settings, run_config or run.run_config, run.folder)
    tracker.log_initial(run.summary.initial_val_accuracy)
    for record in run.rounds:
        tracker.log_round(record)
    if error:
        tracker.fail(error, run.folder)
    else:
        tracker.finish(run.summary, run.folder)


def reader(uri: str, monkeypatch: pytest.MonkeyPatch):
    """A client of our own to read a store back (set up after the tracker ran, so the tracker's
    own opt-in to MLflow's folder store is what the tracker's calls relied on)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(tracking_uri=uri)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {Path(info.path).name for info in client.list_artifacts(run_id, path)}


def artifact_text(client, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text(encoding="utf-8")


def round_tokens(record: RoundRecord) -> int:
    """Tokens of one round, added up here independently of the tracker."""
    total = sum(u.reply.local.prompt_tokens + u.reply.local.completion_tokens for u in record.uploads)
    usages = [u.reply.val_usage for u in record.uploads] + [e.reply.usage for e in record.evaluations]
    usages.append(record.server_llm)
    return total + sum(u.prompt_tokens + u.completion_tokens for u in usages if u is not None)


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


# --- the default: nothing, and no MLflow ---------------------------------------------------------------


def test_no_tracker_never_imports_mlflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from fedtextgrad_core.run.tracking import NoTracker, make_tracker
        tracker = make_tracker("none", "{tmp_path}", "x", "", print)
        assert isinstance(tracker, NoTracker)
        tracker.start(None, {{"seed": 0}}, Path("{tmp_path}"))
        tracker.log_initial(0.5)
        tracker.log_round(None)
        tracker.finish(None, Path("{tmp_path}"))
        tracker.fail("boom", Path("{tmp_path}"))
        assert "mlflow" not in sys.modules, "tracker = none imported mlflow"
        make_tracker("mlflow", "{tmp_path}", "x", "", print)  # MLflow is imported at start, not before
        assert "mlflow" not in sys.modules, "building an MLflow tracker imported mlflow"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not list(tmp_path.iterdir()), "NoTracker wrote something"


def test_make_tracker_kinds():
    assert isinstance(make_tracker(""), NoTracker)
    assert isinstance(make_tracker("None"), NoTracker)
    assert isinstance(make_tracker("mlflow", "somewhere"), MlflowTracker)
    with pytest.raises(ConfigError, match=r"'tracker' = 'wandb'.*none or mlflow"):
        make_tracker("wandb")


def test_mlflow_missing_is_said_once(tmp_path):
    """``tracker = mlflow`` without the package installed: one line, and the run goes on."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.modules["mlflow"] = None  # as if it were not installed
        from fedtextgrad_core.run.settings import defaults
        from fedtextgrad_core.run.tracking import make_tracker
        lines = []
        tracker = make_tracker("mlflow", "{tmp_path}/store", "x", "", lines.append)
        tracker.start(defaults(), {{"seed": 0}}, Path("{tmp_path}"))
        tracker.log_initial(0.5)
        tracker.fail("boom", Path("{tmp_path}"))
        print(repr(lines))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = eval(done.stdout.strip())
    assert len(lines) == 1, lines
    assert "not installed" in lines[0] and "the run goes on without tracking" in lines[0]


# --- a folder store --------------------------------------------------------------------------------------


@needs_mlflow
@pytest.mark.slow
def test_folder_store_holds_the_whole_run(federation, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = tmp_path / "mlruns"
    lines: list[str] = []
    tracker = MlflowTracker(str(store), "fedtextgrad-test", echo=lines.append)
    long_value = "x" * (MAX_PARAM_CHARS + 500)
    config = {**federation.run_config, "a-long-setting": long_value}
    track(tracker, federation, config)
    assert len(lines) == 1 and lines[0].startswith(f"tracking: MLflow run {tracker.run_id}"), lines
    assert not tracker.active and not tracker.disabled

    client = reader(store.as_uri(), monkeypatch)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == federation.folder.name
    assert client.get_experiment(run.info.experiment_id).name == "fedtextgrad-test"

    # params: every key of the run config, as text; a long one cut, saying so
    params = run.data.params
    assert set(params) == set(config)
    assert params["num-server-rounds"] == "2" and params["keep-rule"] == "reference" and params["merge"] == "summarize-uid"
    assert len(params["a-long-setting"]) == MAX_PARAM_CHARS
    assert params["a-long-setting"].endswith(f"[cut: {len(long_value)} characters in all]")

    tags = run.data.tags
    settings = federation.settings
    assert tags["task"] == "object_counting" and tags["partitioning"] == "homogeneous"
    assert tags["merge"] == "summarize-uid"
    assert tags["client_llm"] == settings.forward.describe()
    assert tags["simulated"] == "true"
    assert tags["results_folder"] == str(federation.folder)
    assert "mlflow.parentRunId" not in tags

    # per-round metrics, step = round; the start prompt at step 0
    rounds = federation.rounds
    accuracy = history(client, tracker.run_id, "val_accuracy")
    assert accuracy == pytest.approx({0: federation.summary.initial_val_accuracy,
                                      **{r.round: r.val_accuracy for r in rounds}})
    assert history(client, tracker.run_id, "best_val_accuracy")[1] == pytest.approx(rounds[0].best_val_accuracy)
    tokens = history(client, tracker.run_id, "tokens")
    assert tokens == {r.round: round_tokens(r) for r in rounds}
    assert all(tokens.values()) and sum(tokens.values()) <= federation.summary.cost["total"]["tokens"]
    assert history(client, tracker.run_id, "rewrites_accepted") == {
        r.round: sum(u.reply.local.steps_accepted for u in r.uploads) for r in rounds}
    assert history(client, tracker.run_id, "steps") == {r.round: 3 for r in rounds}  # 3 clients, 1 step each
    assert history(client, tracker.run_id, "clients") == {1: 3, 2: 3}
    assert history(client, tracker.run_id, "failures") == {1: 0, 2: 0}
    assert history(client, tracker.run_id, "merged_prompt_chars") == {r.round: len(r.merged_prompt) for r in rounds}
    assert set(history(client, tracker.run_id, "llm_calls")) == {1, 2}

    # the end: summary numbers
    metrics = run.data.metrics
    summary = federation.summary
    assert metrics["test_accuracy"] == pytest.approx(summary.test_accuracy)
    assert metrics["best_val_accuracy"] == pytest.approx(summary.best_val_accuracy)
    assert metrics["best_round"] == summary.best_round
    assert metrics["cost_total_tokens"] == summary.cost["total"]["tokens"]
    assert metrics["cost_total_llm_calls"] == summary.cost["total"]["llm_calls"]
    # uncertainty beside each accuracy, and the paired comparisons with their verdicts as tags
    best_test = summary.test_intervals["best"]
    assert (metrics["test_accuracy_low"], metrics["test_accuracy_high"]) == pytest.approx((best_test.low, best_test.high))
    assert metrics["test_accuracy_low"] <= metrics["test_accuracy"] <= metrics["test_accuracy_high"]
    assert history(client, tracker.run_id, "val_accuracy_low") == pytest.approx(
        {r.round: r.val_interval.low for r in rounds if r.val_interval is not None})
    assert summary.comparisons, "the run compares its best and last prompts with the start prompt"
    for label, comparison in summary.comparisons.items():
        name = "_".join(label.split())
        assert metrics[f"{name}_p_value"] == pytest.approx(comparison.p_value)
        assert run.data.tags[name] == comparison.verdict

    # artifacts: the run folder, the merged prompt of each round, the best prompt
    assert {"config.json", "rounds.jsonl", "summary.json", "prompts", "accuracy.png"} <= artifacts(client, tracker.run_id)
    prompts = artifacts(client, tracker.run_id, "prompts")
    assert {"round-001-merged.txt", "round-002-merged.txt", "best.txt", "round-000-initial.txt"} <= prompts
    assert artifact_text(client, tracker.run_id, "prompts/best.txt", tmp_path).strip() == summary.best_prompt.strip()
    merged = artifact_text(client, tracker.run_id, "prompts/round-002-merged.txt", tmp_path / "r2")
    assert merged.strip() == rounds[1].merged_prompt.strip()


@needs_mlflow
@pytest.mark.slow
def test_a_failure_midway_is_said_once_and_tracking_stops(federation, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "store").as_uri()  # the file:// form
    lines: list[str] = []
    unknown_parent = "0123456789abcdef0123456789abcdef"
    tracker = MlflowTracker(uri, "fedtextgrad-test", unknown_parent, echo=lines.append)
    tracker.start(federation.settings, federation.run_config, federation.folder)
    assert tracker.active
    assert f"tracking: parent run {unknown_parent} is not in {uri}; this run is tracked on its own" in lines

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracker.store.client, "log_text", broken)
    for record in federation.rounds:
        tracker.log_round(record)  # the first one fails; the second does nothing
    tracker.finish(federation.summary, federation.folder)
    tracker.fail("never mind", federation.folder)
    failures = [line for line in lines if "failed" in line]
    assert failures == [f"tracking: MLflow at {uri} failed (OSError: No space left on device); "
                        f"the run goes on without tracking"]
    assert tracker.disabled and not tracker.active

    client = reader(uri, monkeypatch)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"  # not left RUNNING forever
    assert "No space left" in run.data.tags["tracking_error"]
    assert "mlflow.parentRunId" not in run.data.tags
    assert history(client, tracker.run_id, "val_accuracy") == pytest.approx({1: federation.rounds[0].val_accuracy})


@needs_mlflow
def test_a_failure_logging_the_start_params_leaves_the_new_run_failed_not_running(federation, tmp_path, monkeypatch):
    """The run exists once MLflow has created it: a failure logging its params right after must
    still end it FAILED, not leave an empty run RUNNING forever."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "store").as_uri()
    lines: list[str] = []
    tracker = MlflowTracker(uri, "fedtextgrad-test", echo=lines.append)

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracker.store, "log", broken)
    tracker.start(federation.settings, federation.run_config, federation.folder)
    assert tracker.disabled and not tracker.active
    assert lines == [f"tracking: MLflow at {uri} failed (OSError: No space left on device); "
                     f"the run goes on without tracking"]
    assert tracker.run_id is not None
    assert reader(uri, monkeypatch).get_run(tracker.run_id).info.status == "FAILED"


# --- a SQLite store, a failed run, a grid's parent and its children ---------------------------------


@needs_mlflow
@pytest.mark.slow
def test_sqlite_store_with_a_parent_a_failed_and_a_finished_child(federation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path}/tracking.db"
    lines: list[str] = []
    parent = start_parent(uri, "grid", "grid-a", {"grid": "a.toml", "axis.merge": "concat,summarize"}, lines.append)
    assert parent, lines

    failed = MlflowTracker(uri, "grid", parent, echo=lines.append)
    track(failed, federation, error="RuntimeError: all clients failed in round 2")
    finished = MlflowTracker(uri, "grid", parent, echo=lines.append)
    track(finished, federation)
    grid_results = tmp_path / "grid-out"
    grid_results.mkdir()
    (grid_results / "results.csv").write_text("cell,test_accuracy\n1,0.5\n", encoding="utf-8")
    finish_parent(uri, parent, "FAILED", grid_results, lines.append)
    assert [line for line in lines if "failed" in line] == []

    client = reader(uri, monkeypatch)
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: all clients failed in round 2"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert {"rounds.jsonl", "summary.json", "prompts"} <= artifacts(client, failed.run_id)
    assert history(client, failed.run_id, "val_accuracy").keys() == {0, 1, 2}

    run = client.get_run(finished.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["num-server-rounds"] == "2"
    assert history(client, finished.run_id, "tokens") == {r.round: round_tokens(r) for r in federation.rounds}
    assert {"round-001-merged.txt", "best.txt"} <= artifacts(client, finished.run_id, "prompts")

    grid = client.get_run(parent)
    assert grid.info.status == "FAILED" and grid.info.run_name == "grid-a"
    assert grid.data.params == {"grid": "a.toml", "axis.merge": "concat,summarize"}
    assert artifacts(client, parent) == {"results.csv"}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {failed.run_id, finished.run_id}


@needs_mlflow
@pytest.mark.slow
def test_a_resumed_federation_and_grid_continue_their_own_mlflow_runs(federation, tmp_path, monkeypatch):
    """Killed after round 1 (its run left RUNNING), then resumed: one MLflow run holds every
    round and ends FINISHED. The grid's parent is continued the same way; another experiment
    or store gets a run of its own."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/tracking.db"
    folder = tmp_path / "run"
    shutil.copytree(federation.folder, folder)
    grid_out = tmp_path / "grid-out"
    grid_out.mkdir()
    lines: list[str] = []

    parent = start_parent(uri, "grid", "cpu", {"grid": "cpu.toml"}, lines.append, folder=grid_out)
    first = MlflowTracker(uri, "grid", parent or "", echo=lines.append)
    first.start(federation.settings, federation.run_config, folder)
    first.log_initial(federation.summary.initial_val_accuracy)
    first.log_round(federation.rounds[0])  # ... and the process is killed here
    finish_parent(uri, parent, "KILLED", None, lines.append)

    again = start_parent(uri, "grid", "cpu", {"grid": "cpu.toml"}, lines.append, folder=grid_out)
    assert again == parent
    resumed_settings = dataclasses.replace(federation.settings, resume_from=str(folder))
    second = MlflowTracker(uri, "grid", again or "", echo=lines.append)
    second.start(resumed_settings, {**federation.run_config, "resume-from": str(folder)}, folder)
    assert second.run_id == first.run_id
    assert lines[-1] == f"tracking: MLflow run {first.run_id} (resumed) in experiment 'grid' at {uri}", lines
    second.log_round(federation.rounds[1])
    second.finish(federation.summary, folder)
    finish_parent(uri, again, "FINISHED", None, lines.append)

    client = reader(uri, monkeypatch)
    experiment = client.get_experiment_by_name("grid").experiment_id
    runs = client.search_runs([experiment])
    assert {r.info.run_id for r in runs} == {parent, first.run_id}
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert history(client, first.run_id, "val_accuracy").keys() == {0, 1, 2}
    assert run.data.params["resume-from"] == ""  # the params stay those the run started with
    assert client.get_run(parent).info.status == "FINISHED"

    # a resume into another experiment (or store) cannot continue that run: it starts its own
    elsewhere = MlflowTracker(uri, "other", echo=lines.append)
    elsewhere.start(resumed_settings, federation.run_config, folder)
    assert elsewhere.run_id not in (None, first.run_id)
    # and a run that is not a resume never continues one, even in the same folder
    fresh = MlflowTracker(uri, "other", echo=lines.append)
    fresh.start(federation.settings, federation.run_config, folder)
    assert fresh.run_id not in (None, elsewhere.run_id)
    assert not [line for line in lines if "failed" in line], lines


# --- stores that cannot be used -----------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that takes connections and never answers: a tracking server that hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_mlflow
@pytest.mark.slow
def test_unusable_stores_are_said_once_quickly_and_never_raise(federation, tmp_path, silent_server):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")
    cases = [
        (MlflowTracker(str(a_file / "mlruns"), "x"), "a folder under a file"),
        (MlflowTracker(f"http://127.0.0.1:{closed_port()}", "x"), "nothing listening"),
        (MlflowTracker(silent_server, "x", http_timeout=1, http_retries=0), "a server that never answers"),
        (MlflowTracker("ftp://example.invalid/store", "x"), "a scheme MLflow has no store for"),
    ]
    began = time.monotonic()
    for tracker, what in cases:
        lines: list[str] = []
        tracker.echo = lines.append
        track(tracker, federation)
        tracker.fail("and again", federation.folder)
        assert len(lines) == 1, (what, lines)
        assert lines[0].startswith("tracking: MLflow at ") and lines[0].endswith(
            "the run goes on without tracking"), (what, lines)
        assert "\n" not in lines[0], what
        assert tracker.disabled and tracker.run_id is None, what
    assert time.monotonic() - began < 15


@needs_mlflow
@pytest.mark.slow
def test_parent_helpers_on_an_unusable_store(tmp_path):
    lines: list[str] = []
    uri = f"http://user:s3cret@127.0.0.1:{closed_port()}"
    assert start_parent(uri, "grid", "g", {"a": 1}, lines.append) is None
    finish_parent(uri, None, "FINISHED", tmp_path, lines.append)  # no parent: nothing to do
    finish_parent(uri, "0123abcd", "FINISHED", tmp_path, lines.append)
    assert len(lines) == 2 and all(line.startswith("tracking: MLflow at http://***@127.0.0.1:") for line in lines)
    assert not any("s3cret" in line for line in lines)
    with pytest.raises(ValueError, match="not one of FINISHED, FAILED, KILLED"):
        finish_parent(uri, "0123abcd", "DONE")
