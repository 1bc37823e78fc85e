"""`fedtextgrad experiment`'s table from run folders: any keys as rows and columns, per-task cells of
heterogeneous runs, the axes pooled, the simulated LLM labelled.

The run folders are written here from the project's own records (summary.json, rounds.jsonl) with
chosen numbers, so every number in the table can be checked; the runner itself is tested with real
`flwr run` cells in tests/integration/test_experiment.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.run.messages import EvalReply
from fedtextgrad_core.run.records import ClientEvaluation, ClientId, MergeRecord, RoundRecord, RunSummary
from fedtextgrad_core.tools.experiment import collect, load_grid, write_results

TASKS = ("object_counting", "multistep_arithmetic_two")


def _grid(tmp_path: Path, table: str) -> Path:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(
        "[settings]\nheterogeneous-tasks = 'object_counting,multistep_arithmetic_two'\n"
        "[axes]\npartitioning = ['homogeneous', 'heterogeneous']\nmerge = ['concat', 'summarize-uid']\n"
        f"seed = [0, 1]\n[table]\n{table}")
    return grid_file


def _evaluations(correct: tuple[int, int], total: int = 10, llm: str = "sim (simulated LLM, in-process)"):
    return tuple(ClientEvaluation(str(p), ClientId(node_id=100 + p, partition_id=p),
                                  EvalReply(partition_id=p, llm=llm, simulated=llm.startswith("sim"),
                                            scores=Scores(correct=c, total=total, malformed=0, seconds=0.0),
                                            usage=Usage()))
                 for p, c in enumerate(correct))


def _run(runs: Path, name: str, *, best_round: int, rounds: list[tuple[int, int]], test: tuple[float, float, float],
         llm: str = "sim (simulated LLM, in-process)", partitioning: str = "heterogeneous") -> None:
    """A finished run folder: ``rounds`` the per-client validation (correct of 10) of each round's merged
    prompt, ``test`` the best, last and start prompts' pooled test accuracy."""
    folder = runs / name
    folder.mkdir(parents=True)
    records = [RoundRecord(round=i + 1, uploads=(), failures=(), merge=MergeRecord("concat"), merged_prompt="p",
                           merged_prompt_metrics=None, evaluations=_evaluations(correct, llm=llm),
                           val_accuracy=sum(correct) / 20, val_examples=20, best_val_accuracy=None,
                           best_round=best_round) for i, correct in enumerate(rounds)]
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    summary = RunSummary(finished=True, error="", rounds=len(rounds), rounds_planned=len(rounds),
                         task=TASKS if partitioning == "heterogeneous" else TASKS[:1], partitioning=partitioning,
                         merge="concat", initial_prompt="p", initial_val_accuracy=0.5, best_val_accuracy=0.6,
                         best_round=best_round, best_prompt="p", final_prompt="p", results_dir=str(folder),
                         test_accuracy=test[0], last_test_accuracy=test[1], initial_test_accuracy=test[2],
                         client_llms={"0": llm, "1": llm}, simulated=llm.startswith("sim"), seconds=60.0,
                         cost={"total": {"tokens": 2000}})
    (folder / "summary.json").write_text(json.dumps(summary.to_json()))


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "table.csv").open(encoding="utf-8")))


