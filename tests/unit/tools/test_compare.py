"""Comparing run folders: two real (sim) runs, plain summarisation vs the UID merge."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fedtextgrad_core.method.prompt_metrics import text_metrics
from fedtextgrad_core.run.figures import plot_prompt_dynamics
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.sim import instructions_in
from fedtextgrad_core.tools.compare import (
    LoadedRun,
    NotARunFolder,
    compare_runs,
    format_table,
    load_run,
    plot_comparison,
    simulated,
)
from tests.support.flower_loopback import LoopbackGrid, make_strategy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MERGES = ("summarize", "summarize-uid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished 2-round runs that differ only in the merge (one local step, so clients differ)."""
    base = tmp_path_factory.mktemp("runs")
    folders = {}
    for merge in MERGES:
        strategy, run_config, recorder, _ = make_strategy(
            base / merge, **{"merge": merge, "num-server-rounds": 2, "local-steps": 1})
        strategy.start(LoopbackGrid(run_config))
        folders[merge] = recorder.path
    return folders


def test_load_run_reads_summary_rounds_and_config(runs) -> None:
    run = load_run(runs["summarize"])
    assert isinstance(run, LoadedRun)
    assert run.name == "run" and run.path == str(runs["summarize"])
    assert run.summary == RunFolder(runs["summarize"]).read_summary()
    assert run.summary.finished is True and run.summary.merge == "summarize"
    assert [r.round for r in run.rounds] == [1, 2]
    assert run.rounds == RunFolder(runs["summarize"]).read_rounds()
    assert simulated(run) is True  # the summary says so


def test_a_folder_that_is_not_a_run_is_named_in_the_error(tmp_path) -> None:
    with pytest.raises(NotARunFolder, match=f"'{tmp_path / 'nowhere'}' is not a run folder: there is no such folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "prompts").mkdir()
    with pytest.raises(NotARunFolder, match=f"'{tmp_path / 'prompts'}' is not a run folder: it has no "
                                            "summary.json and no rounds.jsonl"):
        load_run(tmp_path / "prompts")


def test_a_cut_short_last_line_is_skipped_but_a_broken_line_is_an_error(runs, tmp_path) -> None:
    copy = shutil.copytree(runs["summarize"], tmp_path / "copy")
    rounds_file = copy / "rounds.jsonl"
    good = rounds_file.read_text()
    rounds_file.write_text(good + '{"round": 3, "val_acc')  # a write cut short by a crash
    assert [r.round for r in load_run(copy).rounds] == [1, 2]
    first, second = good.splitlines()
    rounds_file.write_text("\n".join([first, "not json", second]) + "\n")
    with pytest.raises(NotARunFolder, match=re.escape(f"'{copy}' is not a readable run folder: rounds.jsonl line 2")):
        load_run(copy)
    rounds_file.write_text(json.dumps({"version": 2, "round": 1}) + "\n" + good)  # JSON, but not a round record
    with pytest.raises(NotARunFolder, match=r"rounds\.jsonl\b.*missing uploads"):
        load_run(copy)


def test_compare_table_and_plot_of_two_runs(runs, tmp_path) -> None:
    rows = compare_runs([runs[m] for m in MERGES])
    assert [row["run"] for row in rows] == ["summarize/run", "summarize-uid/run"]  # same folder name: parent added
    for row, merge in zip(rows, MERGES):
        summary = RunFolder(runs[merge]).read_summary()
        assert row["merge"] == merge and row["task"] == "object_counting" and row["rounds"] == 2
        assert row["finished"] is True and row["simulated"] is True
        assert row["initial_val_accuracy"] == summary.initial_val_accuracy
        assert row["best_val_accuracy"] == summary.best_val_accuracy
        assert row["test_accuracy"] == summary.test_accuracy is not None
        assert row["final_prompt_chars"] == len(summary.final_prompt)
        assert row["final_prompt_tokens"] == text_metrics(summary.final_prompt).tokens
        assert row["uniformity"] is None  # the sim gives no token log-probabilities: no surprisal recorded
        assert row["llm_calls"] == summary.cost["total"]["llm_calls"] > 0
        assert row["llm_tokens"] == summary.cost["total"]["tokens"] > 0

    table = format_table(rows)
    print("\n" + table)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "merge", "task"] and "uniformity" in lines[0]
    assert lines[2].startswith("summarize/run (simulated LLM) ")
    assert lines[3].startswith("summarize-uid/run (simulated LLM) ")
    assert "(simulated LLM): numbers from the simulated LLM" in table
    columns = lines[0].index("uniformity")
    assert lines[2][columns] == "-" and lines[3][columns] == "-"
    assert f"{100 * rows[1]['best_val_accuracy']:.1f}%" in lines[3]

    runs_loaded = [load_run(runs[m]) for m in MERGES]
    png = plot_comparison(rows, {row["run"]: run.rounds for row, run in zip(rows, runs_loaded)},
                          tmp_path / "out" / "compare.png")
    assert png.read_bytes()[:8] == PNG_MAGIC

    # the paper's finding on the sim: the UID merge keeps at least the instructions plain summarisation keeps
    final = {m: RunFolder(runs[m]).read_summary().final_prompt for m in MERGES}
    kept = {m: instructions_in(final[m], "object_counting") for m in MERGES}
    print(f"catalogue instructions kept: {kept}")
    assert len(kept["summarize-uid"]) >= len(kept["summarize"])


