"""The server's main loop in process, and what a finished run is judged by when compared."""

from __future__ import annotations

import json
from pathlib import Path

from fedtextgrad_core.run.checkpoint import checkpoint_to_resume
from fedtextgrad_core.run.federation import PromptFederation
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.run.settings import RunSettings
from server_app.strategy import PromptStrategy


def run_server(run_config: dict, grid) -> tuple[PromptFederation, list[str]]:
    """What server_app.main does, in process."""
    settings = RunSettings.from_config(run_config)
    merger = make_engine(settings.server) if settings.merge != "concat" else None
    lines: list[str] = []
    federation = PromptFederation.open(settings, run_config, merger,
                                       checkpoint_to_resume(settings.resume_from, run_config), echo=lines.append)
    try:
        PromptStrategy(settings, federation).start(grid)
    except Exception as exc:
        federation.record_error(exc)
        raise
    return federation, lines


def outcome(run_dir: Path) -> dict:
    """Prompts, scores and clients of a run: equal for two runs that did the same."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return {
        "merged": [r["merged_prompt"] for r in rounds],
        "val": [r["val_accuracy"] for r in rounds],
        "trained_by": [[c["label"] for c in r["clients"]] for r in rounds],
        "evaluated_by": [sorted(r["val_per_client"]) for r in rounds],
        "best": (summary["best_prompt"], summary["best_val_accuracy"], summary["best_round"]),
        "initial": summary["initial_val_accuracy"],
        "test": summary["test_accuracy"],
        "rounds": summary["rounds"],
    }
