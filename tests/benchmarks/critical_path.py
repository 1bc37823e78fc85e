"""The ideal wall time of a federation, rebuilt from the LLM calls that actually happened.

With a fixed latency per LLM call and everything else free, a run lasts as long as its
longest chain of calls that must happen one after another. The chain follows the
run's structure:

- the server sends a message to every client and waits for all replies (a *window*);
  clients work at the same time, so a window lasts as long as its slowest client;
- in an evaluation window a client answers its examples ``concurrency`` at a time;
- in a training window a client runs local steps. Each step answers a batch (one
  dependent group of ``batch_size`` answers, ``concurrency`` at a time), TextGrad's
  backward pass asks for feedback one call after another, the optimizer asks for one
  rewrite, and a kept rewrite is re-scored on the batch (another dependent group).
  Then the client scores its new prompt on its validation split;
- between windows the server merges: its summariser calls come one after another.

Only the counts matter for the ideal: a window's chain for one client is
``groups x ceil(batch/concurrency) + feedback + rewrites + ceil(val/concurrency)``
waves. The sequential baseline (every call one after another) ideally lasts
``calls x latency``. Measured times are compared against these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVER = "server"  # the source name of the ServerApp's own LLM endpoint


@dataclass(frozen=True)
class Call:
    """One LLM call as the serving endpoint saw it (wall-clock seconds)."""

    source: str  # which endpoint served it: a client's label or SERVER
    kind: str  # answer | feedback | rewrite | merge | other
    start: float
    end: float


@dataclass(frozen=True)
class Window:
    """One send-and-wait of the server: a message to every client, until all replied."""

    label: str  # e.g. "round 1 train"
    kind: str  # "train" or "evaluate"
    start: float
    end: float


@dataclass(frozen=True)
class Structure:
    """What the ideal needs besides the calls: how many calls may overlap, and split sizes."""

    latency: float  # seconds per LLM call
    concurrency: int  # requests in flight per client endpoint
    batch_size: int  # answers per local-step batch (min of batch-size and the client's train size)
    val_sizes: Mapping[str, int]  # client label -> validation examples it scores after training (0: none)


@dataclass
class Phase:
    """One stretch of the run: a window, or the server's work between two windows."""

    label: str
    measured: float
    ideal: float
    calls: int
    waves: dict[str, int] = field(default_factory=dict)  # per client (or the server): calls in sequence
    window: bool = False  # clients at work; otherwise the server's own work

    def as_dict(self) -> dict[str, object]:
        return {"label": self.label, "measured_s": self.measured, "ideal_s": self.ideal,
                "calls": self.calls, "waves": self.waves, "window": self.window}


class StructureError(ValueError):
    """The calls do not fit the run structure the ideal assumes (so the ideal would be wrong)."""


def read_call_log(path: Path, source: str) -> list[Call]:
    """The calls of one ``fedtextgrad sim-server --call-log`` file; a failed call is an error."""
    calls = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry.get("status") != 200:
            raise StructureError(f"{path}:{number}: a call failed with HTTP {entry.get('status')}; "
                                 "the benchmark needs a run without failures")
        calls.append(Call(source, entry["kind"], float(entry["start"]), float(entry["end"])))
    return calls


def _waves(n: int, width: int) -> int:
    return math.ceil(n / width) if n else 0


def client_waves(kinds: Sequence[str], window_kind: str, structure: Structure, client: str) -> int:
    """Calls in sequence one client needs for its part of one window (see the module docstring)."""
    counts = {kind: 0 for kind in ("answer", "feedback", "rewrite", "merge", "other")}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    strays = {k: n for k, n in counts.items() if k not in ("answer", "feedback", "rewrite") and n}
    if strays:
        raise StructureError(f"client {client}: unexpected calls {strays} in a {window_kind} window")
    width = structure.concurrency
    if window_kind == "evaluate":
        if counts["feedback"] or counts["rewrite"]:
            raise StructureError(f"client {client}: TextGrad calls in an evaluation window")
        return _waves(counts["answer"], width)
    val = structure.val_sizes.get(client, 0)
    batch_answers = counts["answer"] - val
    if batch_answers < 0 or batch_answers % structure.batch_size:
        raise StructureError(
            f"client {client}: {counts['answer']} answers in a training window do not split into "
            f"batches of {structure.batch_size} plus {val} validation answers")
    groups = batch_answers // structure.batch_size
    return (groups * _waves(structure.batch_size, width) + counts["feedback"] + counts["rewrite"]
            + _waves(val, width))


