"""Side by side: finished (or stopped) run folders, as a table and as one PNG.

A run folder holds ``summary.json`` and ``rounds.jsonl`` (see ``results.py``). Runs
recorded before prompt metrics existed have no ``merged_prompt_metrics`` in their
rounds; every such field is optional here and shows as ``-`` (or is left out of a plot).

    runs = [load_run(d) for d in run_dirs]
    rows = compare_runs(runs)
    print(format_table(rows))
    plot_comparison(rows, {row["run"]: run["rounds"] for row, run in zip(rows, runs)}, "compare.png")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.method.prompt_metrics import text_metrics


class NotARunFolder(FedTextGradError):
    """A path given as a run folder is not one (or cannot be read)."""


# --- loading -----------------------------------------------------------------------


def _read_json(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotARunFolder(f"'{folder}' is not a readable run folder: {path.name}: {exc}") from exc
    if not isinstance(value, dict):
        raise NotARunFolder(f"'{folder}' is not a readable run folder: {path.name} does not hold a JSON object")
    return value


def _read_rounds(path: Path, folder: Path) -> list[dict]:
    """One record per line. A last line without its newline is a write cut short and is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rounds = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: cut short while being written
                break
            raise NotARunFolder(f"'{folder}' is not a readable run folder: rounds.jsonl line {number}: {exc}") from exc
        if isinstance(record, dict):
            rounds.append(record)
    return rounds


def load_run(run_dir: str | Path) -> dict:
    """``{"name", "path", "summary", "rounds", "config"}`` of one run folder.

    Raises :class:`NotARunFolder` naming the folder when it does not exist or lacks
    ``summary.json``/``rounds.jsonl`` (both are written when a run starts).
    """
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise NotARunFolder(f"'{run_dir}' is not a run folder: there is no such folder")
    missing = [name for name in ("summary.json", "rounds.jsonl") if not (folder / name).is_file()]
    if missing:
        raise NotARunFolder(f"'{run_dir}' is not a run folder: it has no {' and no '.join(missing)} "
                            f"(a run folder holds summary.json, rounds.jsonl, config.json and prompts/)")
    config_path = folder / "config.json"
    return {
        "name": folder.resolve().name,
        "path": str(folder.resolve()),
        "summary": _read_json(folder / "summary.json", folder),
        "rounds": _read_rounds(folder / "rounds.jsonl", folder),
        "config": _read_json(config_path, folder) if config_path.is_file() else None,
    }


# --- per-round series ------------------------------------------------------------------


def _metric(record: Mapping, key: str, field: str):
    metrics = record.get(key)
    return metrics.get(field) if isinstance(metrics, Mapping) else None


def merged_series(rounds: Sequence[Mapping]) -> dict[str, list]:
    """Per round of the merged prompt: round, val accuracy, chars, surprisal variance (None if absent)."""
    series: dict[str, list] = {"round": [], "val_accuracy": [], "chars": [], "surprisal_variance": []}
    for record in rounds:
        if "round" not in record:
            continue
        prompt = record.get("merged_prompt")
        chars = _metric(record, "merged_prompt_metrics", "chars")
        series["round"].append(int(record["round"]))
        series["val_accuracy"].append(record.get("val_accuracy"))
        series["chars"].append(chars if chars is not None else (len(prompt) if isinstance(prompt, str) else None))
        series["surprisal_variance"].append(_metric(record, "merged_prompt_metrics", "surprisal_variance"))
    return series


def client_series(rounds: Sequence[Mapping]) -> dict[str, dict[str, list]]:
    """Per client label, per round: its own val accuracy, its prompt's chars and surprisal variance."""
    clients: dict[str, dict[str, list]] = {}
    for record in rounds:
        if "round" not in record:
            continue
        for client in record.get("clients", []) or []:
            series = clients.setdefault(str(client.get("label")), {
                "round": [], "val_accuracy": [], "chars": [], "surprisal_variance": []})
            prompt = client.get("prompt")
            chars = _metric(client, "prompt_metrics", "chars")
            series["round"].append(int(record["round"]))
            series["val_accuracy"].append((client.get("metrics") or {}).get("val_accuracy"))
            series["chars"].append(chars if chars is not None else (len(prompt) if isinstance(prompt, str) else None))
            series["surprisal_variance"].append(_metric(client, "prompt_metrics", "surprisal_variance"))
    return clients


# --- comparison rows ------------------------------------------------------------------


