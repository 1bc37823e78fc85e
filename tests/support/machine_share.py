"""Who may use the machine at the same time, across pytest-xdist workers.

Under the README's `pytest -n 4`, four test modules run at once. That suits modules that mostly
wait (Flower starting Ray, SuperNodes polling); it does not suit a real vLLM on CPU, which takes
both cores and ~2 GB for minutes: beside it, Ray's start-up and Flower's local SuperLink (15 s to
come up) time out. A module marked ``alone`` holds the machine's lock exclusively; every other
integration module holds it shared. A module waiting for ``alone`` raises a flag first, so no new
shared holder starts and the exclusive wait ends once the running modules finish.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WAIT_LIMIT = 45 * 60  # the longest integration module takes ~10 min on this machine; a deadline, not a hang
POLL = 0.5


def lock_folder(base_temp: Path) -> Path:
    """The folder every worker of this pytest session sees: pytest-N/ above each popen-gwK/."""
    return base_temp.parent if os.environ.get("PYTEST_XDIST_WORKER") else base_temp


def _wait(what: str, started: float) -> None:
    if time.monotonic() - started > WAIT_LIMIT:
        raise TimeoutError(f"waited {WAIT_LIMIT} s for {what}; another test module holds the machine")
    time.sleep(POLL)


@contextmanager
def machine(folder: Path, alone: bool) -> Iterator[None]:
    """Hold the machine shared, or ``alone``, for the block."""
    lock_path, flag = folder / "machine.lock", folder / "machine.alone-wanted"
    started = time.monotonic()
    with open(lock_path, "a+") as handle:
        if alone:
            flag.touch()
        else:
            while flag.exists():
                _wait("a module that runs alone", started)
        mode = (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(handle, mode)
                break
            except BlockingIOError:
                _wait("the machine", started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            if alone:
                flag.unlink(missing_ok=True)
