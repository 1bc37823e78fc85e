"""`fedtextgrad experiment`: a grid of real `flwr run` simulations, interrupted and resumed, and its table.

The cells run on the simulated LLM, so the numbers only show that the machinery works; what is
checked is the runner: every cell is a run folder, a finished cell is skipped when the command
runs again, an interrupted cell continues from its checkpoint, and the table names the model. The grid's data-source (hub) is
replaced by the shared data folder on the command line, and tables take any keys as rows and columns
(a heterogeneous run's per-task cells checked against its rounds.jsonl).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedtextgrad_core.tools.experiment import GridError, config_toml, load_grid
from tests import SHARED_DATA
from tests.support.deployment_helpers import wait_until
from tests.support.simulation_helpers import ROOT

pytestmark = pytest.mark.slow

GRID = """
description = "two merges on the simulated LLM"
[settings]
task = "object_counting"
num-server-rounds = 4
local-steps = 1
batch-size = 2
synthetic-size = 40
[axes]
partitioning = ["homogeneous"]
merge = ["concat", "summarize-uid"]
[federation]
num-supernodes = 2
[table]
rows = "partitioning"
columns = "merge"
"""


def experiment(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.Popen([sys.executable, "-m", "fedtextgrad_core.tools.cli", "experiment", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def grid_processes(out: Path) -> list[int]:
    marker = f"FLWR_HOME={out / 'flwr-home'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_grid_runs_every_cell_resumes_after_an_interruption_and_writes_its_table(tmp_path, monkeypatch):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID)
    out = tmp_path / "out"
    tracking = ("--tracker", "mlflow", "--tracking-uri", str(tmp_path / "mlruns"))
    # first run: stopped (SIGTERM) once the second cell has finished its first round; its three more
    # rounds leave the stop seconds to arrive on a busy machine (with two rounds, one run finished first)
    first = experiment(str(grid_file), "--out", str(out), *tracking)
    second_cell = out / "runs" / "partitioning-homogeneous__merge-summarize-uid"
    try:
        assert wait_until(lambda: first.poll() is not None or ((second_cell / "rounds.jsonl").exists()
                          and (second_cell / "rounds.jsonl").read_text().count("\n") >= 1), 600, 0.2)
        assert first.poll() is None, first.communicate()[0][-3000:]
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
        # the runner stops its SuperLink and the cell's run on the way out
        assert wait_until(lambda: not grid_processes(out), 30), "the grid's SuperLink was left running"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for pid in grid_processes(out):  # nothing of a failed test may keep running
            os.kill(pid, signal.SIGKILL)
    assert "cell 1/2 (partitioning=homogeneous merge=concat): starting" in output
    assert "cell 1/2: finished" in output and "(simulated LLM)" in output
    assert "stopped; run the same command again" in output
    first_summary = json.loads((second_cell / "summary.json").read_text())
    assert first_summary["finished"] is False

    # second run: the finished cell is skipped, the interrupted one continues from its checkpoint
    again = experiment(str(grid_file), "--out", str(out), *tracking)
    output, _ = again.communicate(timeout=900)
    assert again.returncode == 0, output[-3000:]
    assert "cell 1/2 (partitioning=homogeneous merge=concat): already finished" in output
    assert "cell 2/2 (partitioning=homogeneous merge=summarize-uid): resuming" in output
    summary = json.loads((second_cell / "summary.json").read_text())
    assert summary["finished"] is True and summary["resumed_after_rounds"]
    assert not grid_processes(out)

    table = (out / "table.md").read_text()
    assert "| homogeneous |" in table and "concat" in table and "summarize-uid" in table
    assert "simulated LLM" in table
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {(r["partitioning"], r["merge"]) for r in rows} == {("homogeneous", "concat"),
                                                                ("homogeneous", "summarize-uid")}
    for row in rows:
        assert row["simulated"] == "true" and 0.0 <= float(row["test_best_mean"]) <= 1.0
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "partitioning-homogeneous__merge-concat.log", "partitioning-homogeneous__merge-summarize-uid.log"]

    # tracking: one MLflow run per federation, the interrupted one continued, under one parent for the grid
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("fedtextgrad").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "experiment-grid"]
    assert len(runs) == 3 and len(parents) == 1 and parents[0].info.status == "FINISHED", [r.info for r in runs]
    children = {r.info.run_name: r for r in runs if r not in parents}
    assert set(children) == {"partitioning-homogeneous__merge-concat", "partitioning-homogeneous__merge-summarize-uid"}
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    resumed = children["partitioning-homogeneous__merge-summarize-uid"].info.run_id
    assert {m.step for m in client.get_metric_history(resumed, "val_accuracy")} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("text, says", [
    ("[axes]\n", "[axes] is empty"),
    ("[axes]\nmerge = []\n", "non-empty list"),
    ("[axes]\nmerge = ['mean']\n", "setting 'merge' = 'mean' is not accepted"),
    ("[settings]\nrun-name = 'x'\n[axes]\nseed = [0]\n", "'run-name' is set by the experiment runner"),
    ("[axes]\nseed = [0]\n[federation]\nspeed = 1\n", "[federation] has unknown key(s) speed"),
    ("[axes]\nseed = [0]\n[tabel]\n", "unknown section(s) tabel"),
    ("[axes\n", "is not valid TOML"),
])
def test_a_bad_grid_file_is_refused_before_anything_runs(tmp_path, text, says):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(text)
    with pytest.raises(GridError) as info:
        load_grid(grid_file)
    assert says in str(info.value)
    done = subprocess.run([sys.executable, "-m", "fedtextgrad_core.tools.cli", "experiment", str(grid_file),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_grid_paths_and_values(tmp_path):
    grid_file = tmp_path / "sub" / "grid.toml"
    grid_file.parent.mkdir()
    grid_file.write_text("[settings]\ndata-source = '../data'\nllm-cache-path = '{out}/cache.sqlite'\n"
                         "[axes]\nseed = [0, 1]\n")
    grid = load_grid(grid_file)
    assert [c.name for c in grid.cells] == ["seed-0", "seed-1"]
    config = grid.run_config(grid.cells[1], tmp_path / "out" / "runs")
    assert config["data-source"] == str(tmp_path / "data")
    assert config["llm-cache-path"] == str(tmp_path / "out" / "cache.sqlite")
    assert config["seed"] == 1 and config["run-name"] == "seed-1"
    written = {"text": 'say "hi"\n', "flag": True, "share": 0.5, "seed": 1}
    assert tomllib.loads(config_toml(written)) == written  # what flwr run reads back is what was meant
    with pytest.raises(GridError, match="share = nan"):
        config_toml({"share": float("nan")})



BY_TASK = """
description = "per-task columns on the simulated LLM"
[settings]
data-source = "hub"
task = "object_counting"
heterogeneous-tasks = "object_counting,multistep_arithmetic_two"
num-server-rounds = 2
local-steps = 1
batch-size = 2
max-val-examples = 6
max-test-examples = 6
answer-parser = "last-number"
[axes]
partitioning = ["homogeneous", "heterogeneous"]
[federation]
num-supernodes = 2
[table]
rows = ["model", "partitioning"]
columns = "task"
"""


def test_a_grid_reads_the_hub_unless_told_a_folder_and_tables_each_task_and_model(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the offline copy this test names on the command line)")
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(BY_TASK)
    out = tmp_path / "out"
    # the grid says hub (no network here): the command line names this machine's copy of the data
    done = experiment(str(grid_file), "--out", str(out), "--data-source", str(SHARED_DATA))
    output, _ = done.communicate(timeout=900)
    assert done.returncode == 0, output[-3000:]
    assert not grid_processes(out)
    for config in (out / "configs").iterdir():
        assert tomllib.loads(config.read_text())["data-source"] == str(SHARED_DATA.resolve()), config.name

    # per-task cells of the heterogeneous run are its clients' own numbers: recomputed here from
    # rounds.jsonl (client i holds task i) and summary.json
    hetero = out / "runs" / "partitioning-heterogeneous"
    summary = json.loads((hetero / "summary.json").read_text())
    rounds = [json.loads(line) for line in (hetero / "rounds.jsonl").read_text().splitlines()]
    tasks = ["object_counting", "multistep_arithmetic_two"]

    def accuracy(record, task):
        scores = [e["reply"]["scores"] for e in record["evaluations"] if tasks[e["reply"]["partition_id"]] == task]
        return sum(s["correct"] for s in scores) / sum(s["total"] for s in scores)

    best = [r for r in rounds if r["round"] == summary["best_round"]]
    rows = {(r["partitioning"], r["task"]): r for r in csv.DictReader((out / "table.csv").open())}
    assert set(rows) == {("homogeneous", "object_counting"), ("heterogeneous", "object_counting"),
                         ("heterogeneous", "multistep_arithmetic_two")}
    for task in tasks:
        row = rows[("heterogeneous", task)]
        assert row["split"] == "validation" and row["test_best_mean"] == "" and row["simulated"] == "true"
        assert row["val_last_mean"] == f"{accuracy(rounds[-1], task):.4f}"
        assert row["val_best_mean"] == (f"{accuracy(best[0], task):.4f}" if best else "")
        assert "simulated LLM" in row["model"]
    homogeneous = json.loads((out / "runs" / "partitioning-homogeneous" / "summary.json").read_text())
    assert rows[("homogeneous", "object_counting")]["test_best_mean"] == f"{homogeneous['test_accuracy']:.4f}"
    table = (out / "table.md").read_text()
    assert "| model / partitioning \\ task | object_counting | multistep_arithmetic_two |" in table
    assert "| sim (simulated LLM, in-process) / heterogeneous | **" in table and "(validation;" in table
    assert "These numbers come from the simulated LLM" in table

    # the same runs, another layout: tasks as rows, partitionings as columns; nothing runs again
    grid_file.write_text(BY_TASK.replace('rows = ["model", "partitioning"]\ncolumns = "task"',
                                         'rows = "task"\ncolumns = "partitioning"'))
    again = experiment(str(grid_file), "--out", str(out), "--table-only")
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output[-3000:]
    table = (out / "table.md").read_text()
    assert "| task \\ partitioning | homogeneous | heterogeneous |" in table
    assert "| multistep_arithmetic_two | - | **" in table


@pytest.mark.parametrize("option, says", [
    ("/no/such/folder", "--data-source '/no/such/folder' does not exist here"),
    ("EMPTY", "no object_counting data in folder"),
])
def test_a_wrong_data_source_is_one_line_before_anything_runs(tmp_path, option, says):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(BY_TASK)
    (tmp_path / "empty").mkdir()
    option = str(tmp_path / "empty") if option == "EMPTY" else option
    done = subprocess.run([sys.executable, "-m", "fedtextgrad_core.tools.cli", "experiment", str(grid_file),
                           "--out", str(tmp_path / "out"), "--data-source", option],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
