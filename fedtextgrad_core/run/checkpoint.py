"""The server's state after each finished round, so a killed run can continue where it stopped.

A federated run lasts hours and crosses organisations; a server crash must cost at most
the round in progress. After the initial evaluation and after every round the server
writes ``checkpoint.json`` (atomically) into the run folder: the global and best prompts,
the scores, the last finished round and the state of the random generator that samples
clients. ``resume-from`` reads it back; the rounds already in ``rounds.jsonl`` are kept
and never redone. Resuming is refused when a setting that shapes the results differs,
since the continued run would no longer be the same run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run import schema

CHECKPOINT_FILE = "checkpoint.json"

# Settings a resumed run may change: where things are, how patiently servers are
# asked, and how long the run goes on. Everything else must match the saved run.
MAY_CHANGE = frozenset({
    "resume-from", "run-name", "results-dir", "num-server-rounds",
    "llm-base-url", "backward-base-url", "server-base-url",
    "llm-api-key-env", "backward-api-key-env", "server-api-key-env",
    "llm-timeout", "llm-concurrency", "llm-max-retries", "llm-retry-backoff", "llm-cache-path",
    "sim-latency-ms", "debug", "tracker", "tracking-uri", "tracking-experiment", "tracking-parent-run",
})


@dataclass
class Checkpoint:
    """Everything the server needs to continue after ``round``."""

    round: int  # the last finished round; 0 = the initial evaluation is done
    global_prompt: str
    best_prompt: str
    best_accuracy: float | None
    best_round: int
    initial_accuracy: float | None
    rng_state: list[Any]  # random.Random.getstate(), as JSON lists
    run_config: dict[str, object] = field(default_factory=dict)
    resumed_after: list[int] = field(default_factory=list)  # rounds after which earlier resumes happened
    initial_usage: dict[str, float] = field(default_factory=dict)  # what the start prompt's evaluation cost
    secret: str = ""  # the server's own (FederationState.secret); empty in checkpoints written before it
    best_outcomes: dict[str, bool] = field(default_factory=dict)  # the best prompt's validation outcomes
    version: int = 1  # 1: written before the settings table (its run config is migrated when compared)

    def random(self) -> random.Random:
        """A generator in exactly the saved state."""
        version, internal, gauss = self.rng_state
        generator = random.Random()
        generator.setstate((version, tuple(internal), gauss))
        return generator


def rng_state(generator: random.Random) -> list[Any]:
    version, internal, gauss = generator.getstate()
    return [version, list(internal), gauss]


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    target = folder / CHECKPOINT_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(checkpoint)) + "\n", encoding="utf-8")
    tmp.replace(target)


def resume_folder(value: str) -> Path:
    """The run folder named by ``resume-from``, checked to hold an unfinished run."""
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError("resume-from", value, f"the results folder of an earlier run; {folder} is not a folder")
    if not (folder / CHECKPOINT_FILE).exists():
        raise ConfigError("resume-from", value,
                          f"a run folder with {CHECKPOINT_FILE}; {folder} has none (not a run folder, or the run "
                          "stopped before its initial evaluation finished: start it again instead)")
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if summary.get("finished") is True:
        raise ConfigError("resume-from", value, f"an unfinished run; the run in {folder} finished, there is nothing to resume")
    return folder


def load_checkpoint(folder: Path) -> Checkpoint:
    path = folder / CHECKPOINT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        checkpoint = Checkpoint(**data)
        checkpoint.random()  # the generator state must be usable, not only present
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("resume-from", str(folder),
                          f"a readable {CHECKPOINT_FILE}; {path} is damaged ({type(exc).__name__}: {exc})") from None
    return checkpoint


CHECKPOINT_VERSION = 2


def migrate_config(config: Mapping[str, object], version: int) -> dict[str, object]:
    """A saved run config in today's keys. Version 1 had ``proximal`` (true: keep a rewrite unless the
    batch scored worse, i.e. keep-rule 'not-worse'; false: 'always'); keys that no longer exist go."""
    migrated = dict(config)
    if version < 2 and "proximal" in migrated:
        migrated["keep-rule"] = "not-worse" if migrated.pop("proximal") is True else "always"
    return {key: value for key, value in migrated.items() if key in schema.BY_KEY}


def check_same_run(saved: Mapping[str, object], now: Mapping[str, object], folder: Path, version: int = 2) -> None:
    """Refuse to continue a run under settings that would make it another run. Settings are compared by
    their value in effect (a key left out means its default), after migrating an older checkpoint."""
    saved = migrate_config(saved, version)

    def value(config: Mapping[str, object], key: str) -> object:
        try:
            return schema.BY_KEY[key].read(config)
        except ConfigError:
            return config.get(key)

    differ = sorted(key for key in set(saved) | set(now)
                    if key in schema.BY_KEY and key not in MAY_CHANGE and value(saved, key) != value(now, key))
    if differ:
        listed = ", ".join(f"{key} (saved {value(saved, key)!r}, now {value(now, key)!r})" for key in differ)
        raise ConfigError("resume-from", str(folder),
                          f"the same settings as the saved run, apart from {', '.join(sorted(MAY_CHANGE - {'resume-from'}))}; "
                          f"these differ: {listed}")


def checkpoint_to_resume(resume_from: str, run_config: Mapping[str, object]) -> tuple[Path, Checkpoint] | None:
    """(run folder, checkpoint) named by ``resume-from``, checked; None for a new run."""
    if not resume_from:
        return None
    folder = resume_folder(resume_from)
    checkpoint = load_checkpoint(folder)
    check_same_run(checkpoint.run_config, run_config, folder, checkpoint.version)
    return folder, checkpoint
