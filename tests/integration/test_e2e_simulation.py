"""End to end: the README's `flwr run . local` in Flower's simulation, checked by its results.

`flwr run` can exit 0 when the run failed, so every check is made on what the run left on
disk and printed (see simulation_helpers.py).
"""

from __future__ import annotations

import json

import pytest

from tests.support.simulation_helpers import flwr_run

pytestmark = pytest.mark.slow


def test_default_federation_on_the_sim_scripts_an_improvement_and_leaves_a_complete_results_folder(flwr_home, tmp_path):
    """The sim's scripted mistakes make the improvement certain: this proves the machinery, not the method."""
    output = flwr_run(flwr_home, f"results-dir='{tmp_path}' run-name='e2e' num-server-rounds=2")
    run_dir = tmp_path / "e2e"
    assert (run_dir / "summary.json").exists(), output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True, output[-3000:]
    assert summary["rounds"] == 2
    assert summary["best_val_accuracy"] > summary["initial_val_accuracy"]
    assert summary["test_accuracy"] is not None
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    assert len(rounds[0]["uploads"]) == 3  # three simulated SuperNodes, as the README's line declares
    assert all(r["merged_prompt"].endswith("where VALUE is a numerical value.") for r in rounds)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["merge"] == "summarize-uid"
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "prompts" / "best.txt").read_text().strip() == summary["best_prompt"]
    assert "merged (summarize-uid)" in output  # the per-round table was printed
    assert summary["simulated"] is True and "(simulated LLM)" in output


def test_bad_setting_stops_the_run_at_start_with_one_clear_line(flwr_home, tmp_path):
    output = flwr_run(flwr_home, f"results-dir='{tmp_path}' merge='average'")
    assert ("fedtextgrad: the run cannot start: setting 'merge' = 'average' is not accepted; "
            "expected concat, summarize, summarize-uid") in output
    assert not any(tmp_path.iterdir())  # nothing was started