def _task_label(task: object) -> str:
    if isinstance(task, (list, tuple)):
        return ",".join(str(t) for t in task)
    return "" if task is None else str(task)


def compare_runs(run_dirs: Sequence[str | Path | Mapping]) -> list[dict]:
    """One row per run, in the order given (a path, or a run already loaded by :func:`load_run`).

    Row keys: ``run`` (folder name; made unique with its parent folder when two share it),
    ``path``, ``merge``, ``task``, ``partitioning``, ``finished``, ``rounds``,
    ``initial_val_accuracy``, ``best_val_accuracy``, ``best_round``, ``test_accuracy``,
    ``initial_prompt_chars``, ``final_prompt_chars``, ``final_prompt_tokens`` and
    ``tokenizer`` (counted the same way for every run: :func:`text_metrics`),
    ``uniformity`` (surprisal variance in bits² of the last merged prompt, from
    ``merged_prompt_metrics`` in rounds.jsonl; ``None`` when not recorded),
    ``final_surprisal_mean``, ``llm_calls`` and ``llm_tokens`` (``summary["cost"]["total"]``).
    """
    runs = [run if isinstance(run, Mapping) else load_run(run) for run in run_dirs]
    names = [run["name"] for run in runs]
    rows = []
    for run, name in zip(runs, names):
        summary, rounds = run["summary"], run["rounds"]
        if names.count(name) > 1:
            name = f"{Path(run['path']).parent.name}/{name}"
        last = rounds[-1] if rounds else {}
        final_prompt = summary.get("final_prompt") or last.get("merged_prompt") or summary.get("initial_prompt") or ""
        final = text_metrics(final_prompt)
        total = (summary.get("cost") or {}).get("total") or {}
        initial_prompt = summary.get("initial_prompt")
        rows.append({
            "run": name,
            "path": run["path"],
            "merge": summary.get("merge") or last.get("merge_method") or "",
            "task": _task_label(summary.get("task")),
            "partitioning": summary.get("partitioning") or "",
            "finished": bool(summary.get("finished")),
            "rounds": int(summary.get("rounds", len(rounds)) or 0),
            "initial_val_accuracy": summary.get("initial_val_accuracy"),
            "best_val_accuracy": summary.get("best_val_accuracy"),
            "best_round": summary.get("best_round"),
            "test_accuracy": summary.get("test_accuracy"),
            "initial_prompt_chars": len(initial_prompt) if isinstance(initial_prompt, str) else None,
            "final_prompt_chars": final.chars,
            "final_prompt_tokens": final.tokens,
            "tokenizer": final.tokenizer,
            "uniformity": _metric(last, "merged_prompt_metrics", "surprisal_variance"),
            "final_surprisal_mean": _metric(last, "merged_prompt_metrics", "surprisal_mean"),
            "initial_surprisal_variance": _metric(summary, "initial_prompt_metrics", "surprisal_variance"),
            "llm_calls": total.get("llm_calls"),
            "llm_tokens": total.get("tokens"),
        })
    return rows


