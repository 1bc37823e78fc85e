"""A benchmark's background sampler: ``sample()`` on its own thread every ``interval`` seconds."""

from __future__ import annotations

import threading


class Periodic:
    """Run as a thread's target; ``stop()`` ends it after one last sample, so the end is measured too."""

    interval: float
    _stop: threading.Event

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        raise NotImplementedError
