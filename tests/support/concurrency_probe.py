"""A chat function that measures how many calls overlap, for concurrency tests."""

from __future__ import annotations

import threading
import time


class InFlightProbe:
    """Counts calls in flight and remembers the peak.

    Early calls are held until ``target`` are in flight at once (giving up after 2 s),
    so overlap is observed, not inferred from timing; a short pause afterwards leaves
    room for an extra call to sneak in if a limit leaked.
    """

    def __init__(self, target: int, reply: str = "ok"):
        self.target, self.reply = target, reply
        self.in_flight = self.peak = 0
        self.gave_up = False
        self._condition = threading.Condition()

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        with self._condition:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self._condition.notify_all()
            if not self._condition.wait_for(lambda: self.gave_up or self.peak >= self.target, timeout=2):
                self.gave_up = True
        time.sleep(0.005)
        with self._condition:
            self.in_flight -= 1
        return self.reply, 1, 1
