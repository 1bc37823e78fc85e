"""The run folder's files: config, one JSON line per round, the prompts, the summary.

Everything is written as soon as it is known (rounds appended, flushed and synced; the
summary and prompts replaced atomically), so a run that dies mid-way leaves what it
finished. Reading goes through the typed records, which also read older folders.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.records import RoundRecord, RunSummary

MAX_NAME_BYTES = 200  # a run folder's name; file systems allow 255 bytes, and numbers may be added
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def default_run_name(task_label: str, partitioning: str, merge: str) -> str:
    return f"{task_label}-{partitioning}-{merge}-{time.strftime('%Y%m%d-%H%M%S')}"


def _safe(name: str) -> str:
    """A file name made of letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("._")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_round_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of each line of ``rounds.jsonl``. A last line cut short while being
    written is skipped; any other line that is not a JSON object is refused, naming its line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: cut short while being written
                break
            raise MalformedRecord(f"{path.name} line {number} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise MalformedRecord(f"{path.name} line {number} holds a JSON {type(value).__name__}, not a round record")
        found.append((number, value))
    return found


class RunFolder:
    """One run's folder under ``results_dir``."""

    def __init__(self, path: Path):
        self.path = path
        self.rounds_file = path / ROUNDS_FILE
        self.prompts = path / "prompts"

    @classmethod
    def create(cls, results_dir: str | Path, run_name: str, config: Mapping[str, object]) -> RunFolder:
        """A new folder; an existing run's name gets a number instead of being overwritten. A place
        where no folder can be made or written (read-only, a file, a name too long) is a setting
        refused at start, naming results-dir and the reason."""
        name = _safe(run_name) or "run"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ConfigError("run-name", run_name, f"a name of at most {MAX_NAME_BYTES} bytes (a file name)")
        try:
            base = Path(results_dir).expanduser().resolve()
            path, number = base / name, 1
            while (path / ROUNDS_FILE).exists():
                number += 1
                path = base / f"{name}-{number}"
            path.mkdir(parents=True, exist_ok=True)
            folder = cls(path)
            folder.prompts.mkdir(exist_ok=True)
            folder.rounds_file.write_text("", encoding="utf-8")
            atomic_write(path / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
        except (OSError, RuntimeError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError("results-dir", str(results_dir),
                              f"a folder this process can create and write in ({reason})") from None
        return folder

    @classmethod
    def reopen(cls, path: Path, finished_rounds: int) -> RunFolder:
        """The folder of an interrupted run, to continue writing in. Round records after
        ``finished_rounds`` (a round cut short between its record and its checkpoint) and a
        half-written last line are dropped, so the resumed rounds are written exactly once."""
        folder = cls(path)
        folder.prompts.mkdir(exist_ok=True)
        kept = [line for _, line in read_round_lines(folder.rounds_file) if int(line.get("round", 0)) <= finished_rounds]
        atomic_write(folder.rounds_file, "".join(json.dumps(line, default=str) + "\n" for line in kept))
        return folder

    def save_prompt(self, name: str, text: str) -> str:
        """Write a prompt to prompts/<name>.txt and return its path relative to the run."""
        relative = Path("prompts") / (_safe(name) + ".txt")
        atomic_write(self.path / relative, text + "\n")
        return str(relative)

    def save_client_prompts(self, server_round: int, entries: Sequence[Mapping[str, object]]) -> str:
        """Every client upload of a round in one file, one JSON line each (a file per client
        would be thousands of files in a large federation)."""
        relative = Path("prompts") / f"round-{server_round:03d}-clients.jsonl"
        atomic_write(self.path / relative, "".join(json.dumps(entry) + "\n" for entry in entries))
        return str(relative)

    def append_round(self, record: RoundRecord) -> None:
        with self.rounds_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_json(), default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_rounds(self) -> list[RoundRecord]:
        records = []
        for number, line in read_round_lines(self.rounds_file):
            try:
                records.append(RoundRecord.from_json(line))
            except (MalformedRecord, KeyError, TypeError, ValueError) as exc:
                raise MalformedRecord(f"{ROUNDS_FILE} line {number} is not a round record: {exc}") from None
        return records

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write(self.path / SUMMARY_FILE, json.dumps(summary.to_json(), indent=2, default=str) + "\n")

    def read_summary(self) -> RunSummary:
        return RunSummary.from_json(json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8")))
