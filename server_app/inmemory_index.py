"""A per-node index of pending messages for Flower 1.42's in-memory link state (simulation only).

Why: Flower's ``InMemoryLinkState.get_message_ins`` walks every stored message to find one
node's, and the simulation asks it for every node every 0.1 s, so a pass grows as nodes x
messages in flight. This module indexes the one link-state object of a simulation by
destination node and returns what Flower's method returns. It patches only that object's
attributes, only on the exact Flower version it was written against;
``FEDTEXTGRAD_FLOWER_INDEX=0`` turns it off. Details: docs/architecture.md, docs/performance.md.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

from flwr.supercore.date import now

FLOWER_VERSION = "1.42.0"
ENV_SWITCH = "FEDTEXTGRAD_FLOWER_INDEX"
_INSTALLED = "_fedtextgrad_pending_index"


def _flower_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # a Flower without package metadata: do not guess
        return ""


class PendingIndex:
    """Undelivered message ids per destination node, in the order they were stored."""

    def __init__(self, state: Any):
        self.state = state
        self.pending: dict[int, deque[str]] = {}
        self._guard = threading.Lock()  # the index's own lock: never held while Flower's is taken
        self._store_message_ins = state.store_message_ins  # Flower's bound methods
        self._get_message_ins = state.get_message_ins

    def store_message_ins(self, message: Any) -> str | None:
        message_id: str | None = self._store_message_ins(message)
        if message_id:
            node_id = message.metadata.dst_node_id
            with self._guard:
                self.pending.setdefault(node_id, deque()).append(message_id)
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Any]:
        """Flower's ``get_message_ins`` over this node's own messages only."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        if not self.pending.get(node_id):  # the common case, asked 10,000 times a pass: no lock needed to see it
            return []
        with self._guard:
            queue = self.pending.get(node_id)
            if not queue:
                return []
            candidates = list(queue)
        state = self.state
        found: list[Any] = []
        gone: set[str] = set()
        with state.lock:
            for message_id in candidates:
                state._check_stored_messages({message_id})  # expiry and federation, as Flower checks
                message = state.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    gone.add(message_id)
                    continue
                if message.metadata.dst_node_id != node_id:  # cannot happen; never hand out another's
                    gone.add(message_id)
                    continue
                if run_id is not None and message.metadata.run_id != run_id:
                    continue  # another run's message stays pending for that run
                found.append(message)
                gone.add(message_id)
                if limit and len(found) == limit:
                    break
        if gone:
            with self._guard:
                queue = self.pending.get(node_id)
                if queue is not None:
                    kept = deque(m for m in queue if m not in gone)
                    if kept:
                        self.pending[node_id] = kept
                    else:
                        del self.pending[node_id]
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found


def install(state: Any) -> bool:
    """Give ``state`` (the simulation's link state) the per-node index; False when left as it was."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    if getattr(state, _INSTALLED, None) is not None:
        return True
    if type(state).__name__ != "InMemoryLinkState" or _flower_version() != FLOWER_VERSION:
        return False
    if not all(hasattr(state, name) for name in ("lock", "message_ins_store", "_check_stored_messages",
                                                 "store_message_ins", "get_message_ins")):
        return False
    index = PendingIndex(state)
    with state.lock:
        for message_id, message in state.message_ins_store.items():  # anything stored before (normally none)
            if message.metadata.delivered_at == "":
                index.pending.setdefault(message.metadata.dst_node_id, deque()).append(message_id)
        state.store_message_ins = index.store_message_ins
        state.get_message_ins = index.get_message_ins
        setattr(state, _INSTALLED, index)
    return True
