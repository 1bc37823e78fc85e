"""The per-round progress table printed by the server.

One row per client and one for the merged prompt, so a user watching a long run
sees who improved what, what it cost, and which clients failed and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

COLUMNS = (
    ("round", 5), ("who", 22), ("batch acc", 15), ("val acc", 7), ("steps kept", 11),
    ("calls", 6), ("retries", 7), ("tokens", 8), ("secs", 6), ("prompt chars", 12),
)


def percent(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _row(cells: Sequence[str]) -> str:
    return "  ".join(str(cell)[:width].ljust(width) for cell, (_, width) in zip(cells, COLUMNS)).rstrip()


def header() -> str:
    line = _row([name for name, _ in COLUMNS])
    return f"{line}\n{'-' * len(line)}"


def client_row(server_round: int, label: str, metrics: Mapping[str, float], prompt: str) -> str:
    before, after = metrics.get("batch_accuracy_before"), metrics.get("batch_accuracy_after")
    tokens = int(metrics.get("prompt_tokens", 0) + metrics.get("completion_tokens", 0))
    return _row([
        server_round, f"client {label}", f"{percent(before)}>{percent(after)}", percent(metrics.get("val_accuracy")),
        f"{int(metrics.get('steps_accepted', 0))}/{int(metrics.get('steps', 0))}",
        int(metrics.get("llm_calls", 0)), int(metrics.get("llm_retries", 0)), tokens, f"{metrics.get('seconds', 0):.1f}", len(prompt),
    ])


def failure_row(server_round: int, label: str, reason: str) -> str:
    return _row([server_round, f"client {label}", "FAILED"] + [""] * (len(COLUMNS) - 3)) + f"  {reason}"


def merged_row(server_round: int, method: str, val_accuracy: float | None, best: float | None,
               prompt: str, seconds: float) -> str:
    return _row([
        server_round, f"merged ({method})", "", percent(val_accuracy), f"best {percent(best)}",
        "", "", "", f"{seconds:.1f}", len(prompt),
    ])
