"""The ``fedtextgrad`` command (eval, analyze, compare, settings), called in-process through ``cli.main``."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from fedtextgrad_core.data.loaders import load_splits
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.run import schema
from fedtextgrad_core.sim import full_prompt
from fedtextgrad_core.tools.cli import main
from tests import SHARED_DATA
from tests.support.settings_helpers import endpoint

ACCURACY = re.compile(r"accuracy (\d+\.\d)% \((\d+)/(\d+), 95% interval [\d.]+-[\d.]+%\)(?: \(simulated LLM\))?, "
                      r"malformed replies (\d+), "
                      r"scored otherwise by the other answer parser \d+, LLM calls (\d+)")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "best.txt"
    path.write_text(get_task("object_counting").start_prompt + "\n", encoding="utf-8")
    return path


def printed_scores(out: str) -> tuple[float, int, int, int, int]:
    match = ACCURACY.search(out)
    assert match, out
    percent, correct, total, malformed, calls = match.groups()
    return float(percent), int(correct), int(total), int(malformed), int(calls)


def expected_scores(task: str, prompt: str, examples) -> tuple[int, int]:
    scores = evaluate_prompt(make_engine(endpoint()), get_task(task), prompt, examples)
    return scores.correct, scores.total


def test_eval_on_synthetic_data_prints_the_accuracy(prompt_file: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["eval", "--task", "object_counting", "--prompt-file", str(prompt_file), "--split", "val",
                 "--limit", "30"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "scoring 30 val examples of object_counting with sim" in out
    percent, correct, total, malformed, calls = printed_scores(out)
    val = load_splits("object_counting", "synthetic").val[:30]
    assert (correct, total) == expected_scores("object_counting", prompt_file.read_text().strip(), val)
    assert percent == round(100 * correct / total, 1)
    assert malformed == 0 and calls == 30


def test_a_better_prompt_scores_higher(prompt_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    better = tmp_path / "full.txt"
    better.write_text(full_prompt("object_counting"), encoding="utf-8")
    args = ["eval", "--task", "object_counting", "--split", "test", "--limit", "40"]
    assert main(args + ["--prompt-file", str(prompt_file)]) == 0
    start = printed_scores(capsys.readouterr().out)[1]
    assert main(args + ["--prompt-file", str(better)]) == 0
    assert printed_scores(capsys.readouterr().out)[1] > start


@pytest.mark.skipif(not (SHARED_DATA / "bbh" / "word_sorting.json").is_file(), reason="shared BBH data not present")
def test_eval_on_real_bbh_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompt = tmp_path / "sorting.txt"
    prompt.write_text(get_task("word_sorting").start_prompt, encoding="utf-8")
    code = main(["eval", "--task", "word_sorting", "--prompt-file", str(prompt), "--data-dir", str(SHARED_DATA),
                 "--split", "test", "--limit", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    _, correct, total, _, _ = printed_scores(out)
    test = load_splits("word_sorting", str(SHARED_DATA)).test
    assert len(test) == 100  # the reference split: the last 100 of 250
    assert (correct, total) == expected_scores("word_sorting", get_task("word_sorting").start_prompt, test[:20])


def test_eval_through_the_openai_backend(prompt_file: Path, sim_http: str, capsys: pytest.CaptureFixture) -> None:
    args = ["eval", "--task", "object_counting", "--prompt-file", str(prompt_file), "--split", "val", "--limit", "12"]
    assert main(args) == 0
    in_process = printed_scores(capsys.readouterr().out)
    code = main(args + ["--backend", "openai", "--base-url", sim_http, "--model", "sim-over-http",
                        "--concurrency", "3", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"sim-over-http at {sim_http}" in out
    assert printed_scores(out) == in_process


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtextgrad eval: ")
    return lines[0]


def test_missing_prompt_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["eval", "--task", "object_counting", "--prompt-file", str(missing)]) == 2
    assert str(missing) in one_line_error(capsys)


def test_empty_prompt_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", "--task", "object_counting", "--prompt-file", str(empty)]) == 2
    assert "empty" in one_line_error(capsys)


@pytest.mark.parametrize("extra, needle", [
    (["--task", "counting"], "'task'"),
    (["--backend", "openai"], "'llm-base-url'"),
    (["--data-dir", "/no/such/folder"], "/no/such/folder"),
    (["--task", "gsm8k"], "synthetic"),
    (["--limit", "-5"], "'--limit'"),
], ids=["unknown-task", "openai-without-url", "missing-data-dir", "gsm8k-has-no-synthetic-data", "negative-limit"])
def test_bad_input_exits_2_with_one_line(prompt_file: Path, extra: list[str], needle: str,
                                         capsys: pytest.CaptureFixture) -> None:
    args = ["eval", "--task", "object_counting", "--prompt-file", str(prompt_file), *extra]
    assert main(args) == 2
    assert needle in one_line_error(capsys)


def test_analyze_prints_metrics_of_each_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("Think step by step.\n")
    long.write_text(full_prompt("object_counting") + "\n")
    assert main(["analyze", str(short), str(long)]) == 0
    out = capsys.readouterr().out
    assert "short.txt" in out and "long.txt" in out
    assert str(len("Think step by step.")) in out  # the character count of the first prompt


def test_compare_two_runs_prints_a_table_and_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedtextgrad_core.run.server_setup import open_run
    from server_app.strategy import PromptStrategy
    from tests.support.flower_loopback import LoopbackGrid, default_run_config

    folders = []
    for merge in ("summarize", "summarize-uid"):
        run_config = default_run_config(**{"merge": merge, "num-server-rounds": 1,
                                           "results-dir": str(tmp_path / merge), "run-name": "run"})
        run = open_run(run_config, echo=lambda line: None)
        PromptStrategy(run.federation).start(LoopbackGrid(run_config))
        folders.append(str(run.recorder.path))
    png = tmp_path / "cmp.png"
    assert main(["compare", *folders, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "summarize-uid" in out and "summarize " in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path)]) == 2  # not a run folder: one line, exit 2
    assert "is not a run folder" in capsys.readouterr().err


def test_settings_prints_the_readme_table_naming_every_setting(capsys: pytest.CaptureFixture) -> None:
    assert main(["settings"]) == 0  # markdown is the default
    default = capsys.readouterr().out
    assert main(["settings", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out == default and out.strip() == schema.markdown_table()
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [setting.key for setting in schema.SETTINGS]


def test_settings_prints_pyprojects_block_as_toml_holding_the_defaults(capsys: pytest.CaptureFixture) -> None:
    assert main(["settings", "--format", "pyproject"]) == 0
    out = capsys.readouterr().out
    parsed = tomllib.loads(out)
    assert parsed == schema.defaults()
    assert all(type(parsed[key]) is type(value) for key, value in schema.defaults().items())
    # and it is what sits under [tool.flwr.app.config]
    assert tomllib.loads("[tool.flwr.app.config]\n" + out)["tool"]["flwr"]["app"]["config"] == schema.defaults()


def test_settings_refuses_an_unknown_format(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["settings", "--format", "html"])
    assert exited.value.code == 2 and "invalid choice: 'html'" in capsys.readouterr().err


def test_eval_repeats_reports_the_spread_and_writes_every_outcome(prompt_file: Path, tmp_path: Path, capsys) -> None:
    """Scripted noise-free double: the simulated LLM answers alike every time, so the spread is zero and the
    repeats agree example by example; the real servers' spread is measured in tests/integration."""
    outcomes = tmp_path / "outcomes.jsonl"
    assert main(["eval", "--task", "object_counting", "--prompt-file", str(prompt_file), "--split", "val",
                 "--limit", "12", "--repeats", "3", "--outcomes", str(outcomes)]) == 0
    out = capsys.readouterr().out
    assert out.count("(repeat ") == 3
    assert "spread over 3 scorings: accuracy" in out and "0 of 12 examples scored differently" in out
    lines = [json.loads(line) for line in outcomes.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"object_counting/val/{i}" for i in range(12)]
    assert all(len(line["correct"]) == 3 and len(set(line["correct"])) == 1 for line in lines)
    assert main(["eval", "--task", "object_counting", "--prompt-file", str(prompt_file), "--repeats", "0"]) == 2
    assert "setting '--repeats' = 0 is not accepted" in capsys.readouterr().err