def _within(calls: Iterable[Call], start: float, end: float) -> list[Call]:
    return [c for c in calls if start <= c.start < end]


def phases(calls: Sequence[Call], windows: Sequence[Window], structure: Structure,
           run_start: float, run_end: float) -> list[Phase]:
    """The run cut into windows and the gaps between them, each with measured and ideal time.

    A call belongs to the stretch in which it started. Client calls outside every
    window, or server calls inside one, break the assumed structure and raise.
    """
    ordered = sorted(windows, key=lambda w: w.start)
    result: list[Phase] = []
    edges = [run_start] + [t for w in ordered for t in (w.start, w.end)] + [run_end]
    for index in range(len(edges) - 1):
        start, end = edges[index], edges[index + 1]
        inside = _within(calls, start, end)
        if index % 2 == 1:  # a window
            window = ordered[index // 2]
            if any(c.source == SERVER for c in inside):
                raise StructureError(f"{window.label}: the server's endpoint was called while clients worked")
            by_client: dict[str, list[str]] = {}
            for call in inside:
                by_client.setdefault(call.source, []).append(call.kind)
            waves = {client: client_waves(kinds, window.kind, structure, client)
                     for client, kinds in sorted(by_client.items())}
            ideal = max(waves.values(), default=0) * structure.latency
            result.append(Phase(window.label, end - start, ideal, len(inside), waves, window=True))
        else:  # the server's own work before, between or after windows
            strays = sorted({c.source for c in inside if c.source != SERVER})
            if strays:
                raise StructureError(f"calls from {', '.join(strays)} outside any server window")
            label = ("start" if index == 0 else "end" if index == len(edges) - 2
                     else f"server after {ordered[index // 2 - 1].label}")
            merges = len(inside)
            result.append(Phase(label, end - start, merges * structure.latency, merges,
                                {SERVER: merges} if merges else {}))
    return result


@dataclass(frozen=True)
class Figures:
    """A run's measured and ideal wall time, and how busy the LLM endpoints were."""

    measured: float
    ideal: float  # the critical path, calls overlapping as the structure allows
    sequential_ideal: float  # every call one after another
    calls: int
    busy: float  # fraction of the run during which at least one LLM call was in flight
    mean_call_seconds: float  # as the endpoints saw them: latency plus the sim's own work

    @property
    def overhead(self) -> float:
        return self.measured / self.ideal if self.ideal else math.inf

    def as_dict(self) -> dict[str, float]:
        return {"measured_s": self.measured, "ideal_s": self.ideal, "measured_over_ideal": self.overhead,
                "sequential_ideal_s": self.sequential_ideal, "calls": self.calls, "llm_busy_fraction": self.busy,
                "mean_call_s": self.mean_call_seconds}


def server_extra(run_phases: Sequence[Phase]) -> float:
    """Seconds the server spent beyond its LLM calls outside the windows (bookkeeping, files, plots)."""
    return sum(p.measured - p.ideal for p in run_phases if not p.window)


def busy_fraction(calls: Sequence[Call], start: float, end: float) -> float:
    """Share of [start, end] covered by at least one call: how busy the LLM side was kept."""
    covered, reach = 0.0, start
    for call in sorted(calls, key=lambda c: c.start):
        lo, hi = max(call.start, reach), min(call.end, end)
        if hi > lo:
            covered += hi - lo
        reach = max(reach, call.end)
    return covered / (end - start) if end > start else 0.0


def figures(calls: Sequence[Call], run_phases: Sequence[Phase], structure: Structure,
            run_start: float, run_end: float) -> Figures:
    run_calls = _within(calls, run_start, run_end)
    return Figures(
        measured=run_end - run_start,
        ideal=sum(p.ideal for p in run_phases),
        sequential_ideal=len(run_calls) * structure.latency,
        calls=len(run_calls),
        busy=busy_fraction(run_calls, run_start, run_end),
        mean_call_seconds=sum(c.end - c.start for c in run_calls) / len(run_calls) if run_calls else 0.0,
    )
