"""``fedtextgrad experiment GRID.toml --out DIR``: a grid of federations, one real ``flwr run`` per cell.

A researcher compares centralised, homogeneous and heterogeneous training across merge methods
(and seeds, tasks, models). The grid file names the shared settings and the axes; every
combination of axis values is a cell, run as ``flwr run`` of this app with its run folder under
``DIR/runs/``, so running the command again skips finished cells and resumes an interrupted one
from its checkpoint. ``--data-source`` is the only setting the command line changes (where this
machine keeps the data is no part of the experiment). At the end ``DIR/table.md``, ``table.csv``
and ``figure.png`` hold the results with their intervals and paired comparisons. The grid file's
sections and the table's layout: docs/experiments.md, "Grid files"; an example: experiments/cpu.toml.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedtextgrad_core.errors import ConfigError, FedTextGradError
from fedtextgrad_core.run.checkpoint import CHECKPOINT_FILE
from fedtextgrad_core.run.records import RoundRecord, RunSummary
from fedtextgrad_core.run.run_folder import SUMMARY_FILE, RunFolder
from fedtextgrad_core.run.schema import BY_KEY, defaults, has_control
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.stats import Interval, paired, wilson

Echo = Callable[[str], None]
SECTIONS = {"description", "settings", "axes", "federation", "serve", "table"}
FEDERATION_KEYS = {"connection", "num-supernodes", "options", "flwr-home", "cell-timeout", "app"}
SERVE_KEYS = {"model", "port", "parallel", "threads", "ctx", "alias"}
TABLE_KEYS = {"rows", "columns"}
DEFAULT_CELL_TIMEOUT = 6 * 3600.0
ROW_ORDER = ("centralized", "homogeneous", "heterogeneous")
PATH_SETTINGS = {"data-source", "llm-cache-path", "tracking-uri"}


class GridError(FedTextGradError):
    """The grid file cannot be used as it is."""


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based
    values: dict[str, Any]  # axis -> value

    @property
    def name(self) -> str:
        """The run folder's name: the axis values, readable and safe as a file name."""
        parts = [f"{key}-{value}" for key, value in self.values.items()]
        return re.sub(r"[^\w.\-]+", "_", "__".join(parts)) or "cell"

    def describe(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.values.items())


@dataclass
class Grid:
    path: Path
    description: str
    settings: dict[str, Any]
    axes: dict[str, list[Any]]
    federation: dict[str, Any]
    serve: dict[str, Any] | None
    rows: tuple[str, ...]  # the table's row keys: axes, settings, or "model"
    columns: tuple[str, ...]
    cells: list[Cell] = field(default_factory=list)

    @property
    def connection(self) -> str:
        return str(self.federation.get("connection", "local"))

    @property
    def simulation(self) -> bool:
        return self.connection == "local"

    def run_config(self, cell: Cell, results: Path) -> dict[str, Any]:
        config = {**self.settings, **cell.values, "results-dir": str(results), "run-name": cell.name}
        return {key: self._path(key, value, results.parent) for key, value in config.items()}

    def _path(self, key: str, value: Any, out: Path) -> Any:
        """Paths in a grid file are the grid's: '{out}' is the --out folder, and './x' or '../x' are
        taken from the grid file's folder (a cell's processes run elsewhere)."""
        if key not in PATH_SETTINGS or not isinstance(value, str):
            return value
        value = value.replace("{out}", str(out))
        if value.startswith(("./", "../")):
            return str((self.path.parent / value).resolve())
        return value


# --- reading the grid -----------------------------------------------------------------------------------


