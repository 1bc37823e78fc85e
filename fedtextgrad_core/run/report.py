"""The per-round progress table printed by the server.

One row per client and one for the merged prompt, so a user watching a long run
sees who improved what, what it cost, and which clients failed and why. Validation
accuracies carry their example counts: a client scores its own prompt on its own
validation share, the merged prompt is scored on every sampled client's share.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtextgrad_core.run.messages import TrainReply

COLUMNS = (
    ("round", 5), ("who", 22), ("batch acc", 15), ("val acc (n)", 13), ("steps kept", 11),
    ("calls", 6), ("retries", 7), ("tokens", 8), ("secs", 6), ("prompt chars", 12),
)


def percent(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"  # type: ignore[arg-type]


def _row(cells: Sequence[object]) -> str:
    return "  ".join(str(cell)[:width].ljust(width) for cell, (_, width) in zip(cells, COLUMNS)).rstrip()


def header() -> str:
    line = _row([name for name, _ in COLUMNS])
    return f"{line}\n{'-' * len(line)}"


def accuracy_of(accuracy: float | None, examples: int) -> str:
    return "-" if accuracy is None else f"{percent(accuracy)} ({examples})"


def client_row(server_round: int, label: str, reply: TrainReply) -> str:
    local = reply.local
    val = reply.val
    seconds = local.seconds + (val.seconds if val is not None else 0.0)
    return _row([
        server_round, f"client {label}",
        f"{percent(local.batch_accuracy_before)}>{percent(local.batch_accuracy_after)}",
        accuracy_of(val.accuracy, val.total) if val is not None else "-",
        f"{local.steps_accepted}/{local.steps}",
        local.llm_calls, local.llm_retries, local.prompt_tokens + local.completion_tokens, f"{seconds:.1f}",
        len(reply.prompt),
    ])


def failure_row(server_round: int, label: str, reason: str) -> str:
    return _row([server_round, f"client {label}", "FAILED"] + [""] * (len(COLUMNS) - 3)) + f"  {reason}"


def merged_row(server_round: int, method: str, val_accuracy: float | None, examples: int, best: float | None,
               prompt: str, seconds: float) -> str:
    return _row([
        server_round, f"merged ({method})", "", accuracy_of(val_accuracy, examples), f"best {percent(best)}",
        "", "", "", f"{seconds:.1f}", len(prompt),
    ])
