"""The figures of a run folder (``accuracy.png``, ``prompt_metrics.png``) and the series behind them.

Drawing reads only typed round records, so a figure of a finished run, of a run still going
and of a run recorded by an older version look alike. ``fedtextgrad compare`` draws from the
same series.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.run.records import RoundRecord
from fedtextgrad_core.stats import Interval

SIM_NOTE = "simulated LLM: these numbers show the machinery works, not how a real model does"
NO_SURPRISAL = "no surprisal recorded\n(needs an endpoint that returns\nprompt token log-probabilities)"
# More clients than this: the figures draw the clients as a band (min to max, and the median) per round
# instead of one line each, which would be unreadable (and slow: a legend entry per client).
MAX_CLIENT_LINES = 20


# matplotlib is the `figures` extra: a site's install (`pip install fedtextgrad`) leaves it out
NO_MATPLOTLIB = 'matplotlib is not installed (a site\'s install leaves it out): pip install "fedtextgrad[figures]" to draw them'
# what a run says, once, when it cannot draw its figures; it goes on without them
SKIPPED = f"figures skipped (accuracy.png, prompt_metrics.png): {NO_MATPLOTLIB}"


class FiguresUnavailable(FedTextGradError):
    """matplotlib cannot be imported: the figures need the ``figures`` extra."""


def available() -> bool:
    """Whether matplotlib is installed, found without importing it (its import costs a good part of a second)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return False


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FiguresUnavailable(NO_MATPLOTLIB) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def merged_series(rounds: Sequence[RoundRecord]) -> dict[str, list[Any]]:
    """Per round of the merged prompt: round, val accuracy, chars, surprisal variance (None if absent)."""
    series: dict[str, list[Any]] = {"round": [], "val_accuracy": [], "chars": [], "surprisal_variance": []}
    for record in rounds:
        metrics = record.merged_prompt_metrics or {}
        series["round"].append(record.round)
        series["val_accuracy"].append(record.val_accuracy)
        series["chars"].append(metrics.get("chars", len(record.merged_prompt)))
        series["surprisal_variance"].append(metrics.get("surprisal_variance"))
    return series


def merged_interval_band(rounds: Sequence[RoundRecord], initial: Interval | None = None
                         ) -> dict[str, list[float]]:
    """Per round (0: the start prompt) where its n is known, the merged prompt's 95% Wilson interval."""
    band: dict[str, list[float]] = {"round": [], "low": [], "high": [], "n": []}
    known: list[tuple[int, Interval | None]] = [(0, initial)]
    known += [(record.round, record.val_interval) for record in rounds]
    for server_round, interval in known:
        if interval is not None and interval.n:
            band["round"].append(server_round)
            band["low"].append(interval.low)
            band["high"].append(interval.high)
            band["n"].append(interval.n)
    return band


def client_series(rounds: Sequence[RoundRecord]) -> dict[str, dict[str, list[Any]]]:
    """Per client label, per round: its own val accuracy, its prompt's chars and surprisal variance."""
    clients: dict[str, dict[str, list[Any]]] = {}
    for record in rounds:
        for upload in record.uploads:
            series = clients.setdefault(upload.label, {"round": [], "val_accuracy": [], "chars": [],
                                                       "surprisal_variance": []})
            metrics = upload.prompt_metrics or {}
            val = upload.reply.val
            series["round"].append(record.round)
            series["val_accuracy"].append(val.accuracy if val is not None else None)
            series["chars"].append(metrics.get("chars", len(upload.reply.prompt)))
            series["surprisal_variance"].append(metrics.get("surprisal_variance"))
    return clients


def client_band(clients: Mapping[str, Mapping[str, list[Any]]], key: str) -> dict[str, list[Any]]:
    """Per round, the minimum, median and maximum of ``key`` over the clients that have a value."""
    by_round: dict[int, list[float]] = {}
    for series in clients.values():
        for server_round, value in zip(series["round"], series[key]):
            if value is not None:
                by_round.setdefault(server_round, []).append(float(value))
    rounds = sorted(by_round)
    return {"round": rounds, "min": [min(by_round[r]) for r in rounds],
            "median": [statistics.median(by_round[r]) for r in rounds], "max": [max(by_round[r]) for r in rounds]}


def _band(ax: Any, band: Mapping[str, list[Any]], clients: int, what: str) -> None:
    if not band["round"]:
        return
    ax.fill_between(band["round"], band["min"], band["max"], color="tab:blue", alpha=0.2, linewidth=0,
                    label=f"{clients} clients, {what}: min to max", zorder=2)
    ax.plot(band["round"], band["median"], color="tab:blue", marker=".", linewidth=1, linestyle="--",
            label=f"{clients} clients, {what}: median", zorder=2)


