"""An optional on-disk cache of LLM replies, so re-running an evaluation costs nothing.

Keyed by everything that determines a reply: endpoint, model, messages and sampling
settings. SQLite makes it safe for the several threads and processes of a
simulation to share one file. Off unless ``llm-cache-path`` is set.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from fedtextgrad_core.errors import ConfigError


def cache_key(backend: str, base_url: str, model: str, temperature: float, max_tokens: int,
              messages: list[dict[str, str]]) -> str:
    material = json.dumps([backend, base_url, model, temperature, max_tokens, messages],
                          sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT, "
                "prompt_tokens INTEGER, completion_tokens INTEGER)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("llm-cache-path", str(path), f"a writable SQLite file path ({exc})") from exc
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[str, int, int] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,)
            ).fetchone()
        return (row[0], int(row[1]), int(row[2])) if row else None

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (key, text, prompt_tokens, completion_tokens))
            self._db.commit()


_open: dict[Path, ResponseCache] = {}
_open_lock = threading.Lock()


def open_cache(path: str) -> ResponseCache:
    """One cache object per file per process, shared by every engine that names it."""
    resolved = Path(path).expanduser().resolve()
    with _open_lock:
        if resolved not in _open:
            _open[resolved] = ResponseCache(resolved)
        return _open[resolved]
