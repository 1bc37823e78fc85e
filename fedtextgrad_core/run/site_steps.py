"""Each local step with its feedback text, kept where the client runs: in Flower's simulation only.

A local step's feedback quotes the client's training examples, so it never travels to the server;
the server records only counts (``LocalMetrics``: steps kept, reverted, malformed). In a simulation
every client is the run submitter's own, on the submitter's machine, so a simulated client writes its
steps into the run folder itself: ``clients/<partition>/steps.jsonl``, one JSON line per step
(``LocalStep`` with the round), which the run report (``html_report.py``) shows. A deployed site never
writes one (its feedback stays in its own process).

The client does not know which folder the server opened (a default name holds the start time, an
existing name gets a number), and the messages carry no such thing. So the server's recorder leaves a
pointer in a folder of this user's own under the system's temporary folder, named by a hash of the run
config, and a simulated client with the same run config follows it, if the folder's ``config.json``
holds that run config. Whatever goes wrong here is logged and skipped: a step log never costs a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedtextgrad_core.method.local_training import LocalStep
from fedtextgrad_core.run.codec import MalformedRecord, from_plain, to_plain

log = logging.getLogger(__name__)

CLIENTS_FOLDER = "clients"
STEPS_FILE = "steps.jsonl"


def _uid() -> int:
    getuid = getattr(os, "getuid", None)
    return int(getuid()) if getuid is not None else 0


def pointer_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"fedtextgrad-{_uid()}" / "simulated-runs"


def _plain_config(run_config: Mapping[str, object]) -> str:
    return json.dumps(dict(run_config), sort_keys=True, default=str)


def _pointer(run_config: Mapping[str, object]) -> Path:
    return pointer_folder() / (hashlib.sha256(_plain_config(run_config).encode()).hexdigest()[:32] + ".json")


def announce(run_config: Mapping[str, object], folder: Path) -> None:
    """The server: say which folder the run with ``run_config`` writes to (for simulated clients)."""
    try:
        where = pointer_folder()
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        pointer = _pointer(run_config)
        tmp = pointer.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"folder": str(Path(folder).resolve())}), encoding="utf-8")
        os.replace(tmp, pointer)
    except OSError as exc:
        log.info("no pointer for simulated clients' step logs: %s", exc)


def run_folder_for(run_config: Mapping[str, object]) -> Path | None:
    """The folder of the run with ``run_config``, as announced; None when unknown. The pointer counts
    only in a folder of this user's that no one else may write to, and only when the folder's
    ``config.json`` holds this run config."""
    try:
        where = pointer_folder()
        info = where.stat()
        if info.st_uid != _uid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        folder = Path(json.loads(_pointer(run_config).read_text(encoding="utf-8"))["folder"])
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    recorded = config.get("run_config") if isinstance(config, dict) else None
    if not isinstance(recorded, dict) or _plain_config(recorded) != _plain_config(run_config):
        return None
    return folder


def record(run_config: Mapping[str, object], partition_id: int, server_round: int, steps: Iterable[LocalStep]) -> None:
    """A simulated client: append its steps of ``server_round`` to the run folder's step log."""
    folder = run_folder_for(run_config)
    if folder is None:
        return
    try:
        path = folder / CLIENTS_FOLDER / str(int(partition_id)) / STEPS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"round": server_round, **to_plain(step)}) + "\n" for step in steps))
    except OSError as exc:
        log.warning("could not write the step log in %s: %s", folder, exc)


def read_steps(folder: Path) -> dict[tuple[int, int], list[LocalStep]]:
    """(partition, round) -> that client's steps in that round, from ``clients/*/steps.jsonl``. A round
    written twice (run again after a resume) counts as last written; unreadable lines are skipped."""
    found: dict[tuple[int, int], list[LocalStep]] = {}
    clients = Path(folder) / CLIENTS_FOLDER
    if not clients.is_dir():
        return found
    for path in sorted(clients.glob(f"*/{STEPS_FILE}")):
        if not path.parent.name.isdigit():
            continue
        partition = int(path.parent.name)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                plain: Any = json.loads(line)
                server_round = int(plain.pop("round"))
                step = from_plain(LocalStep, plain)
            except (ValueError, TypeError, KeyError, AttributeError, MalformedRecord):
                continue
            key = (partition, server_round)
            if step.step == 1 or key not in found:
                found[key] = []
            found[key].append(step)
    return found
