"""The server's main loop in process, and what a finished run is judged by when compared."""

from __future__ import annotations

from pathlib import Path

from fedtextgrad_core.run.run_folder import RunFolder
from fedtextgrad_core.run.server_setup import ServerRun, open_run
from server_app.strategy import PromptStrategy


def run_server(run_config: dict, grid) -> tuple[ServerRun, list[str]]:
    """What server_app.main does, in process: open the run (or resume it), run the loop over ``grid``.

    A failing run leaves its summary with the error (the loop's recorder writes it) and raises."""
    lines: list[str] = []
    run = open_run(run_config, echo=lines.append)
    PromptStrategy(run.federation).start(grid)
    return run, lines


def outcome(run_dir: Path) -> dict:
    """Prompts, scores and clients of a run: equal for two runs that did the same."""
    folder = RunFolder(Path(run_dir))
    summary = folder.read_summary()
    rounds = folder.read_rounds()
    return {
        "merged": [r.merged_prompt for r in rounds],
        "val": [r.val_accuracy for r in rounds],
        "trained_by": [[u.label for u in r.uploads] for r in rounds],
        "evaluated_by": [sorted(e.label for e in r.evaluations) for r in rounds],
        "best": (summary.best_prompt, summary.best_val_accuracy, summary.best_round),
        "initial": summary.initial_val_accuracy,
        "test": summary.test_accuracy,
        "rounds": summary.rounds,
    }