def test_heterogeneous_runs_fill_one_column_per_task_with_their_clients_own_numbers(tmp_path):
    grid = load_grid(_grid(tmp_path, "rows = ['partitioning', 'merge']\ncolumns = 'task'\n"))
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    # seed 0: best round 1 (object counting 7/10, multistep 2/10), last round 2 (9/10, 4/10)
    _run(runs, "partitioning-heterogeneous__merge-concat__seed-0", best_round=1, rounds=[(7, 2), (9, 4)],
         test=(0.9, 0.8, 0.1))
    # seed 1: best round 2 (5/10, 6/10)
    _run(runs, "partitioning-heterogeneous__merge-concat__seed-1", best_round=2, rounds=[(1, 1), (5, 6)],
         test=(0.9, 0.8, 0.1))
    # the start prompt stayed best: no record keeps its per-client scores
    _run(runs, "partitioning-heterogeneous__merge-summarize-uid__seed-0", best_round=0, rounds=[(3, 3)],
         test=(0.5, 0.3, 0.5))
    _run(runs, "partitioning-homogeneous__merge-concat__seed-0", best_round=1, rounds=[(4, 4)],
         test=(0.75, 0.5, 0.25), partitioning="homogeneous")
    write_results(grid, runs, out, echo=lambda _: None)
    rows = {(r["partitioning"], r["merge"], r["task"]): r for r in _rows(out)}
    assert set(rows) == {("homogeneous", "concat", "object_counting"),
                         ("heterogeneous", "concat", "object_counting"),
                         ("heterogeneous", "concat", "multistep_arithmetic_two"),
                         ("heterogeneous", "summarize-uid", "object_counting"),
                         ("heterogeneous", "summarize-uid", "multistep_arithmetic_two")}
    homogeneous = rows[("homogeneous", "concat", "object_counting")]
    assert homogeneous["split"] == "test" and homogeneous["test_best_mean"] == "0.7500"
    assert homogeneous["test_start_mean"] == "0.2500" and homogeneous["runs"] == "1"
    counting = rows[("heterogeneous", "concat", "object_counting")]
    assert counting["split"] == "validation" and counting["runs"] == "2"
    assert counting["val_best_mean"] == "0.6000" and counting["val_last_mean"] == "0.7000"  # (0.7 + 0.5) / 2; (0.9 + 0.5) / 2
    assert counting["test_best_mean"] == ""  # never the pooled test accuracy under a task's name
    arithmetic = rows[("heterogeneous", "concat", "multistep_arithmetic_two")]
    assert arithmetic["val_best_mean"] == "0.4000" and arithmetic["val_last_mean"] == "0.5000"
    assert rows[("heterogeneous", "summarize-uid", "object_counting")]["val_best_mean"] == ""
    table = (out / "table.md").read_text()
    assert "| partitioning / merge \\ task | object_counting | multistep_arithmetic_two |" in table
    assert "| homogeneous / concat | **75.0** (start 25.0; last 50.0; runs=1;" in table
    assert "| heterogeneous / concat | **60.0 ± 14.1** (validation; start -; last 70.0 ± 28.3; runs=2;" in table
    assert "Pooled in each cell: seed = 0, 1." in table and "Cells marked validation" in table
    assert "simulated LLM, a test double" in table
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_task_column_keeps_test_and_validation_apart_when_partitionings_share_it(tmp_path):
    grid = load_grid(_grid(tmp_path, "rows = 'merge'\ncolumns = 'task'\n"))
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    _run(runs, "partitioning-heterogeneous__merge-concat__seed-0", best_round=1, rounds=[(7, 2)], test=(0.9, 0.8, 0.1))
    _run(runs, "partitioning-homogeneous__merge-concat__seed-0", best_round=1, rounds=[(4, 4)],
         test=(0.75, 0.5, 0.25), partitioning="homogeneous")
    results = collect(grid, runs)
    cell = [(r.split, len(r.entries)) for r in results if r.column == ("object_counting",)]
    assert cell == [("test", 1), ("validation", 1)]  # one cell, two parts: never one mean of both
    write_results(grid, runs, out, echo=lambda _: None)
    assert "| concat | **75.0** (start 25.0; last 50.0; runs=1; 2.0k tokens; 1 min)<br>**70.0** (validation;" in (
        out / "table.md").read_text()
    assert "Pooled in each cell: partitioning = homogeneous, heterogeneous; seed = 0, 1." in (out / "table.md").read_text()


