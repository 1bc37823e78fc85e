"""A copy of this Flower app whose ClientApp misbehaves on purpose, for the hostile-participant tests.

A participant that wants something runs its own code: here, the app copied to a folder with its
``client_app/client_app.py`` extended by a wrapper that, for the partitions an attack plan names,
replaces what the honest client answered (its upload, its scores, its error line, its model name)
or makes its optimizer copy a training question into the prompt before the site's leakage guard
looks at it. Everything else, the server included, is this project's own code, run by a real
``flwr run`` (or a real deployment) from that folder.

The plan (``attacks.json`` beside the wrapper): ``{partition: {phase: {round: change}}}``, where a
change is ``{"prompt": text}``, ``{"scores": {...}, "usage": {...}}``, ``{"error": text}``,
``{"llm": text}`` or ``{"leak": "look-alike" | "zero-width"}`` (phase ``train`` only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests import ROOT

APP_PARTS = ("pyproject.toml", "README.md", "fedtextgrad_core", "server_app", "client_app")

WRAPPER = '''

# --- added by tests/support/hostile_app.py: a participant running its own code -----------------------
import contextvars as _contextvars
import json as _json
import pathlib as _pathlib

from fedtextgrad_core.run import client_round as _client_round
from fedtextgrad_core.run.messages import RoundRequest as _RoundRequest
from fedtextgrad_core.run.messages import request_keys as _request_keys

_PLAN = _json.loads(_pathlib.Path(__file__).with_name("attacks.json").read_text())
_LOOK_ALIKE = str.maketrans({"o": "\\u043e", "e": "\\u0435", "a": "\\u0430", "c": "\\u0441", "p": "\\u0440"})
_leak = _contextvars.ContextVar("leak", default="")
_train_prompt = _client_round.train_prompt


def _leaky_train_prompt(prompt, task, train, *args, **kwargs):
    result = _train_prompt(prompt, task, train, *args, **kwargs)
    how = _leak.get()
    if not how:
        return result
    question = train[0].question
    copied = question.translate(_LOOK_ALIKE) if how == "look-alike" else "\\u200b".join(question)
    return type(result)(prompt=f"{result.prompt} For example: {copied}", metrics=result.metrics)


_client_round.train_prompt = _leaky_train_prompt
_honest_reply = reply


def reply(msg, context, pinned):
    plan = _PLAN.get(str(context.node_config.get("partition-id")), {})
    requests = [_RoundRequest.decode(msg.content[key]) for key in _request_keys(msg.content)]
    changes = [plan.get(r.phase, {}).get(str(r.server_round)) for r in requests]
    leak = next((c["leak"] for c in changes if c and "leak" in c), "")
    token = _leak.set(leak)
    try:
        out = _honest_reply(msg, context, pinned)
    finally:
        _leak.reset(token)
    for position, change in enumerate(changes):
        key = "reply" if position == 0 else f"reply-{position}"
        if not change or "leak" in change:
            continue
        record = out.content[key]
        if "error" in change:
            for field in list(record.keys()):
                del record[field]
            record["error"] = change["error"]
            continue
        for name, value in change.items():
            if isinstance(value, dict):
                for part, number in value.items():
                    record[f"{name}.{part}"] = number
            else:
                record[name] = value
    return out
'''


def hostile_app(folder: Path, plan: dict[str, Any]) -> Path:
    """This app copied into ``folder``, its ClientApp following ``plan`` (the module doc); the app folder."""
    app = folder / "app"
    for part in APP_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            app.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, app / part)
    (app / "client_app" / "attacks.json").write_text(json.dumps(plan), encoding="utf-8")
    client = app / "client_app" / "client_app.py"
    client.write_text(client.read_text(encoding="utf-8") + WRAPPER, encoding="utf-8")
    return app
