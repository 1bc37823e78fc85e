"""The run folder: config, one JSON line per round, every prompt, the summary and a plot.

Everything is written as soon as it is known (rounds appended and flushed, the
summary replaced atomically), so a run that dies mid-way leaves what it finished.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def default_run_name(task_label: str, partitioning: str, merge: str) -> str:
    return f"{task_label}-{partitioning}-{merge}-{time.strftime('%Y%m%d-%H%M%S')}"


def _safe(name: str) -> str:
    """A file name made of letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("._")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunRecorder:
    """Writes one run's folder under ``results_dir``."""

    def __init__(self, results_dir: str | Path, run_name: str, config: Mapping[str, object]):
        base = Path(results_dir).expanduser().resolve()
        name = _safe(run_name) or "run"
        self.path, number = base / name, 1
        while (self.path / "rounds.jsonl").exists():  # never overwrite an earlier run
            number += 1
            self.path = base / f"{name}-{number}"
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "prompts").mkdir(exist_ok=True)
        self.rounds_file = self.path / "rounds.jsonl"
        self.rounds_file.write_text("", encoding="utf-8")
        _atomic_write(self.path / "config.json", json.dumps(config, indent=2, default=str) + "\n")

    @classmethod
    def reopen(cls, folder: Path, finished_rounds: int) -> RunRecorder:
        """The folder of an interrupted run, to continue writing in. Round records after
        ``finished_rounds`` (a round cut short between its record and its checkpoint) and a
        half-written last line are dropped, so the resumed rounds are written exactly once."""
        recorder = cls.__new__(cls)
        recorder.path = folder
        recorder.rounds_file = folder / "rounds.jsonl"
        (folder / "prompts").mkdir(exist_ok=True)
        kept = []
        if recorder.rounds_file.exists():
            for line in recorder.rounds_file.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if int(record.get("round", 0)) <= finished_rounds:
                    kept.append(line + "\n")
        _atomic_write(recorder.rounds_file, "".join(kept))
        return recorder

    def save_prompt(self, name: str, text: str) -> str:
        """Write a prompt to prompts/<name>.txt and return its path relative to the run."""
        relative = Path("prompts") / (_safe(name) + ".txt")
        _atomic_write(self.path / relative, text + "\n")
        return str(relative)

    def append_round(self, record: Mapping[str, object]) -> None:
        with self.rounds_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_summary(self, summary: Mapping[str, object]) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")

    def read_rounds(self) -> list[dict]:
        lines = self.rounds_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def plot_accuracy(self, rounds: Sequence[Mapping[str, object]], initial_accuracy: float | None) -> Path:
        """accuracy.png: merged-prompt validation accuracy per round, and one line per client.

        A client's line is the validation accuracy of the prompt it uploaded, on its own
        validation data; the merged line is the federated validation accuracy.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        merged_x, merged_y = ([0], [initial_accuracy]) if initial_accuracy is not None else ([], [])
        clients: dict[str, tuple[list[int], list[float]]] = {}
        for record in rounds:
            number = int(record["round"])
            if record.get("val_accuracy") is not None:
                merged_x.append(number)
                merged_y.append(float(record["val_accuracy"]))
            for client in record.get("clients", []):
                accuracy = client.get("metrics", {}).get("val_accuracy")
                if accuracy is not None:
                    xs, ys = clients.setdefault(str(client["label"]), ([], []))
                    xs.append(number)
                    ys.append(float(accuracy))
        for label, (xs, ys) in sorted(clients.items()):
            ax.plot(xs, ys, marker="o", linewidth=1, alpha=0.7, label=f"client {label} (local prompt)")
        ax.plot(merged_x, merged_y, marker="s", linewidth=2.5, color="black", label="merged prompt")
        ax.set_xlabel("round")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted({*merged_x, *(x for xs, _ in clients.values() for x in xs)}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(self.path.name, fontsize=9)
        fig.tight_layout()
        target = self.path / "accuracy.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        return target

    def plot_prompt_metrics(self, rounds: Sequence[Mapping[str, object]], initial_accuracy: float | None,
                            initial_prompt: str | None = None,
                            initial_metrics: Mapping[str, object] | None = None) -> Path:
        """prompt_metrics.png: merged-prompt length and surprisal variance per round beside
        validation accuracy (one thin line per client's own prompt)."""
        from fedtextgrad_core.tools.compare import plot_prompt_dynamics

        return plot_prompt_dynamics(rounds, self.path / "prompt_metrics.png", initial_accuracy=initial_accuracy,
                                    initial_prompt=initial_prompt, initial_metrics=initial_metrics,
                                    title=self.path.name)