def _percent(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _plain(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS = (
    ("run", "run"), ("merge", "merge"), ("task", "task"), ("rounds", "rounds"),
    ("initial val", "initial_val_accuracy"), ("best val", "best_val_accuracy"), ("test", "test_accuracy"),
    ("prompt chars", "final_prompt_chars"), ("prompt tokens", "final_prompt_tokens"),
    ("uniformity", "uniformity"), ("LLM calls", "llm_calls"), ("LLM tokens", "llm_tokens"),
)


def format_table(rows: Sequence[Mapping]) -> str:
    """A fixed-width table, one line per run; '-' for what a run did not record."""
    cells = []
    for row in rows:
        line = []
        for _, key in TABLE_COLUMNS:
            value = row.get(key)
            if key.endswith("accuracy"):
                text = _percent(value)
            elif key == "rounds":
                text = f"{_plain(value)}{'' if row.get('finished') else '*'}"
            else:
                text = _plain(value)
            line.append(text)
        cells.append(line)
    widths = [max([len(title), *(len(line[i]) for line in cells)]) for i, (title, _) in enumerate(TABLE_COLUMNS)]

    def render(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    head = render([title for title, _ in TABLE_COLUMNS])
    lines = [head, "-" * len(head), *(render(line) for line in cells)]
    tokenizers = sorted({str(row.get("tokenizer")) for row in rows if row.get("tokenizer")})
    notes = [
        "accuracies: validation of the initial and of the best merged prompt, test of the best prompt",
        f"prompt chars/tokens: the final merged prompt (tokens counted by {', '.join(tokenizers) or '-'})",
        ("uniformity: variance of per-token surprisal (bits^2) of the final merged prompt; lower = more uniform; "
         "'-' = not recorded"),
    ]
    if any(not row.get("finished") for row in rows):
        notes.append("*: the run did not finish")
    return "\n".join(lines + notes)


# --- plots ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(xs: Sequence, ys: Sequence) -> tuple[list, list]:
    pairs = [(x, float(y)) for x, y in zip(xs, ys) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=8, color="gray", wrap=True,
            transform=ax.transAxes)


def _style(axes, titles: Sequence[str], ylabels: Sequence[str]) -> None:
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)


NO_SURPRISAL = "no surprisal recorded\n(needs an endpoint that returns\nprompt token log-probabilities)"


def plot_comparison(rows: Sequence[Mapping], rounds_by_run: Mapping[str, Sequence[Mapping]],
                    path: str | Path) -> Path:
    """One PNG, one line per run: validation accuracy, merged-prompt length and surprisal variance per round.

    Round 0 is the initial prompt where the row knows it (its accuracy and length).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    any_variance = False
    for row in rows:
        label = f"{row['run']} ({row.get('merge') or '?'})"
        series = merged_series(rounds_by_run.get(row["run"], []))
        xs = series["round"]
        acc_x, acc_y = _points(xs, series["val_accuracy"])
        if row.get("initial_val_accuracy") is not None:
            acc_x, acc_y = [0, *acc_x], [float(row["initial_val_accuracy"]), *acc_y]
        len_x, len_y = _points(xs, series["chars"])
        if row.get("initial_prompt_chars") is not None:
            len_x, len_y = [0, *len_x], [float(row["initial_prompt_chars"]), *len_y]
        var_x, var_y = _points(xs, series["surprisal_variance"])
        if var_y and row.get("initial_surprisal_variance") is not None:
            var_x, var_y = [0, *var_x], [float(row["initial_surprisal_variance"]), *var_y]
        line = axes[0].plot(acc_x, acc_y, marker="o", label=label)[0]
        axes[1].plot(len_x, len_y, marker="o", color=line.get_color(), label=label)
        if var_y:
            any_variance = True
            axes[2].plot(var_x, var_y, marker="o", color=line.get_color(), label=label)
    if not any_variance:
        _no_data(axes[2], NO_SURPRISAL)
    axes[0].set_ylim(-0.02, 1.02)
    _style(axes, ["validation accuracy of the merged prompt", "merged-prompt length",
                  "surprisal variance of the merged prompt (uniformity)"],
           ["accuracy", "characters", "bits² per token"])
    if axes[0].lines:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plot_prompt_dynamics(rounds: Sequence[Mapping], path: str | Path, initial_accuracy: float | None = None,
                         initial_prompt: str | None = None, initial_metrics: Mapping | None = None,
                         title: str = "") -> Path:
    """One run's ``prompt_metrics.png``: per round, merged-prompt length and surprisal variance
    beside validation accuracy; thin lines are the clients' own prompts (their accuracy on their
    own validation data). Round 0 is the initial prompt where it is given."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for label, series in sorted(client_series(rounds).items()):
        for ax, key in zip(axes, ("val_accuracy", "chars", "surprisal_variance")):
            xs, ys = _points(series["round"], series[key])
            if ys:
                ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.6, label=f"client {label}")
    merged = merged_series(rounds)
    initial_chars = (initial_metrics or {}).get("chars", len(initial_prompt) if initial_prompt is not None else None)
    initial_variance = (initial_metrics or {}).get("surprisal_variance")
    for ax, key, start in zip(axes, ("val_accuracy", "chars", "surprisal_variance"),
                              (initial_accuracy, initial_chars, initial_variance)):
        xs, ys = _points(merged["round"], merged[key])
        if start is not None:
            xs, ys = [0, *xs], [float(start), *ys]
        if ys:
            ax.plot(xs, ys, marker="s", linewidth=2.5, color="black", label="merged prompt")
    if not axes[2].lines:
        _no_data(axes[2], NO_SURPRISAL)
    axes[0].set_ylim(-0.02, 1.02)
    _style(axes, ["validation accuracy", "prompt length", "surprisal variance (uniformity)"],
           ["accuracy", "characters", "bits² per token"])
    if axes[0].lines:
        axes[0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