def _with_prompt_metrics(run_dir: Path, target: Path) -> Path:
    """A copy of a run whose rounds carry metrics as the integrated federation records them."""
    copy = shutil.copytree(run_dir, target)
    records = [json.loads(line) for line in (copy / "rounds.jsonl").read_text().splitlines()]
    for number, record in enumerate(records, start=1):
        record["merged_prompt_metrics"] = {**text_metrics(record["merged_prompt"]).as_dict(),
                                           "surprisal_mean": 3.0, "surprisal_max": 9.0,
                                           "surprisal_variance": 4.0 / number}
        for upload in record["uploads"]:
            upload["prompt_metrics"] = text_metrics(upload["reply"]["prompt"]).as_dict()
    (copy / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return copy


def test_recorded_surprisal_shows_as_uniformity_and_in_the_plots(runs, tmp_path) -> None:
    measured = _with_prompt_metrics(runs["summarize-uid"], tmp_path / "measured")
    rows = compare_runs([runs["summarize"], measured])
    assert rows[0]["uniformity"] is None and rows[1]["uniformity"] == pytest.approx(2.0)
    assert rows[1]["final_surprisal_mean"] == 3.0
    table = format_table(rows)
    assert "2.00" in table.splitlines()[3]

    loaded = [load_run(runs["summarize"]), load_run(measured)]
    assert loaded[1].rounds[-1].merged_prompt_metrics["surprisal_variance"] == 2.0
    assert loaded[1].rounds[0].uploads[0].prompt_metrics["chars"] == len(loaded[1].rounds[0].uploads[0].reply.prompt)
    png = plot_comparison(rows, {row["run"]: run.rounds for row, run in zip(rows, loaded)}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == PNG_MAGIC

    for run in loaded:  # with surprisal, and a run without it
        summary = run.summary
        out = plot_prompt_dynamics(run.rounds, tmp_path / f"{run.name}-prompt_metrics.png",
                                   initial_accuracy=summary.initial_val_accuracy,
                                   initial_metrics=summary.initial_prompt_metrics,
                                   initial_prompt=summary.initial_prompt, title=run.name, simulated=simulated(run))
        assert out.read_bytes()[:8] == PNG_MAGIC


def test_an_unfinished_run_is_marked(runs, tmp_path) -> None:
    copy = shutil.copytree(runs["summarize"], tmp_path / "stopped")
    summary = json.loads((copy / "summary.json").read_text())
    summary.update(finished=False, test_accuracy=None, error="RoundFailed: round 3 train: only 1 client(s) succeeded")
    (copy / "summary.json").write_text(json.dumps(summary))
    table = format_table(compare_runs([copy]))
    assert "2*" in table.splitlines()[2] and "*: the run did not finish" in table


def test_a_folder_of_the_older_format_still_compares(tmp_path) -> None:
    """A run recorded before typed records (version-1 round lines, the older summary keys)."""
    folder = tmp_path / "old-run"
    (folder / "prompts").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"run_config": {"merge": "summarize-uid"}}))
    (folder / "summary.json").write_text(json.dumps({
        "finished": True, "error": "", "rounds": 1, "rounds_planned": 1, "resumed_after_rounds": [],
        "task": "object_counting", "partitioning": "homogeneous", "merge": "summarize-uid",
        "initial_prompt": "Count.", "initial_prompt_metrics": None, "initial_val_accuracy": 0.25,
        "best_val_accuracy": 0.5, "best_round": 1, "best_prompt": "Count every item.",
        "final_prompt": "Count every item.", "test_accuracy": 0.4, "test_examples": 10,
        "test_failures": [{"label": "2", "reason": "LLMError: timeout"}],
        "cost": {"total": {"llm_calls": 42, "tokens": 4200}}, "results_dir": str(folder)}))
    (folder / "rounds.jsonl").write_text(json.dumps({
        "round": 1, "clients": [{"label": "0", "num_examples": 5, "prompt": "Count every item.",
                                 "metrics": {"llm_calls": 3.0, "val_accuracy": 0.5, "val_examples": 4.0}}],
        "failures": [], "merge_method": "summarize-uid", "merged_prompt": "Count every item.",
        "merged_prompt_metrics": {"chars": 17, "surprisal_variance": 1.5, "surprisal_mean": 2.0},
        "val_accuracy": 0.5, "val_examples": 10, "val_per_client": {"0": {"correct": 5.0, "total": 10.0}},
        "best_val_accuracy": 0.5, "best_round": 1}) + "\n")
    run = load_run(folder)
    assert run.summary.task == ("object_counting",)
    assert [(f.label, f.stage) for f in run.summary.test_failures] == [("2", "test")]
    assert [u.reply.prompt for u in run.rounds[0].uploads] == ["Count every item."]
    assert simulated(run) is True  # the sim was the default backend of older runs
    (row,) = compare_runs([run])
    assert row["rounds"] == 1 and row["merge"] == "summarize-uid" and row["task"] == "object_counting"
    assert (row["initial_val_accuracy"], row["best_val_accuracy"], row["test_accuracy"]) == (0.25, 0.5, 0.4)
    assert row["uniformity"] == 1.5 and row["final_surprisal_mean"] == 2.0 and row["llm_calls"] == 42
    assert "old-run (simulated LLM)" in format_table([row])
    png = plot_comparison([row], {row["run"]: run.rounds}, tmp_path / "old.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_compare_shows_intervals_and_pairs_two_runs_on_their_shared_test_examples(runs) -> None:
    """Real (sim) runs of the same split: the same example ids, so the best prompts pair up; the
    table shows each accuracy with its Wilson interval and n. Numbers from the simulated LLM."""
    rows = compare_runs([runs[m] for m in MERGES])
    for row in rows:
        interval = row["test_interval"]
        assert interval is not None and interval.n > 0 and interval.low <= row["test_accuracy"] <= interval.high
        assert set(row["test_outcomes"]) and all(isinstance(v, bool) for v in row["test_outcomes"].values())
    table = format_table(rows)
    low, high = rows[0]["test_interval"].low, rows[0]["test_interval"].high
    assert f"[{100 * low:.0f}-{100 * high:.0f}] n={rows[0]['test_interval'].n}" in table
    paired_line = next(line for line in table.splitlines() if line.startswith("  summarize-uid/run: "))
    assert re.search(r"(better|worse|no detectable difference) \([+-]\d+\.\d points", paired_line)
    assert f"n = {len(set(rows[0]['test_outcomes']) & set(rows[1]['test_outcomes']))})" in paired_line


def test_compare_pairs_by_example_id_and_says_when_outcomes_are_missing() -> None:
    from fedtextgrad_core.tools.compare import paired_lines

    base = {"run": "a", "test_outcomes": {f"t/test/{i}": i < 5 for i in range(20)}}
    better = {"run": "b", "test_outcomes": {f"t/test/{i}": i < 17 for i in range(20)}}  # 12 more right, none lost
    old = {"run": "c", "test_outcomes": {}}
    lines = paired_lines([base, better, old])
    assert lines[1].startswith("  b: better (+60.0 points") and "n = 20" in lines[1]
    assert lines[2] == "  c: no per-example test outcomes recorded (a run before they were)"
