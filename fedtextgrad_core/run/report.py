"""The per-round progress table printed by the server.

One row per client and one for the merged prompt, so a user watching a long run
sees who improved what, what it cost, and which clients failed and why. Validation
accuracies carry their example counts: a client scores its own prompt on its own
validation share, the merged prompt is scored on every sampled client's share.

A round with more than ``MAX_CLIENT_ROWS`` clients prints three rows instead of one per
client: the minimum, median and maximum of each column over the clients (each column on
its own, so one row need not be one client). At most ``MAX_FAILURE_ROWS`` failures of a
stage are printed, then how many more there were; ``rounds.jsonl`` holds every client and
every failure either way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from fedtextgrad_core.run.messages import TrainReply
from fedtextgrad_core.run.records import RoundRecord

MAX_CLIENT_ROWS = 20  # more uploads in a round than this: min/median/max rows instead of one row per client
MAX_FAILURE_ROWS = 20  # failures printed per stage of a round; the rest are counted (all are in rounds.jsonl)

COLUMNS = (
    ("round", 5), ("who", 22), ("batch acc", 15), ("val acc (n)", 13), ("steps kept", 11),
    ("calls", 6), ("retries", 7), ("tokens", 8), ("secs", 6), ("prompt chars", 12),
)


def secs(seconds: float) -> str:
    """Seconds for the table: tenths, or milliseconds below a tenth (the in-process simulator trains
    a client in a few ms, which tenths would show as 0.0)."""
    return f"{seconds:.1f}" if seconds >= 0.1 or seconds == 0 else f"{seconds:.3f}"


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
        local.llm_calls, local.llm_retries, local.prompt_tokens + local.completion_tokens, secs(seconds),
        len(reply.prompt),
    ])


def failure_row(server_round: int, label: str, reason: str) -> str:
    return _row([server_round, f"client {label}", "FAILED"] + [""] * (len(COLUMNS) - 3)) + f"  {reason}"


def merged_row(server_round: int, method: str, val_accuracy: float | None, examples: int, best: float | None,
               prompt: str, seconds: float) -> str:
    return _row([
        server_round, f"merged ({method})", "", accuracy_of(val_accuracy, examples), f"best {percent(best)}",
        "", "", "", secs(seconds), len(prompt),
    ])


def merged_note(record: RoundRecord, best_rule: str) -> str:
    """After the merged prompt's row: its validation accuracy with the interval, and how it compares with
    the best prompt before it on the same examples (what decided under best-rule = paired)."""
    note = f"  val {record.val_interval.shown()}" if record.val_interval is not None else ""
    comparison = record.best_comparison
    if comparison is not None and comparison.n:
        decided = " (decides: best-rule paired)" if best_rule == "paired" else ""
        note += f"; against the best before: {comparison.verdict}, {100 * comparison.difference:+.1f} points " \
                f"[{100 * comparison.low:+.1f}, {100 * comparison.high:+.1f}], p = {comparison.p_value:.3g}{decided}"
    return note


def client_rows(server_round: int, uploads: Sequence[tuple[str, TrainReply]], clients: int | None = None) -> list[str]:
    """The round's rows for its uploads: one per client, or the min/median/max rows when the round
    asked more than MAX_CLIENT_ROWS ``clients`` (those that failed included; default: the uploads)."""
    if max(clients or 0, len(uploads)) <= MAX_CLIENT_ROWS:
        return [client_row(server_round, label, reply) for label, reply in uploads]
    return summary_rows(server_round, [reply for _, reply in uploads])


def _seconds(reply: TrainReply) -> float:
    return reply.local.seconds + (reply.val.seconds if reply.val is not None else 0.0)


def summary_rows(server_round: int, replies: Sequence[TrainReply]) -> list[str]:
    """Three rows: the minimum, median and maximum over the clients, column by column."""
    count = len(replies)

    def stat(pick: Callable[[TrainReply], float | None], which: Callable[[list[float]], float]) -> float | None:
        values = [v for v in (pick(r) for r in replies) if v is not None]
        return which(values) if values else None

    rows = []
    for name, which in (("min", min), ("median", statistics.median), ("max", max)):
        before = stat(lambda r: r.local.batch_accuracy_before, which)
        after = stat(lambda r: r.local.batch_accuracy_after, which)
        val = stat(lambda r: r.val.accuracy if r.val is not None else None, which)
        kept = stat(lambda r: r.local.steps_accepted, which)
        steps = stat(lambda r: r.local.steps, which)
        calls = stat(lambda r: r.local.llm_calls, which)
        retries = stat(lambda r: r.local.llm_retries, which)
        tokens = stat(lambda r: r.local.prompt_tokens + r.local.completion_tokens, which)
        seconds = stat(_seconds, which)
        chars = stat(lambda r: len(r.prompt), which)
        rows.append(_row([
            server_round, f"{count} clients: {name}", f"{percent(before)}>{percent(after)}", percent(val),
            f"{_number(kept)}/{_number(steps)}", _number(calls), _number(retries), _number(tokens),
            "-" if seconds is None else secs(seconds), _number(chars),
        ]))
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def failure_rows(server_round: int, failures: Sequence[tuple[str, str]]) -> list[str]:
    """A FAILED row per (label, reason), at most MAX_FAILURE_ROWS, then how many more there were."""
    rows = [failure_row(server_round, label, reason) for label, reason in failures[:MAX_FAILURE_ROWS]]
    more = len(failures) - MAX_FAILURE_ROWS
    if more > 0:
        rows.append(_row([server_round, f"and {more} more", "FAILED"] + [""] * (len(COLUMNS) - 3))
                    + "  all in rounds.jsonl (summary.json for the test)")
    return rows