def _table(data: Mapping[str, Any], name: str, known: set[str] | None = None) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise GridError(f"[{name}] must be a table of key = value lines")
    if known is not None:
        unknown = sorted(set(value) - known)
        if unknown:
            raise GridError(f"[{name}] has unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    return dict(value)


def _table_keys(table: Mapping[str, Any], name: str, default: str, axes: Mapping[str, Any],
                settings: Mapping[str, Any]) -> tuple[str, ...]:
    """``[table] rows`` or ``columns``: one key or a list of keys, each an axis, a setting or "model"."""
    value = table.get(name, default)
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise GridError(f"[table] {name} must be a key or a non-empty list of keys, e.g. {name} = "
                        f"[\"partitioning\", \"merge\"]")
    for key in keys:
        if key not in axes and key not in settings and key not in BY_KEY and key != MODEL_KEY:
            raise GridError(f"[table] {name}: '{key}' is neither an axis, a setting, nor \"{MODEL_KEY}\" (the LLM "
                            "the clients reported)")
    if len(set(keys)) < len(keys):
        raise GridError(f"[table] {name} names a key twice: {', '.join(keys)}")
    return tuple(keys)


def _data_source_option(value: str, axes: Mapping[str, Any], connection: str) -> str:
    """``--data-source`` checked: hub, synthetic, or an existing path (absolute: the cells run elsewhere)."""
    text = value.strip()
    if "data-source" in axes:
        raise GridError("--data-source: data-source is an axis of this grid; remove it from [axes] or the option")
    if connection != "local":
        raise GridError(f"--data-source is for Flower's simulation (connection = \"local\"); on '{connection}' each "
                        "site names its own data-source in its SuperNode's node config")
    if text in ("hub", "synthetic"):
        return text
    expected = "give hub, synthetic, or a folder holding bbh/<task>.json and gsm8k/{train,test}.jsonl"
    try:
        path = Path(text).expanduser()
        if not text or has_control(text) or not path.exists():
            raise GridError(f"--data-source '{text[:200]}' does not exist here ({Path.cwd()}); {expected}")
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        raise GridError(f"--data-source '{text[:200]}' cannot be used ({exc}); {expected}") from None


def check_data(grid: Grid) -> None:
    """Every task of every cell finds its data, in Flower's simulation (the clients run here); once per
    (task, source): a wrong folder is one line now rather than a failure in every cell. The hub is left
    to the cells (checking it would download it)."""
    if not grid.simulation:
        return
    from fedtextgrad_core.data.loaders import load_splits

    checked: set[tuple[object, ...]] = set()
    for cell in grid.cells:
        settings = RunSettings.from_config(grid.run_config(cell, Path("runs")))
        if settings.data_source == "hub":
            continue
        for task in settings.tasks:
            key = (task, settings.data_source, settings.gsm8k_split, settings.synthetic_size, settings.seed)
            if key in checked:
                continue
            checked.add(key)
            try:
                load_splits(task, settings.data_source, settings.seed, settings.synthetic_size, settings.gsm8k_split)
            except FedTextGradError as exc:
                raise GridError(f"cell {cell.index} ({cell.describe()}): {exc}") from None


def load_grid(path: Path, data_source: str | None = None) -> Grid:
    """Read and check a grid file: every cell's settings are checked before anything runs.

    ``data_source`` (the command's ``--data-source``) replaces the grid's ``data-source``: where this
    machine keeps the data is no part of the experiment. A path is taken from the current folder.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GridError(f"the grid file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"the grid file '{path}' cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"the grid file '{path}' is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise GridError(f"unknown section(s) {', '.join(unknown)}; a grid file has {', '.join(sorted(SECTIONS))}")
    settings = _table(data, "settings")
    axes = _table(data, "axes")
    if not axes:
        raise GridError("[axes] is empty: name at least one setting with a list of values, e.g. merge = [\"concat\"]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"[axes] {key} must be a non-empty list of values")
        if key in settings:
            raise GridError(f"'{key}' is both a shared setting and an axis; keep one")
    for key in ("results-dir", "run-name", "resume-from"):
        if key in settings or key in axes:
            raise GridError(f"'{key}' is set by the experiment runner for each cell; remove it from the grid file")
    federation = _table(data, "federation", FEDERATION_KEYS)
    serve = _table(data, "serve", SERVE_KEYS) if "serve" in data else None
    if serve is not None and "model" not in serve:
        raise GridError("[serve] needs model = the path of a GGUF file (or \"smollm2\")")
    table = _table(data, "table", TABLE_KEYS)
    rows = _table_keys(table, "rows", "partitioning", axes, settings)
    columns = _table_keys(table, "columns", "merge", axes, settings)
    both = sorted(set(rows) & set(columns))
    if both:
        raise GridError(f"[table] '{', '.join(both)}' is both a row and a column key; keep it in one")
    if data_source is not None:
        settings["data-source"] = _data_source_option(data_source, axes, str(federation.get("connection", "local")))
    description = data.get("description", "")
    grid = Grid(path=path, description=str(description), settings=settings, axes=axes, federation=federation,
                serve=serve, rows=rows, columns=columns)
    keys = list(axes)
    grid.cells = [Cell(i + 1, dict(zip(keys, combination)))
                  for i, combination in enumerate(itertools.product(*(axes[k] for k in keys)))]
    for cell in grid.cells:
        try:
            RunSettings.from_config(grid.run_config(cell, Path("runs")))
        except ConfigError as exc:
            raise GridError(f"cell {cell.index} ({cell.describe()}): {exc}") from None
    return grid


# --- running cells ---------------------------------------------------------------------------------------


def config_toml(config: Mapping[str, Any]) -> str:
    """A cell's run config as a TOML file for ``flwr run --run-config`` (text, numbers and booleans)."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise GridError(f"{key} = {value} cannot be a setting")
    return tomli_w.dumps(dict(config))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (e.g. FLWR_HOME=...): the local SuperLink that
    ``flwr run`` started for this grid and left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # finished | failed | skipped
    seconds: float = 0.0
    error: str = ""


class Runner:
    """Runs a grid's cells one after another with ``flwr run``, resumably."""

    def __init__(self, grid: Grid, out: Path, app: Path, echo: Echo = print, tracker: str = "none",
                 tracking_uri: str = ""):
        self.grid = grid
        self.out = out
        self.app = app
        self.echo = echo
        self.runs = out / "runs"
        self.logs = out / "logs"
        self.configs = out / "configs"
        self.flwr_home = out / "flwr-home"
        self.tracker = tracker
        self.tracking_uri = tracking_uri

    # --- the environment of every `flwr run` ---
    def env(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        if self.grid.simulation:
            # the grid's own FLWR_HOME and SuperLink ports: never a SuperLink someone else left running
            env["FLWR_HOME"] = str(self.flwr_home)
            env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(self._ports[0])
            env["FLWR_LOCAL_CONTROL_API_PORT"] = str(self._ports[1])
        elif self.grid.federation.get("flwr-home"):
            env["FLWR_HOME"] = str(Path(str(self.grid.federation["flwr-home"])).expanduser())
        return env

    def command(self, cell: Cell, config_file: Path) -> list[str]:
        command = ["flwr", "run", str(self.app), self.grid.connection, "--stream", "--run-config", str(config_file)]
        if self.grid.simulation:
            options = f"num-supernodes={int(self.grid.federation.get('num-supernodes', 3))} " + str(
                self.grid.federation.get("options", ""))
            command += ["--federation-config", options.strip()]
        return command

    # --- one cell ---
    def status(self, cell: Cell) -> tuple[str, Path]:
        """'finished', 'resume' (a checkpoint to continue from) or 'new', and the cell's run folder."""
        folder = self.runs / cell.name
        summary = folder / SUMMARY_FILE
        if summary.exists():
            try:
                if RunFolder(folder).read_summary().finished:
                    return "finished", folder
            except (OSError, ValueError, TypeError, FedTextGradError):
                pass
        if (folder / CHECKPOINT_FILE).exists():
            return "resume", folder
        return "new", folder

    def run_cell(self, cell: Cell, extra: Mapping[str, Any]) -> CellOutcome:
        state, folder = self.status(cell)
        if state == "finished":
            return CellOutcome(cell, "skipped")
        if state == "new" and folder.exists():  # stopped before its first checkpoint: nothing to keep
            folder.rename(folder.with_name(f"{folder.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
        config = {**self.grid.run_config(cell, self.runs), **extra}
        if state == "resume":
            config["resume-from"] = str(folder)
        self.configs.mkdir(parents=True, exist_ok=True)
        config_file = self.configs / f"{cell.name}.toml"
        config_file.write_text(config_toml(config), encoding="utf-8")
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{cell.name}.log"
        started = time.monotonic()
        timeout = float(self.grid.federation.get("cell-timeout", DEFAULT_CELL_TIMEOUT))
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command(cell, config_file))}\n")
            log.flush()
            process = subprocess.Popen(self.command(cell, config_file), cwd=self.app, env=self.env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            try:
                self._follow(process, log, started + timeout)
            finally:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        seconds = time.monotonic() - started
        state, folder = self.status(cell)
        if state == "finished":
            return CellOutcome(cell, "finished", seconds)
        error = "no run folder was written (see the log)"
        if (folder / SUMMARY_FILE).exists():
            try:
                error = RunFolder(folder).read_summary().error or "the run stopped before it finished"
            except (OSError, ValueError, TypeError, FedTextGradError) as exc:
                error = f"its summary.json cannot be read: {exc}"
        if time.monotonic() > started + timeout:
            error = f"it ran longer than cell-timeout = {timeout:g} s; stopped"
        return CellOutcome(cell, "failed", seconds, f"{error} (log: {log_path})")

    def _follow(self, process: subprocess.Popen[str], log: Any, deadline: float) -> None:
        """Copy the run's output to its log, echo the lines worth seeing, stop at the deadline."""

        def copy() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if _worth_showing(line):
                    self.echo(f"    {line.strip()}")

        reader = threading.Thread(target=copy, name="cell-output", daemon=True)
        reader.start()
        while process.poll() is None:
            if time.monotonic() > deadline:
                self.echo("    the cell ran past its cell-timeout: stopping it (it can be resumed)")
                return
            time.sleep(0.5)
        reader.join(timeout=10)

    # --- the grid ---
    def run(self) -> list[CellOutcome]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._ports = (_free_port(), _free_port())
        grid, outcomes = self.grid, []
        total = len(grid.cells)
        done = sum(1 for cell in grid.cells if self.status(cell)[0] == "finished")
        self.echo(f"experiment {grid.path.name}: {total} cell(s), {done} already finished; results in {self.out}")
        from fedtextgrad_core.run.tracking import finish_parent, start_parent
        parent = start_parent(self.tracking_uri, "fedtextgrad", grid.path.stem,
                              {"grid": str(grid.path), **{f"axis.{k}": str(v) for k, v in grid.axes.items()}},
                              self.echo, folder=self.out) if self.tracker == "mlflow" else None
        extra: dict[str, Any] = {}
        if self.tracker == "mlflow":
            extra = {"tracker": "mlflow", "tracking-uri": self.tracking_uri, "tracking-parent-run": parent or ""}
        began = time.monotonic()
        ran: list[float] = []
        completed = False  # every cell reached: an interrupted grid's parent run ends KILLED
        try:
            with self._model_server() as serve_settings:
                extra.update(serve_settings)
                for cell in grid.cells:
                    elapsed = time.monotonic() - began
                    left = len([c for c in grid.cells[cell.index - 1:] if self.status(c)[0] != "finished"])
                    estimate = f", about {_duration(statistics.mean(ran) * left)} left" if ran else ""
                    state = self.status(cell)[0]
                    verb = {"finished": "already finished", "resume": "resuming", "new": "starting"}[state]
                    self.echo(f"cell {cell.index}/{total} ({cell.describe()}): {verb}; "
                              f"elapsed {_duration(elapsed)}{estimate}")
                    outcome = self.run_cell(cell, extra)
                    outcomes.append(outcome)
                    if outcome.status == "finished":
                        ran.append(outcome.seconds)
                        summary = RunFolder(self.runs / cell.name).read_summary()
                        self.echo(f"cell {cell.index}/{total}: finished in {_duration(outcome.seconds)}, test accuracy "
                                  f"{_percent(summary.test_accuracy)} (best prompt)"
                                  + (" (simulated LLM)" if summary.simulated else ""))
                    elif outcome.status == "failed":
                        self.echo(f"cell {cell.index}/{total}: FAILED: {outcome.error}")
            completed = True
        finally:
            self._stop_local_superlink()
            write_results(self.grid, self.runs, self.out, self.echo)
            if parent:
                failed = any(o.status == "failed" for o in outcomes)
                tables = self.out / "tables-for-tracking"
                tables.mkdir(exist_ok=True)
                for name in ("table.md", "table.csv", "figure.png"):
                    if (self.out / name).exists():
                        shutil.copy(self.out / name, tables / name)
                status = "FAILED" if failed else "FINISHED" if completed else "KILLED"
                finish_parent(self.tracking_uri, parent, status, tables, self.echo)
        return outcomes

    @contextmanager
    def _model_server(self) -> Iterator[dict[str, Any]]:
        """The grid's own model server (``[serve]``), started before the first cell, stopped by PID after."""
        serve = self.grid.serve
        if serve is None:
            yield {}
            return
        from fedtextgrad_core.tools.serve import serving

        options = {k.replace("-", "_"): v for k, v in serve.items() if k != "model"}
        self.echo(f"starting fedtextgrad serve --model {serve['model']} ...")
        with serving(str(serve["model"]), **options) as served:
            self.echo(f"model server ready: {served.base_url} (model {served.alias})")
            yield {}

    def _stop_local_superlink(self) -> None:
        """Stop, by PID, the local SuperLink `flwr run` started for this grid and everything it started
        (the simulation and its workers inherit the grid's FLWR_HOME): nothing of the grid keeps running."""
        if not self.grid.simulation:
            return
        marker = f"FLWR_HOME={self.flwr_home}"
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = _pids_with_env(marker)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = _pids_with_env(marker)
            if not pids:
                return


def _worth_showing(line: str) -> bool:
    text = line.strip()
    return text.startswith(("initial prompt:", "best prompt", "run stopped", "resuming", "fedtextgrad:")) or bool(
        re.match(r"^\d+\s+merged \(", text))


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# --- results ---------------------------------------------------------------------------------------------

# Table keys that are no setting: "model" is the LLM the run's clients reported (so a simulated run's row
# or column says so). "task" is a setting, but for a heterogeneous run it is each client's own task.
MODEL_KEY = "model"
TASK_KEY = "task"
TEST, VALIDATION = "test", "validation"


@dataclass(frozen=True)
class Entry:
    """One run's numbers in a table cell: the whole run, or one task of a heterogeneous run."""

    summary: RunSummary
    best: float | None  # the best prompt (by validation)
    last: float | None  # the last merged prompt
    start: float | None  # the start prompt
    split: str = TEST  # what was scored: TEST, or VALIDATION for one task of a heterogeneous run (task_entries)
    interval: Interval | None = None  # the best prompt's test accuracy with its n (runs since it was recorded)
    # the best prompt's test outcome per example, keyed by the run's pooled-axis values and the example id,
    # so two cells pair the same seed's same examples
    outcomes: Mapping[str, bool] = field(default_factory=dict)


@dataclass
class CellResult:
    row: tuple[str, ...]  # the values of the grid's row keys
    column: tuple[str, ...]  # the values of its column keys
    entries: list[Entry]
    split: str = TEST

    @property
    def summaries(self) -> list[RunSummary]:
        return [entry.summary for entry in self.entries]

    def values(self, name: str) -> list[float]:
        """``best``, ``last`` or ``start`` of every entry that has it."""
        found = [getattr(entry, name) for entry in self.entries]
        return [float(v) for v in found if v is not None]

    def interval(self) -> Interval | None:
        """The best prompt's test accuracy over every example of every run in the cell (Wilson, 95%),
        or None when no run recorded its n. Seeds pooled with their examples: the interval says how
        many scored answers the mean stands on, which a mean ± sd over 2 or 3 seeds cannot."""
        known = [entry.interval for entry in self.entries if entry.interval is not None and entry.interval.n]
        return wilson(sum(i.correct for i in known), sum(i.n for i in known)) if known else None

    def outcomes(self) -> dict[str, bool]:
        return {key: right for entry in self.entries for key, right in entry.outcomes.items()}


def _mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def task_entries(summary: RunSummary, rounds: Sequence[RoundRecord], tasks: Sequence[str]) -> list[tuple[str, Entry]]:
    """A heterogeneous run's numbers per task (client i holds tasks[i]).

    The run folder keeps test accuracy pooled over every client (summary.json) and, per client, the
    validation accuracy of each round's merged prompt (rounds.jsonl). So a task's numbers are the best
    prompt's and the last merged prompt's validation accuracy on that task's clients; the best is
    unknown when it is the start prompt (round 0), whose per-client scores no record keeps.
    """
    by_round = {record.round: record for record in rounds}

    def accuracy(record: RoundRecord | None, task: str) -> float | None:
        if record is None:
            return None
        scores = [e.reply.scores for e in record.evaluations
                  if 0 <= e.reply.partition_id < len(tasks) and tasks[e.reply.partition_id] == task]
        total = sum(s.total for s in scores)
        return sum(s.correct for s in scores) / total if total else None

    best, last = by_round.get(summary.best_round), (rounds[-1] if rounds else None)
    return [(task, Entry(summary, accuracy(best, task), accuracy(last, task), None, VALIDATION))
            for task in dict.fromkeys(tasks)]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def collect(grid: Grid, runs: Path) -> list[CellResult]:
    """The finished runs of the grid, grouped by the values of the row keys and of the column keys;
    the other axes (seeds) pooled. A heterogeneous run counts once per task when ``task`` is a key."""
    keys = (*grid.rows, *grid.columns)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...], str], list[Entry]] = {}
    order: dict[str, dict[str, int]] = {key: {} for key in keys}  # each key's values in the grid's order
    for key in keys:
        for value in grid.axes.get(key, []):
            order[key].setdefault(_shown(value), len(order[key]))
    for cell in grid.cells:
        folder = runs / cell.name
        try:
            summary = RunFolder(folder).read_summary()
        except (OSError, ValueError, TypeError, FedTextGradError):
            continue
        if not summary.finished:
            continue
        config = {**defaults(), **grid.settings, **cell.values}
        pooled_values = "|".join(f"{key}={_shown(cell.values.get(key, ''))}" for key in sorted(pooled_axes(grid)))
        whole = Entry(summary, summary.test_accuracy, summary.last_test_accuracy, summary.initial_test_accuracy,
                      interval=summary.test_intervals.get("best"),
                      outcomes={f"{pooled_values}#{example}": right
                                for example, right in summary.test_outcomes.get("best", {}).items()})
        entries: list[tuple[str | None, Entry]] = [(None, whole)]
        if TASK_KEY in keys and config.get("partitioning") == "heterogeneous":
            try:
                rounds = RunFolder(folder).read_rounds()
            except (OSError, ValueError, TypeError, FedTextGradError):
                continue
            tasks = [t.strip() for t in str(config.get("heterogeneous-tasks", "")).split(",") if t.strip()]
            entries = [(task, entry) for task, entry in task_entries(summary, rounds, tasks)]
        for task, entry in entries:
            values = {key: (task if key == TASK_KEY and task is not None else
                            _model_of([summary]) if key == MODEL_KEY else _shown(config.get(key, "")))
                      for key in keys}
            for key in keys:
                order[key].setdefault(values[key], len(order[key]))
            row, column = tuple(values[k] for k in grid.rows), tuple(values[k] for k in grid.columns)
            groups.setdefault((row, column, entry.split), []).append(entry)

    def rank(key_names: Sequence[str], values: Sequence[str]) -> tuple[int, ...]:
        return tuple(order[k][v] for k, v in zip(key_names, values))

    found = sorted(groups, key=lambda g: (rank(grid.rows, g[0]), rank(grid.columns, g[1]), g[2] != TEST))
    return [CellResult(row, column, groups[(row, column, split)], split) for row, column, split in found]