def test_model_rows_name_each_runs_llm_and_say_which_is_simulated(tmp_path):
    grid = load_grid(_grid(tmp_path, "rows = 'model'\ncolumns = ['partitioning', 'merge']\n"))
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    _run(runs, "partitioning-heterogeneous__merge-concat__seed-0", best_round=1, rounds=[(7, 2)], test=(0.9, 0.8, 0.1))
    _run(runs, "partitioning-heterogeneous__merge-concat__seed-1", best_round=1, rounds=[(7, 2)], test=(0.3, 0.2, 0.1),
         llm="qwen1.5b at http://127.0.0.1:8181/v1")
    write_results(grid, runs, out, echo=lambda _: None)
    with (out / "table.csv").open(encoding="utf-8") as handle:
        assert next(csv.reader(handle)).count("model") == 1
    rows = {r["model"]: r for r in _rows(out)}
    assert set(rows) == {"sim (simulated LLM, in-process)", "qwen1.5b at http://127.0.0.1:8181/v1"}
    assert rows["sim (simulated LLM, in-process)"]["simulated"] == "true"
    assert rows["qwen1.5b at http://127.0.0.1:8181/v1"]["simulated"] == "false"
    assert rows["qwen1.5b at http://127.0.0.1:8181/v1"]["test_best_mean"] == "0.3000"
    table = (out / "table.md").read_text()
    assert "| model \\ partitioning / merge | heterogeneous / concat |" in table
    assert "| sim (simulated LLM, in-process) | **90.0**" in table
    assert "| qwen1.5b at http://127.0.0.1:8181/v1 | **30.0**" in table


def _with_outcomes(runs: Path, name: str, right: int, of: int = 40) -> None:
    """Give a run folder's best prompt per-example test outcomes: the first ``right`` of ``of`` ids right."""
    from fedtextgrad_core.stats import wilson

    path = runs / name / "summary.json"
    summary = RunSummary.from_json(json.loads(path.read_text()))
    outcomes = {f"object_counting/test/{i}": i < right for i in range(of)}
    summary = summary.with_changes(test_accuracy=right / of, test_intervals={"best": wilson(right, of)},
                                   test_outcomes={"best": outcomes})
    path.write_text(json.dumps(summary.to_json()))


def test_cells_carry_the_interval_of_their_answers_and_pair_on_the_same_seeds_examples(tmp_path):
    """Scripted outcomes: summarize-uid gets 36 of the same 40 examples right where concat gets 12 (seed 0),
    a clear paired difference; on seed 1 both get 20, with no difference. The interval pools every answer."""
    grid = load_grid(_grid(tmp_path, "rows = 'merge'\ncolumns = 'partitioning'\n"))
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    for merge, seed, right in (("concat", 0, 12), ("summarize-uid", 0, 36), ("concat", 1, 20), ("summarize-uid", 1, 20)):
        name = f"partitioning-homogeneous__merge-{merge}__seed-{seed}"
        _run(runs, name, best_round=1, rounds=[(4, 4)], test=(0.5, 0.5, 0.25), partitioning="homogeneous")
        _with_outcomes(runs, name, right)
    write_results(grid, runs, out, echo=lambda _: None)
    table = (out / "table.md").read_text()
    assert "**40.0 ± 14.1** [30.0-51.0, 80 answers]" in table  # concat: 30% and 50%, 32 of 80 right
    assert "**70.0 ± 28.3** [59.2-78.9, 80 answers]" in table  # summarize-uid: 90% and 50%, 56 of 80
    pairs = [line for line in table.splitlines() if line.startswith("- summarize-uid / homogeneous against concat")]
    assert len(pairs) == 1 and pairs[0].endswith("McNemar p = 1.19e-07, n = 80)")  # 2 / 2**24: 24 pairs, one way
    assert "better (+30.0 points" in pairs[0]
    row = {r["merge"]: r for r in _rows(out)}["concat"]
    assert row["test_best_answers"] == "80" and row["test_best_low"] == "0.2996"


def test_two_cells_with_as_many_answers_right_but_different_ones_show_no_detectable_difference(tmp_path):
    grid = load_grid(_grid(tmp_path, "rows = 'merge'\ncolumns = 'partitioning'\n"))
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    for merge, right in (("concat", 20), ("summarize-uid", 23)):
        name = f"partitioning-homogeneous__merge-{merge}__seed-0"
        _run(runs, name, best_round=1, rounds=[(4, 4)], test=(0.5, 0.5, 0.25), partitioning="homogeneous")
        _with_outcomes(runs, name, right)
    write_results(grid, runs, out, echo=lambda _: None)
    table = (out / "table.md").read_text()
    assert "summarize-uid / homogeneous against concat / homogeneous: no detectable difference (+7.5 points" in table
