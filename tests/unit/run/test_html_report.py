"""report.html (run/html_report.py) and the simulated clients' step log it shows (run/site_steps.py).

The page is built from typed records, so these tests build records: a hostile prompt must come out
as text, never as markup; diffs mark what was added and removed; a simulated run says so; a folder
written before the intervals existed still renders. The step log must reach the run folder only
from a simulated client, and only the folder whose config.json holds the client's run config.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from fedtextgrad_core.method.local_training import STEP_DECISIONS, LocalMetrics, LocalStep, train_prompt
from fedtextgrad_core.run import html_report, site_steps
from fedtextgrad_core.run.client_round import answer
from fedtextgrad_core.run.codec import to_plain
from fedtextgrad_core.run.messages import Phase, RoundRequest
from fedtextgrad_core.run.records import RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.stats import paired, wilson
from fedtextgrad_core.tools.cli import main
from tests.support.flower_loopback import default_run_config
from tests.support.scripted_pool import (
    ScriptedPool,
    eval_outcomes,
    eval_reply,
    evals,
    make_federation,
    start_prompt,
    train_reply,
    uploads,
)

HOSTILE = ("Count.</script><script>alert(1)</script><img src=x onerror=alert(2)> \x1b[31mred\x1b[0m "
           "\u202etxet desrever\u202c & \"quoted\" 'single'")


@pytest.fixture(autouse=True)
def own_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pointers simulated clients follow go to this test's own temporary folder."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


def summary_of(**changes: object) -> RunSummary:
    base = RunSummary(finished=True, error="", rounds=1, rounds_planned=1, task=("object_counting",),
                      partitioning="homogeneous", merge="concat", initial_prompt="Think step by step.",
                      initial_val_accuracy=0.5, best_val_accuracy=0.7, best_round=1, best_prompt="p", final_prompt="p",
                      results_dir="/nowhere", client_llms={"0": "sim (test)"}, simulated=True)
    return base.with_changes(**changes)


def record_of(merged: str, upload_prompt: str, server_round: int = 1) -> RoundRecord:
    reply = train_reply(0, upload_prompt, 10)
    return RoundRecord.from_json({
        "round": server_round, "uploads": [{"label": "0", "client": {"node_id": 100, "partition_id": 0},
                                            "reply": to_plain(reply)}],
        "failures": [], "merge": {"method": "concat"}, "merged_prompt": merged, "merged_prompt_metrics": None,
        "evaluations": [], "val_accuracy": 0.7, "val_examples": 20, "best_val_accuracy": 0.7, "best_round": 1,
        "version": 2,
    })


def tags(page: str, name: str) -> list[str]:
    return re.findall(rf"<{name}\b[^>]*>", page, flags=re.IGNORECASE)


# --- escaping and diffs ----------------------------------------------------------------------------------


def test_a_hostile_prompt_comes_out_as_text_never_as_markup() -> None:
    page = html_report.render("run</title><script>x</script>", summary_of(initial_prompt=HOSTILE, best_prompt=HOSTILE),
                              [record_of(HOSTILE + " More.", HOSTILE + " Client.")],
                              {"settings": {"forward": {"base_url": "http://user:secret@host:8000/v1"}}},
                              {(0, 1): [LocalStep(1, 3, 0.0, 1.0, "kept", (HOSTILE,), HOSTILE + " step")]})
    assert not tags(page, "script") and not tags(page, "img")
    assert "onerror=" not in "".join(tags(page, r"[a-z]+"))  # no attribute built from data
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x1b" not in page and "\u202e" not in page  # hidden characters are shown, not passed on
    assert '<span class="ctl">U+001B</span>' in page and '<span class="ctl">U+202E</span>' in page
    assert "secret" not in page  # a URL's password is not shown
    assert "default-src 'none'" in page  # nothing loads, nothing runs, even if something slipped through


def test_a_word_diff_marks_what_was_added_and_removed() -> None:
    diff = html_report.diff_html("Count the items. Answer briefly.", "Count every item. Answer briefly.")
    assert "<del>the items</del>" in diff and "<ins>every item</ins>" in diff
    assert "Answer briefly." in diff and "<del>Answer" not in diff
    assert "unchanged" in html_report.diff_html("same", "same")
    tagged = html_report.diff_html("<b>bold</b>", "<i>bold</i>")  # both sides escaped
    assert "<b>" not in tagged and "<i>" not in tagged and "<del>b</del><ins>i</ins>" in tagged


def test_a_text_too_long_to_diff_is_shown_before_and_after() -> None:
    long_before, long_after = "word " * 4000, "term " * 4000
    diff = html_report.diff_html(long_before, long_after)
    assert "too long to diff" in diff and diff.count("<del>") == 1 and diff.count("<ins>") == 1


# --- what the page says ---------------------------------------------------------------------------------


def test_a_simulated_run_says_its_numbers_prove_the_machinery_not_the_method() -> None:
    page = html_report.render("run", summary_of(), [record_of("Merged.", "Upload.")])
    assert len(RoundRecord.to_json(record_of("Merged.", "Upload."))["uploads"]) == 1
    assert 'id="simulated-note"' in page and "never that the method does" in page
    real = summary_of(simulated=False, client_llms={"0": "openai: llama-3 at http://127.0.0.1:8080/v1"})
    assert "simulated-note" not in html_report.render("run", real, [])


def test_the_round_table_the_test_table_and_the_comparisons_are_shown() -> None:
    right = {f"t/{i}": i < 8 for i in range(10)}
    start = {f"t/{i}": i < 4 for i in range(10)}
    summary = summary_of(test_intervals={"best": wilson(8, 10), "initial": wilson(4, 10)},
                         comparisons={"best vs initial": paired(right, start)},
                         test_by_task={"best": {"object_counting": wilson(8, 10)}})
    page = html_report.render("run", summary, [record_of("Merged one.", "Upload one."),
                                               record_of("Merged two.", "Upload two.", server_round=2)])
    rounds = page.split('id="rounds"')[1].split("</table>")[0]
    assert rounds.count("<tr>") == 1 + 3  # header, the start prompt, two rounds
    tests = page.split('id="tests"')[1].split("</table>")[0]
    assert "best prompt" in tests and "80.0%" in tests and "initial prompt" in tests
    assert 'id="comparisons"' in page and ("better" in page or "no detectable difference" in page)
    assert 'id="tests-by-task"' in page
    assert '<svg id="accuracy-figure"' in page and "<polyline" in page
    assert 'id="round-2"' in page and "<del>one</del><ins>two</ins>" in page  # round 2 against round 1


def test_a_folder_from_before_the_intervals_still_renders() -> None:
    old = RunSummary.from_json({"finished": True, "error": "", "rounds": 1, "rounds_planned": 1,
                                "task": "object_counting", "partitioning": "homogeneous", "merge": "concat",
                                "initial_prompt": "Start.", "initial_val_accuracy": 0.4, "best_val_accuracy": 0.6,
                                "best_round": 1, "best_prompt": "Best.", "final_prompt": "Best.",
                                "results_dir": "/x", "test_accuracy": 0.55, "test_examples": 40})
    v1 = RoundRecord.from_json({"round": 1, "clients": [{"label": "0", "prompt": "Best.", "metrics": {
        "steps": 3, "steps_accepted": 1, "val_accuracy": 0.5, "val_examples": 10}}], "merged_prompt": "Best.",
        "val_accuracy": 0.6, "val_examples": 20, "best_val_accuracy": 0.6, "best_round": 1})
    page = html_report.render("old", old, [v1])
    assert "55.0%" in page.split('id="tests"')[1]  # the test accuracy without its interval
    assert "steps kept 1 of 3" in page and 'id="feedback-note"' in page
    assert "stays at each site" in page or "stays at" in page


def test_steps_with_feedback_are_shown_where_a_step_log_exists() -> None:
    steps = {(0, 1): [LocalStep(1, 3, 0.0, 0.67, "kept", ("Say how to count 'two'.",), "Count 'two' as two."),
                      LocalStep(2, 3, 0.67, 0.33, "reverted", ("Feedback <b>2</b>",), "Worse."),
                      LocalStep(3, 3, 1.0, None, STEP_DECISIONS[2])]}
    page = html_report.render("run", summary_of(), [record_of("Merged.", "Count 'two' as two.")], steps=steps)
    assert 'class="kept">kept<' in page and 'class="reverted">reverted<' in page
    assert "Say how to count &#x27;two&#x27;." in page and "Feedback &lt;b&gt;2&lt;/b&gt;" in page
    assert "feedback-note" not in page


# --- the step log ---------------------------------------------------------------------------------------


def test_a_simulated_client_logs_its_steps_in_the_announced_run_folder_a_site_never(tmp_path: Path) -> None:
    config = default_run_config(**{"results-dir": str(tmp_path), "run-name": "r", "local-steps": 2,
                                   "synthetic-size": 60})
    folder = RunFolder.create(tmp_path, "r", {"run_config": config, "settings": {}})
    site_steps.announce(config, folder.path)
    node = {"partition-id": 1, "num-partitions": 2}
    request = RoundRequest(phase=Phase.TRAIN.value, server_round=1, prompt=start_prompt())
    answer(config, node, request, pinned=True)  # a deployed site: nothing written
    assert not (folder.path / "clients").exists()
    reply = answer(config, node, request, pinned=False)  # Flower's simulation
    logged = site_steps.read_steps(folder.path)
    assert list(logged) == [(1, 1)]
    steps = logged[(1, 1)]
    assert [s.step for s in steps] == [1, 2]
    local = reply.local  # type: ignore[union-attr]
    assert sum(s.decision == "kept" for s in steps) == local.steps_accepted
    assert sum(s.decision == "reverted" for s in steps) == local.steps_reverted
    assert all(s.feedback for s in steps if s.decision in ("kept", "reverted"))
    assert "feedback" not in json.dumps(reply.encode())  # the reply carries counts only


def test_the_step_log_goes_nowhere_when_the_folder_holds_another_run_config(tmp_path: Path) -> None:
    config = default_run_config(**{"results-dir": str(tmp_path), "run-name": "r"})
    folder = RunFolder.create(tmp_path, "r", {"run_config": {**config, "seed": 7}, "settings": {}})
    site_steps.announce(config, folder.path)
    assert site_steps.run_folder_for(config) is None
    site_steps.record(config, 0, 1, [LocalStep(1, 3, 0.0, None, STEP_DECISIONS[2])])
    assert not (folder.path / "clients").exists()
    pointers = site_steps.pointer_folder()
    pointers.chmod(0o777)  # a folder others may write to proves nothing
    RunFolder(folder.path).path.joinpath("config.json").write_text(json.dumps({"run_config": config}))
    assert site_steps.run_folder_for(config) is None
    pointers.chmod(0o700)
    assert site_steps.run_folder_for(config) == folder.path.resolve()


def test_a_round_logged_twice_counts_as_last_written(tmp_path: Path) -> None:
    config = {"x": 1}
    (tmp_path / "config.json").write_text(json.dumps({"run_config": config}))
    site_steps.announce(config, tmp_path)
    first = [LocalStep(1, 3, 0.0, 0.5, "kept"), LocalStep(2, 3, 0.5, 0.0, "reverted")]
    site_steps.record(config, 0, 1, first)
    site_steps.record(config, 0, 1, first[:1])  # round 1 run again after a resume
    (tmp_path / "clients" / "0" / "steps.jsonl").open("a").write("not json\n")
    assert site_steps.read_steps(tmp_path) == {(0, 1): first[:1]}


def test_each_local_step_is_recorded_as_the_metrics_count_it() -> None:
    from fedtextgrad_core.data.loaders import load_splits
    from fedtextgrad_core.data.tasks import get_task
    from fedtextgrad_core.llm.engine import make_engine
    from tests.support.settings_helpers import endpoint, local

    task = get_task("object_counting")
    train = load_splits(task.name, "synthetic", seed=0, synthetic_size=100).train
    engine = make_engine(endpoint())
    result = train_prompt(task.start_prompt, task, train, engine, engine, local(steps=4, batch_size=3, seed=0))
    metrics: LocalMetrics = result.metrics
    assert len(result.steps) == metrics.steps == 4
    assert sum(s.decision == "kept" for s in result.steps) == metrics.steps_accepted
    assert sum(s.decision == "reverted" for s in result.steps) == metrics.steps_reverted
    assert all(s.decision in STEP_DECISIONS for s in result.steps)
    assert all(s.after is not None and s.candidate for s in result.steps if s.decision in ("kept", "reverted"))


# --- the recorder and the command -------------------------------------------------------------------------


def finished_run(tmp_path: Path, **overrides: object) -> Path:
    start = start_prompt()
    pool = ScriptedPool(2, {
        (Phase.EVALUATE, 0): {100: eval_outcomes(0, [True, False] * 5), 101: eval_outcomes(1, [False] * 10)},
        (Phase.TRAIN, 1): uploads(start),
        (Phase.EVALUATE, 1): evals((8, 10), (6, 10)),
        (Phase.TEST, 1): {100: eval_reply(0, 9, 10), 101: eval_reply(1, 7, 10)},
    })
    fed = make_federation(tmp_path, pool, rounds=1, **overrides)
    fed.run()
    return fed.recorder.path


def test_every_run_ends_with_its_report_beside_the_summary(tmp_path: Path) -> None:
    folder = finished_run(tmp_path)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and 'id="rounds"' in page and 'id="tests"' in page
    assert '<a href="summary.json">' in page


def test_the_report_command_writes_the_page_and_refuses_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    folder = finished_run(tmp_path)
    (folder / "report.html").unlink()
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.html").is_file()
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert f'href="{folder.as_uri()}/summary.json"' in out.read_text(encoding="utf-8")
    capsys.readouterr()
    for argv in (["report", str(tmp_path / "missing")], ["report", str(tmp_path)],
                 ["report", str(folder), "--out", str(tmp_path / "no" / "such" / "r.html")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedtextgrad report: ") and err.count("\n") == 1 and "Traceback" not in err
    (folder / "summary.json").write_text("{not json")
    assert main(["report", str(folder)]) == 2
    assert "summary.json" in capsys.readouterr().err
