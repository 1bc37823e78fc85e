"""Which code a process runs: a short fingerprint of this project's Python sources, and where they are.

A local SuperLink started in one folder keeps serving the app code of that folder, and a site may
run another version than the server. Clients report their fingerprint with every reply and the
server warns, once per client, when it differs from its own, so a run never mixes versions unseen.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

PACKAGES = ("fedtextgrad_core", "server_app", "client_app")


@cache
def code_fingerprint() -> str:
    """12 hex digits over every .py file of the project's packages (path and content)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_location() -> str:
    return str(Path(__file__).resolve().parent.parent)