def _model_of(summaries: Sequence[RunSummary]) -> str:
    models = sorted({llm for s in summaries for llm in s.client_llms.values()})
    simulated = any(s.simulated for s in summaries)
    text = ", ".join(models) or "?"
    return text + (" (simulated LLM)" if simulated and "simulated LLM" not in text else "")


def _label(values: Sequence[str]) -> str:
    return " / ".join(values)


def _in_order(values: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return list(dict.fromkeys(values))


def _cell_text(result: CellResult) -> str:
    tokens = statistics.mean(s.cost.get("total", {}).get("tokens", 0) for s in result.summaries)
    minutes = statistics.mean(_minutes(s) for s in result.summaries)
    best, start, last = (_mean_sd(result.values(name)) for name in ("best", "start", "last"))
    split = "validation; " if result.split == VALIDATION else ""
    interval = result.interval() if result.split == TEST else None
    sure = f" [{100 * interval.low:.1f}-{100 * interval.high:.1f}, {interval.n} answers]" if interval else ""
    return (f"**{best}**{sure} ({split}start {start}; last {last}; runs={len(result.entries)}; "
            f"{tokens / 1000:.1f}k tokens; {minutes:.0f} min)")


def paired_cells(by_key: Mapping[tuple[tuple[str, ...], tuple[str, ...]], Sequence[CellResult]],
                 rows: Sequence[tuple[str, ...]], columns: Sequence[tuple[str, ...]]) -> list[str]:
    """Each cell against the first of its row, and against the first of its column: the best prompts'
    test outcomes paired on the same seed's same examples (McNemar's exact test, ``stats.paired``).
    A table's means cannot say whether two cells differ; this can, where they share examples."""

    def test_cell(row: tuple[str, ...], column: tuple[str, ...]) -> CellResult | None:
        return next((r for r in by_key.get((row, column), []) if r.split == TEST and r.outcomes()), None)

    lines = []
    pairs = [((row, column), (row, columns[0])) for row in rows for column in columns[1:]]
    pairs += [((row, column), (rows[0], column)) for column in columns for row in rows[1:]]
    for (a_key, b_key) in pairs:
        a, b = test_cell(*a_key), test_cell(*b_key)
        if a is None or b is None:
            continue
        comparison = paired(a.outcomes(), b.outcomes())
        if comparison.n:
            lines.append(f"- {_label(a_key[0])} / {_label(a_key[1])} against {_label(b_key[0])} / "
                         f"{_label(b_key[1])}: {comparison.shown()}")
    return lines


def pooled_axes(grid: Grid) -> dict[str, list[Any]]:
    """The axes with more than one value that are neither rows nor columns: their runs share a cell."""
    named = {*grid.rows, *grid.columns}
    return {key: values for key, values in grid.axes.items() if key not in named and len(values) > 1}


def write_results(grid: Grid, runs: Path, out: Path, echo: Echo = print) -> list[CellResult]:
    """table.md, table.csv and figure.png from the finished cells."""
    results = collect(grid, runs)
    if not results:
        echo("no finished cell yet: no table")
        return results
    rows, columns = _in_order(r.row for r in results), _in_order(r.column for r in results)
    by_key: dict[tuple[tuple[str, ...], tuple[str, ...]], list[CellResult]] = {}
    for result in results:
        by_key.setdefault((result.row, result.column), []).append(result)
    lines = [f"# {grid.path.stem}: test accuracy of the best prompt (%)", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [f"| {_label(grid.rows)} \\ {_label(grid.columns)} | " + " | ".join(_label(c) for c in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = ["<br>".join(_cell_text(r) for r in by_key.get((row, column), [])) or "-" for column in columns]
        lines.append(f"| {_label(row)} | " + " | ".join(cells) + " |")
    models = sorted({_model_of(r.summaries) for r in results})
    lines += ["", "Cells: test accuracy of the best prompt (by validation), mean ± sd over the runs in the cell; "
                  "[low-high, N answers]: its 95% Wilson interval over every test answer of those runs; start = "
                  "the start prompt's test accuracy; last = the last merged prompt's; runs, tokens and minutes "
                  "per run."]
    pooled = pooled_axes(grid)
    if pooled:
        lines.append("Pooled in each cell: " + "; ".join(f"{key} = {', '.join(_shown(v) for v in values)}"
                                                        for key, values in pooled.items()) + ".")
    if any(r.split == VALIDATION for r in results):
        lines.append("Cells marked validation: one task of heterogeneous runs. A run folder keeps test accuracy "
                     "pooled over every client (summary.json) and, per client, only the validation accuracy of "
                     "each round's merged prompt (rounds.jsonl); so these show, on that task's clients, the "
                     "validation accuracy of the best prompt (chosen on every client's validation; '-' when the "
                     "start prompt stayed best) and of the last merged prompt. Tokens and minutes are the whole run's.")
    lines.append(f"Model(s): {'; '.join(models)}.")
    comparisons = paired_cells(by_key, rows, columns)
    if comparisons:
        lines += ["", "Paired comparisons (the best prompts' test answers on the same seed's same examples, "
                      "McNemar's exact test; 'better' or 'worse' only where the 95% interval of the difference "
                      "excludes zero):", "", *comparisons, ""]
    if any(s.simulated for r in results for s in r.summaries):
        lines.append("These numbers come from the simulated LLM, a test double: they show that the machinery works, "
                     "not how a real model does.")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out / "table.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        named = MODEL_KEY in (*grid.rows, *grid.columns)  # the model is a key's column already
        writer.writerow([*grid.rows, *grid.columns, "split", "runs", "test_best_mean", "test_best_sd",
                         "test_best_answers", "test_best_low", "test_best_high",
                         "test_last_mean", "test_start_mean", "val_best_mean", "val_last_mean", "tokens_mean",
                         "minutes_mean", *([] if named else [MODEL_KEY]), "simulated"])
        for r in results:
            best = r.values("best")
            validation = r.split == VALIDATION  # the numbers are validation accuracies: not in test_* columns
            interval = None if validation else r.interval()
            writer.writerow([*r.row, *r.column, r.split, len(r.entries),
                             "" if validation else _num(_mean(best)),
                             "" if validation or len(best) < 2 else _num(statistics.stdev(best)),
                             interval.n if interval else "", _num(interval.low) if interval else "",
                             _num(interval.high) if interval else "",
                             "" if validation else _num(_mean(r.values("last"))),
                             "" if validation else _num(_mean(r.values("start"))),
                             _num(_mean(best)) if validation else
                             _num(_mean([float(s.best_val_accuracy) for s in r.summaries
                                         if s.best_val_accuracy is not None])),
                             _num(_mean(r.values("last"))) if validation else "",
                             _num(statistics.mean(s.cost.get("total", {}).get("tokens", 0) for s in r.summaries)),
                             _num(statistics.mean(_minutes(s) for s in r.summaries)),
                             *([] if named else [_model_of(r.summaries)]),
                             str(any(s.simulated for s in r.summaries)).lower()])
    try:
        _figure(by_key, rows, columns, grid, out / "figure.png")
    except Exception as exc:  # a figure must never cost the table
        echo(f"could not draw figure.png: {exc}")
    echo(f"results: {out / 'table.md'}, {out / 'table.csv'}, {out / 'figure.png'}")
    return results


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _minutes(summary: RunSummary) -> float:
    return summary.seconds / 60


def _figure(by_key: Mapping[tuple[tuple[str, ...], tuple[str, ...]], Sequence[CellResult]],
            rows: Sequence[tuple[str, ...]], columns: Sequence[tuple[str, ...]], grid: Grid, path: Path) -> None:
    """Bars per row, one per column; a cell's test result, else its validation one (hatched)."""
    from fedtextgrad_core.run.figures import SIM_NOTE, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(rows) * max(1, len(columns)) / 2), 4.2))
    width = 0.8 / max(1, len(columns))
    shown: list[CellResult] = []
    for j, column in enumerate(columns):
        xs: list[float] = []
        means: list[float] = []
        errors: list[float] = []
        starts: list[float | None] = []
        hatches: list[str] = []
        for i, row in enumerate(rows):
            results = [r for r in by_key.get((row, column), []) if r.values("best")]
            if not results:
                continue
            result = results[0]  # TEST sorts first
            shown.append(result)
            best = result.values("best")
            xs.append(i + (j - (len(columns) - 1) / 2) * width)
            means.append(statistics.mean(best))
            errors.append(statistics.stdev(best) if len(best) > 1 else 0.0)
            initial = result.values("start")
            starts.append(statistics.mean(initial) if initial else None)
            hatches.append("//" if result.split == VALIDATION else "")
        bars = ax.bar(xs, means, width * 0.9, yerr=errors, capsize=3, label=f"{_label(grid.columns)} = {_label(column)}")
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        for x, start in zip(xs, starts):
            if start is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [start, start], color="black", linewidth=1.5)
    ax.set_xticks(range(len(rows)), ["\n".join(textwrap.fill(value, 30) for value in row) for row in rows], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy of the best prompt")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    simulated = any(s.simulated for r in shown for s in r.summaries)
    models = "; ".join(sorted({_model_of(r.summaries) for r in shown}))
    hatched = "; hatched: validation accuracy (one task of heterogeneous runs)" if any(
        r.split == VALIDATION for r in shown) else ""
    title = [f"{grid.path.stem}: {textwrap.shorten(models, 110)}", f"black lines: start prompt{hatched}"]
    ax.set_title("\n".join(title + ([SIM_NOTE] if simulated else [])), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", metavar="GRID.toml", help="the grid file (see experiments/cpu.toml)")
    parser.add_argument("--out", required=True, help="where the runs, logs and tables go; run again to resume")
    parser.add_argument("--app", default=".", help="the Flower app folder holding pyproject.toml (default: .)")
    parser.add_argument("--data-source", default=None, metavar="hub|synthetic|PATH",
                        help="where this machine's copy of the data is, replacing the grid file's data-source "
                        "(the experiment files say hub): e.g. ../shared/data, a folder holding bbh/<task>.json "
                        "and gsm8k/{train,test}.jsonl; a relative path is taken from the current folder. "
                        "Flower's simulation only")
    parser.add_argument("--tracker", default="none", choices=["none", "mlflow"],
                        help="also track the grid and each federation in MLflow (default: none)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI: a folder, sqlite:///FILE or "
                        "http://HOST:PORT (default: MLflow's ./mlruns)")
    parser.add_argument("--table-only", action="store_true", help="only (re)write table.md, table.csv and "
                        "figure.png from the finished cells")


def run(args: argparse.Namespace) -> int:
    grid = load_grid(Path(args.grid), data_source=args.data_source)
    out = Path(args.out).expanduser().resolve()
    app = Path(args.app).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise GridError(f"--app '{args.app}' holds no pyproject.toml; give the folder of this Flower app")
    if args.table_only:
        write_results(grid, out / "runs", out)
        return 0
    if grid.simulation and shutil.which("flwr") is None:
        raise GridError("the flwr command is not on PATH: install the project (pip install -e .) first")
    check_data(grid)

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so the cell's `flwr run` and the grid's SuperLink are stopped on the way out

    signal.signal(signal.SIGTERM, stop)
    try:
        outcomes = Runner(grid, out, app, tracker=args.tracker, tracking_uri=args.tracking_uri).run()
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} cell(s) failed; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0

