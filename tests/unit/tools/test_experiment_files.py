"""The grid files in experiments/ and the grid options that need no run: the settings the reference
code fixes, the data source taken from the command line, and the table's keys.

The reference values below were read in ubc-tea/FedTextGrad at 7ebebee (the file and line is beside
each); docs/method.md lists them with every other difference.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtextgrad_core.run.schema import BY_KEY, RUN, defaults
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.tools.experiment import GridError, check_data, load_grid
from tests import ROOT, SHARED_DATA

PAPER = ROOT / "experiments" / "paper.toml"
CPU = ROOT / "experiments" / "cpu.toml"


def _maximum(key: str) -> int:
    high = BY_KEY[key].high
    assert high is not None
    return int(high)


# key -> (the reference's value as this project's setting, where the reference fixes it)
REFERENCE = {
    "answer-parser": ("last-number", "textgrad/tasks/big_bench_hard.py:12-30 parse_integer_answer"),
    "leakage-guard": ("off", "no guard: train_hetero_fed.py:238 merges the prompts as they are"),
    "merge-token-budget": (_maximum("merge-token-budget"), "one request, no cut: train_hetero_fed.py:241-246"),
    "max-prompt-chars": (_maximum("max-prompt-chars"), "no upload cap"),
    "llm-max-tokens": (2000, "textgrad/engine/textgrad_openai.py:118 max_tokens=2000"),
    "llm-temperature": (0.0, "textgrad/engine/textgrad_openai.py:118 temperature=0"),
    "llm-max-retries": (4, "textgrad/engine/textgrad_openai.py:105: 5 attempts"),
    "constrained-updates": ("off", "plain requests: textgrad_openai.py:128-140"),
    "keep-rule": ("reference", "--proximal_update: train_centralized.py:162-168"),
    "local-steps": (4, "main.py:33 --max_steps 3, run max_steps + 1 times (train_hetero_fed.py:232-234)"),
    "batch-size": (3, "main.py:31"),
    "num-server-rounds": (3, "main.py:32 --max_epochs 3"),
    "task": ("object_counting", "scripts/run_centralized.sh, scripts/run_homo_fed.sh"),
    "heterogeneous-tasks": ("object_counting,multistep_arithmetic_two,gsm8k", "scripts/run_hetero_fed.sh"),
    "gsm8k-split": ("fedtextgrad", "textgrad/tasks/gsm8k.py:84-86"),
    "loss": ("exact", "string equality for object counting and GSM8K: textgrad/tasks/__init__.py:42, :84"),
    "client-val-eval": (False, "the reference never scores a client's own prompt on validation"),
    "test-prompts": ("best,last,initial", "train_centralized.py:122, :205, :218"),
}


def test_paper_grid_sets_every_setting_the_reference_fixes_to_the_reference_value():
    raw = tomllib.loads(PAPER.read_text(encoding="utf-8"))  # parses as TOML
    grid = load_grid(PAPER)
    assert grid.settings["data-source"] == "hub"  # a clone has no shared folder; offline: --data-source
    for key, (value, where) in REFERENCE.items():
        assert key in BY_KEY, f"{key} is no longer a setting ({where})"
        setting = BY_KEY[key]
        assert raw["settings"].get(key) == value, f"paper.toml: {key} should be {value!r} ({where})"
        assert setting.read({key: raw["settings"][key]}) == setting.read({key: value})  # the schema takes it
    # every cell runs with those values, and one model in every role (the reference's scripts pass the
    # same engine as --evaluation_engine and --test_engine): backward, judge and server follow llm-*
    assert not [k for k in raw["settings"] if k.startswith(("backward-", "judge-", "server-"))]
    for cell in grid.cells:
        settings = RunSettings.from_config(grid.run_config(cell, Path("runs")))
        for key, (value, _) in REFERENCE.items():
            setting = BY_KEY[key]
            records = ([settings] if setting.record == RUN else  # an endpoint setting: every role's endpoint
                       [settings.forward, settings.backward, settings.judge, settings.server])
            for record in records:
                assert getattr(record, setting.attribute) == setting.read({key: value}), (cell.describe(), key)
        assert settings.server.model == settings.backward.model == settings.judge.model == settings.forward.model
    assert grid.rows == ("partitioning", "merge") and grid.columns == ("task",)
    assert {cell.values["partitioning"] for cell in grid.cells} == {"centralized", "homogeneous", "heterogeneous"}


def test_docs_method_names_the_setting_of_each_default_that_differs_from_the_reference():
    # the defaults that change results against the reference, each a row of docs/method.md's table that
    # names its setting; a default changed to the reference's value makes that row out of date
    shipped = defaults()
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    for key in ("answer-parser", "leakage-guard", "merge-token-budget", "max-prompt-chars", "llm-max-tokens",
                "constrained-updates", "gsm8k-split"):
        assert shipped[key] != BY_KEY[key].read({key: REFERENCE[key][0]}), key
        assert f"`{key} = " in method, f"docs/method.md gives no setting line for {key}"


def test_the_experiment_files_read_the_hub_unless_the_command_line_names_a_folder():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the offline copy this test names on the command line)")
    for path in (PAPER, CPU):
        assert tomllib.loads(path.read_text(encoding="utf-8"))["settings"]["data-source"] == "hub", path
        assert load_grid(path).settings["data-source"] == "hub"
        grid = load_grid(path, data_source=str(SHARED_DATA))
        assert grid.settings["data-source"] == str(SHARED_DATA.resolve())
        check_data(grid)  # every task of every cell finds its files there (GSM8K too), with no download
        for cell in grid.cells:
            assert grid.run_config(cell, Path("out") / "runs")["data-source"] == str(SHARED_DATA.resolve())


def test_data_source_option_relative_paths_are_taken_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    grid = load_grid(CPU, data_source="here")
    assert grid.settings["data-source"] == str(tmp_path / "here")
    assert load_grid(CPU, data_source="synthetic").settings["data-source"] == "synthetic"


@pytest.mark.parametrize("grid_text, option, says", [
    ("[axes]\nseed = [0]\n", "/no/such/folder", "--data-source '/no/such/folder' does not exist here"),
    ("[axes]\nseed = [0]\n", "", "does not exist here"),
    ("[axes]\ndata-source = ['synthetic']\n", "hub", "data-source is an axis of this grid"),
    ("[axes]\nseed = [0]\n[federation]\nconnection = 'remote'\n", "hub", "is for Flower's simulation"),
])
def test_a_wrong_data_source_option_is_one_line(tmp_path, grid_text, option, says):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(grid_text)
    with pytest.raises(GridError) as info:
        load_grid(grid_file, data_source=option)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_data_folder_without_the_tasks_files_is_refused_before_any_cell(tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("[settings]\nheterogeneous-tasks = 'object_counting,gsm8k'\n"
                         "[axes]\npartitioning = ['heterogeneous']\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GridError, match="no object_counting data in folder"):
        check_data(load_grid(grid_file, data_source=str(tmp_path / "empty")))
    with pytest.raises(GridError, match="a data folder or 'hub' for gsm8k"):  # synthetic has no GSM8K
        check_data(load_grid(grid_file, data_source="synthetic"))
    check_data(load_grid(grid_file, data_source="hub"))  # not checked: it would download


@pytest.mark.parametrize("table, rows, columns", [
    ("", ("partitioning",), ("merge",)),
    ("rows = 'model'\ncolumns = 'task'\n", ("model",), ("task",)),
    ("rows = ['partitioning', 'seed']\ncolumns = ['task', 'merge']\n", ("partitioning", "seed"), ("task", "merge")),
])
def test_table_rows_and_columns_take_any_keys(tmp_path, table, rows, columns):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f"[axes]\nseed = [0, 1]\n[table]\n{table}")
    grid = load_grid(grid_file)
    assert (grid.rows, grid.columns) == (rows, columns)


@pytest.mark.parametrize("table, says", [
    ("rows = 'speed'\n", "[table] rows: 'speed' is neither an axis, a setting, nor \"model\""),
    ("rows = []\n", "[table] rows must be a key or a non-empty list of keys"),
    ("columns = 3\n", "[table] columns must be a key or a non-empty list of keys"),
    ("rows = ['seed', 'seed']\n", "names a key twice"),
    ("rows = ['seed', 'merge']\ncolumns = 'merge'\n", "'merge' is both a row and a column key"),
])
def test_bad_table_keys_are_refused(tmp_path, table, says):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f"[axes]\nseed = [0, 1]\n[table]\n{table}")
    with pytest.raises(GridError) as info:
        load_grid(grid_file)
    assert says in str(info.value)
