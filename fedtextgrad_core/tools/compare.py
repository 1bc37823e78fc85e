"""Side by side: finished (or stopped) run folders, as a table and as one PNG.

A run folder holds ``summary.json`` and ``rounds.jsonl`` (see ``run/run_folder.py``), read
through the typed records, which also read folders of older versions. Runs recorded
before prompt metrics existed have no ``merged_prompt_metrics``; every such field is
optional here and shows as ``-`` (or is left out of a plot). Runs on the simulated LLM
say so in every row and line.

    runs = [load_run(d) for d in run_dirs]
    rows = compare_runs(runs)
    print(format_table(rows))
    plot_comparison(rows, {row["run"]: run.rounds for row, run in zip(rows, runs)}, "compare.png")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.method.prompt_metrics import text_metrics
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.figures import NO_SURPRISAL, merged_series, no_data, points, pyplot, style
from fedtextgrad_core.run.records import RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE, RunFolder
from fedtextgrad_core.stats import Interval, paired

SIMULATED = " (simulated LLM)"


class NotARunFolder(FedTextGradError):
    """A path given as a run folder is not one (or cannot be read)."""


@dataclass(frozen=True)
class LoadedRun:
    """One run folder, read through the typed records."""

    name: str
    path: str
    summary: RunSummary
    rounds: list[RoundRecord]


def load_run(run_dir: str | Path) -> LoadedRun:
    """The summary and rounds of one run folder.

    Raises :class:`NotARunFolder` naming the folder when it does not exist, lacks
    ``summary.json``/``rounds.jsonl`` (both are written when a run starts), or holds
    something else in them.
    """
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise NotARunFolder(f"'{run_dir}' is not a run folder: there is no such folder")
    missing = [name for name in (SUMMARY_FILE, ROUNDS_FILE) if not (folder / name).is_file()]
    if missing:
        raise NotARunFolder(f"'{run_dir}' is not a run folder: it has no {' and no '.join(missing)} "
                            f"(a run folder holds summary.json, rounds.jsonl, config.json and prompts/)")
    run = RunFolder(folder.resolve())
    unreadable = (OSError, ValueError, TypeError, KeyError, AttributeError, MalformedRecord)
    try:
        summary = run.read_summary()
    except unreadable as exc:
        raise NotARunFolder(f"'{folder}' is not a readable run folder: {SUMMARY_FILE}: {exc}") from exc
    try:
        rounds = run.read_rounds()
    except unreadable as exc:
        raise NotARunFolder(f"'{folder}' is not a readable run folder: {exc}") from exc
    return LoadedRun(name=run.path.name, path=str(run.path), summary=summary, rounds=rounds)


def simulated(run: LoadedRun) -> bool:
    """Whether the run's numbers come from the simulated LLM: the summary says so since it records
    the LLMs; for older runs, the saved run config tells (the sim was then the default backend)."""
    summary = run.summary
    if summary.simulated or any(llm.startswith("sim") for llm in summary.client_llms.values()):
        return True
    if summary.client_llms:
        return False
    try:
        config = json.loads((Path(run.path) / CONFIG_FILE).read_text(encoding="utf-8")).get("run_config", {})
    except (OSError, ValueError, AttributeError):
        return False
    return bool(config.get("llm-backend", "sim") == "sim")


# --- comparison rows ------------------------------------------------------------------


def compare_runs(run_dirs: Sequence[str | Path | LoadedRun]) -> list[dict[str, Any]]:
    """One row per run, in the order given (a path, or a run already loaded by :func:`load_run`).

    Row keys: ``run`` (folder name; made unique with its parent folder when two share it),
    ``path``, ``merge``, ``task``, ``partitioning``, ``finished``, ``simulated``, ``rounds``,
    ``initial_val_accuracy``, ``best_val_accuracy``, ``best_round``, ``test_accuracy``,
    ``initial_prompt_chars``, ``final_prompt_chars``, ``final_prompt_tokens`` and
    ``tokenizer`` (counted the same way for every run: :func:`text_metrics`),
    ``uniformity`` (surprisal variance in bits² of the last merged prompt; ``None`` when
    not recorded), ``final_surprisal_mean``, ``llm_calls`` and ``llm_tokens`` (``cost["total"]``);
    ``initial_val_interval``, ``best_val_interval``, ``test_interval`` (each accuracy with its n and
    95% interval, ``None`` in folders written before they were recorded) and ``test_outcomes`` (the
    best prompt's per-example test outcomes, for :func:`paired_lines`).
    """
    runs = [run if isinstance(run, LoadedRun) else load_run(run) for run in run_dirs]
    names = [run.name for run in runs]
    rows = []
    for run, name in zip(runs, names):
        summary, rounds = run.summary, run.rounds
        if names.count(name) > 1:
            name = f"{Path(run.path).parent.name}/{name}"
        last = rounds[-1] if rounds else None
        last_metrics = (last.merged_prompt_metrics if last else None) or {}
        final_prompt = summary.final_prompt or (last.merged_prompt if last else "") or summary.initial_prompt
        final = text_metrics(final_prompt)
        total = summary.cost.get("total") or {}
        rows.append({
            "run": name,
            "path": run.path,
            "merge": summary.merge or (last.merge.method if last else ""),
            "task": ",".join(summary.task),
            "partitioning": summary.partitioning,
            "finished": summary.finished,
            "simulated": simulated(run),
            "rounds": summary.rounds or len(rounds),
            "initial_val_accuracy": summary.initial_val_accuracy,
            "best_val_accuracy": summary.best_val_accuracy,
            "best_round": summary.best_round,
            "test_accuracy": summary.test_accuracy,
            "initial_prompt_chars": len(summary.initial_prompt),
            "final_prompt_chars": final.chars,
            "final_prompt_tokens": final.tokens,
            "tokenizer": final.tokenizer,
            "uniformity": last_metrics.get("surprisal_variance"),
            "final_surprisal_mean": last_metrics.get("surprisal_mean"),
            "initial_surprisal_variance": (summary.initial_prompt_metrics or {}).get("surprisal_variance"),
            "llm_calls": total.get("llm_calls"),
            "llm_tokens": total.get("tokens"),
            "initial_val_interval": summary.initial_val_interval,
            "best_val_interval": summary.best_val_interval,
            "test_interval": summary.test_intervals.get("best"),
            "test_outcomes": summary.test_outcomes.get("best", {}),
        })
    return rows


def paired_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's best prompt against the first run's, paired on the test examples both scored
    (McNemar's exact test, ``stats.paired``): what a table of accuracies alone cannot say."""
    if len(rows) < 2:
        return []
    base = rows[0]
    lines = [f"paired on test examples, best prompt against {base['run']}'s:"]
    for row in rows[1:]:
        if not base.get("test_outcomes") or not row.get("test_outcomes"):
            lines.append(f"  {row['run']}: no per-example test outcomes recorded (a run before they were)")
            continue
        lines.append(f"  {row['run']}: {paired(row['test_outcomes'], base['test_outcomes']).shown()}")
    return lines


def _percent(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"  # type: ignore[arg-type]


INTERVALS = {"initial_val_accuracy": "initial_val_interval", "best_val_accuracy": "best_val_interval",
             "test_accuracy": "test_interval"}


def _accuracy(row: Mapping[str, Any], key: str) -> str:
    """'41.7% [24-61] n=24' where the interval is recorded, else the bare percentage."""
    interval = row.get(INTERVALS.get(key, ""))
    if isinstance(interval, Interval) and interval.n:
        return f"{_percent(row.get(key))} [{100 * interval.low:.0f}-{100 * interval.high:.0f}] n={interval.n}"
    return _percent(row.get(key))


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


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table, one line per run; '-' for what a run did not record."""
    cells = []
    for row in rows:
        line = []
        for _, key in TABLE_COLUMNS:
            value = row.get(key)
            if key.endswith("accuracy"):
                text = _accuracy(row, key)
            elif key == "rounds":
                text = f"{_plain(value)}{'' if row.get('finished') else '*'}"
            elif key == "run":
                text = f"{value}{SIMULATED if row.get('simulated') else ''}"
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
        ("accuracies: validation of the initial and of the best merged prompt, test of the best prompt; "
         "[low-high] n: the 95% Wilson interval on n examples"),
        f"prompt chars/tokens: the final merged prompt (tokens counted by {', '.join(tokenizers) or '-'})",
        ("uniformity: variance of per-token surprisal (bits^2) of the final merged prompt; lower = more uniform; "
         "'-' = not recorded"),
    ]
    if any(not row.get("finished") for row in rows):
        notes.append("*: the run did not finish")
    if any(row.get("simulated") for row in rows):
        notes.append("(simulated LLM): numbers from the simulated LLM, a test double; they show that the machinery "
                     "works, not how a real model does")
    return "\n".join(lines + notes + paired_lines(rows))


# --- the plot ---------------------------------------------------------------------------------


def plot_comparison(rows: Sequence[Mapping[str, Any]], rounds_by_run: Mapping[str, Sequence[RoundRecord]],
                    path: str | Path) -> Path:
    """One PNG, one line per run: validation accuracy, merged-prompt length and surprisal variance per round.

    Round 0 is the initial prompt where the row knows it (its accuracy and length).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    any_variance = False
    for row in rows:
        label = f"{row['run']} ({row.get('merge') or '?'})" + (SIMULATED if row.get("simulated") else "")
        series = merged_series(rounds_by_run.get(row["run"], []))
        xs = series["round"]
        acc_x, acc_y = points(xs, series["val_accuracy"])
        if row.get("initial_val_accuracy") is not None:
            acc_x, acc_y = [0, *acc_x], [float(row["initial_val_accuracy"]), *acc_y]
        len_x, len_y = points(xs, series["chars"])
        if row.get("initial_prompt_chars") is not None:
            len_x, len_y = [0, *len_x], [float(row["initial_prompt_chars"]), *len_y]
        var_x, var_y = points(xs, series["surprisal_variance"])
        if var_y and row.get("initial_surprisal_variance") is not None:
            var_x, var_y = [0, *var_x], [float(row["initial_surprisal_variance"]), *var_y]
        line = axes[0].plot(acc_x, acc_y, marker="o", label=label)[0]
        axes[1].plot(len_x, len_y, marker="o", color=line.get_color(), label=label)
        if var_y:
            any_variance = True
            axes[2].plot(var_x, var_y, marker="o", color=line.get_color(), label=label)
    if not any_variance:
        no_data(axes[2], NO_SURPRISAL)
    axes[0].set_ylim(-0.02, 1.02)
    style(axes, ["validation accuracy of the merged prompt", "merged-prompt length",
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