def points(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    pairs = [(x, float(y)) for x, y in zip(xs, ys) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def no_data(ax: Any, what: str) -> None:
    """An empty panel says why it is empty, with no axes that suggest a scale."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=8, color="gray", wrap=True, transform=ax.transAxes)


def style(axes: Sequence[Any], titles: Sequence[str], ylabels: Sequence[str]) -> None:
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=9)
        if not ax.axison:
            continue
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)


def _merged_line(ax: Any, xs: list[Any], ys: list[Any]) -> None:
    # drawn first and wide, so a client whose line coincides with it stays visible on top
    ax.plot(xs, ys, marker="s", markersize=9, linewidth=5, alpha=0.35, color="black", label="merged prompt", zorder=1)


def _interval_band(ax: Any, band: Mapping[str, list[float]]) -> None:
    if not band["round"]:
        return
    sizes = sorted(set(band["n"]))
    n = f"n={sizes[0]}" if len(sizes) == 1 else f"n={sizes[0]}-{sizes[-1]}"
    ax.fill_between(band["round"], band["low"], band["high"], color="gray", alpha=0.18, linewidth=0,
                    label=f"merged prompt: 95% interval (Wilson, {n})", zorder=0)


def plot_accuracy(rounds: Sequence[RoundRecord], path: Path, initial_accuracy: float | None, title: str,
                  simulated: bool, initial_interval: Interval | None = None) -> Path:
    """accuracy.png: the merged prompt's federated validation accuracy per round with its 95% interval
    (on sets of 20 to 100 examples the band is wider than most rounds' changes, which is the point of
    drawing it), and per client the validation accuracy of the prompt it uploaded, on its own data."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    merged = merged_series(rounds)
    xs, ys = points(merged["round"], merged["val_accuracy"])
    if initial_accuracy is not None:
        xs, ys = [0, *xs], [initial_accuracy, *ys]
    _interval_band(ax, merged_interval_band(rounds, initial_interval))
    _merged_line(ax, xs, ys)
    markers = "o^vD<>pX*h"
    clients = client_series(rounds)
    if len(clients) > MAX_CLIENT_LINES:
        _band(ax, client_band(clients, "val_accuracy"), len(clients), "their own prompts")
    else:
        for index, (label, series) in enumerate(sorted(clients.items())):
            cx, cy = points(series["round"], series["val_accuracy"])
            if cy:
                ax.plot(cx, cy, marker=markers[index % len(markers)], linewidth=1,
                        label=f"client {label} (its own prompt)", zorder=2)
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title + (f"\n{SIM_NOTE}" if simulated else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prompt_dynamics(rounds: Sequence[RoundRecord], path: Path, initial_accuracy: float | None,
                         initial_metrics: Mapping[str, Any] | None, initial_prompt: str, title: str,
                         simulated: bool) -> Path:
    """prompt_metrics.png: per round, merged-prompt length and surprisal variance beside validation
    accuracy; thin lines are the clients' own prompts. Round 0 is the initial prompt."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    keys = ("val_accuracy", "chars", "surprisal_variance")
    merged = merged_series(rounds)
    start = (initial_accuracy, (initial_metrics or {}).get("chars", len(initial_prompt)),
             (initial_metrics or {}).get("surprisal_variance"))
    have_surprisal = any(v is not None for v in merged["surprisal_variance"])
    for ax, key, first in zip(axes, keys, start):
        if key == "surprisal_variance" and not have_surprisal:
            continue
        xs, ys = points(merged["round"], merged[key])
        if first is not None:
            xs, ys = [0, *xs], [float(first), *ys]
        if ys:
            _merged_line(ax, xs, ys)
    clients = client_series(rounds)
    if len(clients) > MAX_CLIENT_LINES:
        for ax, key in zip(axes, keys):
            if key == "surprisal_variance" and not have_surprisal:
                continue
            _band(ax, client_band(clients, key), len(clients), "own prompts")
    else:
        for label, series in sorted(clients.items()):
            for ax, key in zip(axes, keys):
                if key == "surprisal_variance" and not have_surprisal:
                    continue
                xs, ys = points(series["round"], series[key])
                if ys:
                    ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.8, label=f"client {label}", zorder=2)
    if not have_surprisal:
        no_data(axes[2], NO_SURPRISAL)
    axes[0].set_ylim(-0.02, 1.02)
    style(axes, ["validation accuracy", "prompt length", "surprisal variance (uniformity)"],
          ["accuracy", "characters", "bits² per token"])
    if axes[0].lines:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title + (f" — {SIM_NOTE}" if simulated else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
