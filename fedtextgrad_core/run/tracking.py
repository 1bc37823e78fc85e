"""Optional experiment tracking: each federation as one MLflow run, beside the run folder.

The run folder stays the record of a run; a tracker only copies it, as it is written, to where many
runs can be compared (the MLflow UI). So tracking never costs a federation more than a few
milliseconds a round: ``tracker = none`` (the default) never imports MLflow; ``MlflowTracker``
says its first failure in one line and switches itself off, never raising into the federation;
every MLflow call is bounded in time (``HTTP_TIMEOUT_SECONDS``). It talks to MLflow through
``MlflowClient`` with explicit run ids, never the fluent ``mlflow.start_run`` state, which is one
global per process. What is logged, under which names, and how a resumed federation continues its
own run (its id in ``RUN_ID_FILE``): docs/experiments.md, "Experiment tracking (MLflow)".
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from fedtextgrad_core.errors import ConfigError, FedTextGradError
from fedtextgrad_core.stats import Interval

if TYPE_CHECKING:
    from fedtextgrad_core.run.records import RoundRecord, RunSummary
    from fedtextgrad_core.run.settings import RunSettings

Echo = Callable[[str], None]

TRACKERS = ("none", "mlflow")
DEFAULT_EXPERIMENT = "fedtextgrad"
STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_ID_FILE = "mlflow-run.json"  # in a run folder (or a grid's output folder): the MLflow run to resume

# How long one MLflow call may take against an http(s):// tracking server. MLflow's own
# defaults (120 s per request, 7 retries with exponential back-off) add up to many minutes
# on a server that does not answer; a tracker must not hold a federation that long. With
# these bounds a request waits at most HTTP_TIMEOUT_SECONDS to connect and as long again
# for an answer, and is tried 1 + HTTP_MAX_RETRIES times: at most about 20 s for the one
# call that finds the server gone, after which the tracker is off (it does not even try to
# mark the run FAILED then: the server is the thing that is gone). Before that, at start,
# the server's port is tried with a plain connection of CONNECT_PROBE_SECONDS, so a server
# that is not there at all costs only that. Values the user set in the environment
# (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
# MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR) win over these. Local stores (a folder, SQLite) need
# no bound: they fail at once.
HTTP_TIMEOUT_SECONDS = 5
HTTP_MAX_RETRIES = 1
HTTP_BACKOFF_FACTOR = 1
CONNECT_PROBE_SECONDS = 3.0

# MLflow's limits (mlflow.utils.validation), fixed here so the limits are known without importing it.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
MAX_KEY_CHARS = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_REASON_CHARS = 240

# The environment is one per process and MLflow reads its settings from it on every call:
# trackers in several threads take turns, so one never sees another's values half set.
_ENV_LOCK = threading.RLock()


class TrackingError(FedTextGradError):
    """The tracking store cannot be used; the message says why, in one line."""


class Tracker(Protocol):
    """What the recorder tells a tracker as a run goes. No call may raise or hold the run up."""

    def start(self, settings: RunSettings, run_config: Mapping[str, object], run_folder: Path) -> None: ...

    def log_initial(self, accuracy: float | None) -> None: ...

    def log_round(self, record: RoundRecord) -> None: ...

    def finish(self, summary: RunSummary, run_folder: Path) -> None: ...

    def fail(self, error: str, run_folder: Path) -> None: ...


class NoTracker:
    """``tracker = none``: the run folder is the only record, and MLflow is never imported."""

    def start(self, settings: RunSettings, run_config: Mapping[str, object], run_folder: Path) -> None:
        pass

    def log_initial(self, accuracy: float | None) -> None:
        pass

    def log_round(self, record: RoundRecord) -> None:
        pass

    def finish(self, summary: RunSummary, run_folder: Path) -> None:
        pass

    def fail(self, error: str, run_folder: Path) -> None:
        pass


def make_tracker(kind: str, uri: str = "", experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str = "",
                 echo: Echo = print) -> Tracker:
    """The tracker the ``tracker`` setting names. An unknown name is a setting to fix, so it stops
    the run at start; anything that goes wrong with MLflow itself later never does."""
    kind = (kind or "none").strip().lower()
    if kind == "none":
        return NoTracker()
    if kind == "mlflow":
        return MlflowTracker(uri, experiment, parent_run_id, echo)
    raise ConfigError("tracker", kind, " or ".join(TRACKERS))


# --- talking to MLflow -------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def store_uri(uri: str) -> str:
    """``uri`` as MLflow takes it: a folder path becomes an absolute ``file://`` URI (resolved now,
    against this process's folder, so a later change of folder cannot move the store); URIs
    and the empty string (MLflow's default) are kept."""
    uri = uri.strip()
    if not uri or _SCHEME.match(uri) or uri.startswith("databricks"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def shown_uri(uri: str) -> str:
    """The URI without a user name or password, for messages: a message may end up in a log."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<the tracking-uri>"
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def _network_failure(exc: BaseException) -> str:
    """'read', 'connect' or 'refused' when ``exc`` says the tracking server could not be reached
    or did not answer (MLflow wraps these in its own exception, so its text is what tells);
    empty for any other failure."""
    text = str(exc)
    if isinstance(exc, TrackingError) and text.startswith("cannot connect"):
        return "refused"
    if "ReadTimeout" in text or "Read timed out" in text:
        return "read"
    if "ConnectTimeout" in text:
        return "connect"
    if "NewConnectionError" in text or "Connection refused" in text or "ConnectionError" in text:
        return "refused"
    return ""


def _reason(exc: BaseException, store: _Store) -> str:
    """One short line saying what went wrong: MLflow's messages run to paragraphs, and the usual
    network failures are said plainly instead of as a chain of urllib3 exceptions."""
    text = str(exc)
    network = _network_failure(exc)
    if isinstance(exc, TrackingError):
        reason = text
    elif isinstance(exc, ImportError) and exc.name == "mlflow":
        reason = "the mlflow package is not installed (pip install mlflow)"
    elif network == "read":
        reason = f"the server did not answer within {store.http_timeout} s"
    elif network == "connect":
        reason = f"could not connect within {store.http_timeout} s"
    elif network == "refused":
        reason = "could not connect (connection refused)"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    try:
        password = urlsplit(store.uri).password
    except ValueError:
        password = None
    if password:
        reason = reason.replace(password, "***")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def _cut(text: str, limit: int) -> str:
    """``text`` within MLflow's ``limit``, saying how long it was when it had to be cut."""
    if len(text) <= limit:
        return text
    marker = f"...[cut: {len(text)} characters in all]"
    return text[: limit - len(marker)] + marker


def _key(name: str) -> str:
    """A param, metric or tag name MLflow accepts: letters, digits, ``_ - . space`` (others become ``_``)."""
    return re.sub(r"[^\w.\- ]", "_", str(name))[:MAX_KEY_CHARS] or "_"


def _tag_key(name: str) -> str:
    """MLflow's own tags (``mlflow.parentRunId``) keep their names; others are made acceptable."""
    return name if name.startswith("mlflow.") else _key(name)


def _text(value: object) -> str:
    """A setting's value as text, spelled as in the run config (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _probe(uri: str, seconds: float) -> None:
    """Refuse an http(s) tracking server whose port does not take a connection within ``seconds``.
    Skipped when a proxy would carry the requests: then only the proxy can say."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    host = parts.hostname
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=seconds):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise TrackingError(f"cannot connect to {host}:{port} within {seconds:g} s ({why})") from None


class _Store:
    """One MLflow tracking store: the client for ``uri`` and the environment its calls run in."""

    def __init__(self, uri: str, http_timeout: int = HTTP_TIMEOUT_SECONDS, http_retries: int = HTTP_MAX_RETRIES):
        self.uri = store_uri(uri)
        self.shown = shown_uri(self.uri) if self.uri else "MLflow's default store"
        self.http_timeout = max(1, int(http_timeout))
        self.http_retries = max(0, int(http_retries))
        self.client: Any = None
        self._env = {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.http_timeout),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(HTTP_BACKOFF_FACTOR),
        }

    def open(self) -> None:
        """Import MLflow (only now: it is optional, and slow to import) and reach the store. Calls
        made after this go inside ``bounded()``, which from now on also holds what the store needs."""
        import mlflow

        if not self.uri:  # MLflow's own default: MLFLOW_TRACKING_URI, else a local store in this folder
            self.uri = mlflow.get_tracking_uri()
            self.shown = shown_uri(self.uri)
        if self.uri.startswith("file:"):
            # MLflow 3 refuses folder stores unless this is set; naming a folder as the
            # tracking-uri is that choice, made for the tracker's own calls only
            self._env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        _probe(self.uri, min(CONNECT_PROBE_SECONDS, float(self.http_timeout)))
        with self.bounded():
            self.client = mlflow.MlflowClient(tracking_uri=self.uri)

    @contextmanager
    def bounded(self, **overrides: str) -> Iterator[None]:
        """Run MLflow calls with this store's environment: the time bounds, and (for a folder store)
        MLflow's opt-in. Values already in the environment are the user's and are kept."""
        wanted = {**self._env, **overrides}
        with _ENV_LOCK:
            added = [name for name in wanted if name not in os.environ]
            for name in added:
                os.environ[name] = wanted[name]
            try:
                yield
            finally:
                for name in added:
                    os.environ.pop(name, None)

    def experiment_id(self, name: str) -> str:
        """The experiment called ``name``, created when it does not exist yet."""
        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return str(client.create_experiment(name))
            except Exception:
                # another process (a grid's next cell) may have created it in between
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"the MLflow experiment '{name}' is deleted; restore it or set another "
                                f"tracking-experiment")
        return str(experiment.experiment_id)

    def log(self, run_id: str, metrics: Mapping[str, float | None] | None = None, step: int = 0,
            timestamp: float | None = None, params: Mapping[str, object] | None = None,
            tags: Mapping[str, object] | None = None) -> None:
        """Metrics, params and tags in as few requests as MLflow's batch limits allow. A metric
        without a value (an accuracy nobody measured) is left out, not logged as 0."""
        from mlflow.entities import Metric, Param, RunTag

        millis = int((timestamp if timestamp and timestamp > 0 else time.time()) * 1000)
        metric_list = [Metric(_key(name), float(value), millis, step) for name, value in (metrics or {}).items()
                       if value is not None and not math.isnan(value)]
        param_list = [Param(_key(name), _cut(_text(value), MAX_PARAM_CHARS)) for name, value in (params or {}).items()]
        tag_list = [RunTag(_tag_key(name), _cut(_text(value), MAX_TAG_CHARS)) for name, value in (tags or {}).items()]
        for start in range(0, len(metric_list), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metric_list[start:start + METRICS_PER_BATCH], synchronous=True)
        for start in range(0, len(param_list), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=param_list[start:start + PARAMS_PER_BATCH], synchronous=True)
        for start in range(0, len(tag_list), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=tag_list[start:start + PARAMS_PER_BATCH], synchronous=True)

    def log_folder(self, run_id: str, folder: Path) -> None:
        """The run folder's files at the top of the run's artifacts (``prompts/`` lands beside the
        merged prompts already logged, with the same names)."""
        if folder.is_dir():
            self.client.log_artifacts(run_id, str(folder))

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def find_run(self, run_id: str) -> Any:
        """The MLflow run ``run_id``, or None for an unknown or malformed id; any other error is
        the store's, and is raised (the caller reports it as a tracking failure)."""
        try:
            return self.client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def remember(self, folder: Path, run_id: str, experiment_id: str) -> None:
        """Keep the run's id in ``folder``, for a resume to find."""
        record = {"run_id": run_id, "tracking_uri": self.uri, "experiment_id": experiment_id}
        (folder / RUN_ID_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def reopen(self, folder: Path, experiment_id: str) -> str | None:
        """The run remembered in ``folder``, set back to RUNNING, if it is in this store and
        experiment and not deleted; None otherwise (a new run is made then)."""
        try:
            record = json.loads((folder / RUN_ID_FILE).read_text(encoding="utf-8"))
            run_id = str(record["run_id"])
            if record.get("tracking_uri") != self.uri or str(record.get("experiment_id")) != experiment_id:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        run = self.find_run(run_id)
        if run is None or run.info.lifecycle_stage != "active" or str(run.info.experiment_id) != experiment_id:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def reopen_or_create(self, folder: Path | None, experiment_id: str, create: Callable[[], str],
                         reopen: bool = True) -> tuple[str, bool]:
        """The run remembered in ``folder`` when ``reopen`` finds it there, else a new one from
        ``create``, remembered in ``folder``: a resumed federation or grid continues its own run
        instead of leaving a second, half-empty one. Also says whether the run was reopened."""
        run_id = self.reopen(folder, experiment_id) if folder is not None and reopen else None
        if run_id is not None:
            return run_id, True
        run_id = create()
        if folder is not None:
            self.remember(folder, run_id, experiment_id)
        return run_id, False


# --- one federation, one MLflow run ------------------------------------------------------------------


def _round_usage(record: RoundRecord) -> tuple[int, int]:
    """(tokens, LLM calls) of one round: client training, client evaluation, the server's own LLM."""
    tokens = calls = 0
    usages = [upload.reply.val_usage for upload in record.uploads]
    usages += [evaluation.reply.usage for evaluation in record.evaluations]
    usages.append(record.server_llm)
    for upload in record.uploads:
        local = upload.reply.local
        tokens += local.prompt_tokens + local.completion_tokens
        calls += local.llm_calls
    for usage in usages:
        if usage is not None:
            tokens += usage.prompt_tokens + usage.completion_tokens
            calls += usage.calls
    return tokens, calls


def round_metrics(record: RoundRecord) -> dict[str, float | None]:
    """The numbers of one round, as logged at step = the round."""
    tokens, calls = _round_usage(record)
    return {
        "val_accuracy": record.val_accuracy,
        "best_val_accuracy": record.best_val_accuracy,
        "val_examples": record.val_examples,
        "tokens": tokens,
        "llm_calls": calls,
        "rewrites_accepted": sum(upload.reply.local.steps_accepted for upload in record.uploads),
        "steps": sum(upload.reply.local.steps for upload in record.uploads),
        "clients": len(record.uploads),
        "clients_left_out": sum(1 for upload in record.uploads if upload.left_out),
        "failures": len(record.failures),
        "merged_prompt_chars": len(record.merged_prompt),
        "round_seconds": record.seconds,
        **interval_metrics("val_accuracy", record.val_interval),
    }


def interval_metrics(name: str, interval: Interval | None) -> dict[str, float | None]:
    """``<name>_low`` and ``<name>_high``: the 95% Wilson interval beside an accuracy (none unrecorded)."""
    if interval is None or not interval.n:
        return {}
    return {f"{name}_low": interval.low, f"{name}_high": interval.high}


def comparison_metrics(summary: RunSummary) -> tuple[dict[str, float | None], dict[str, object]]:
    """Each paired comparison of the summary (``best vs initial``, ...) as metrics ``<name>_difference``,
    ``_low``, ``_high``, ``_p_value`` and a tag with its verdict (better / worse / no detectable difference)."""
    metrics: dict[str, float | None] = {}
    tags: dict[str, object] = {}
    for label, comparison in sorted(summary.comparisons.items()):
        name = "_".join(label.split())
        metrics.update({f"{name}_difference": comparison.difference, f"{name}_low": comparison.low,
                        f"{name}_high": comparison.high, f"{name}_p_value": comparison.p_value})
        tags[name] = comparison.verdict
    return metrics, tags


def summary_metrics(summary: RunSummary) -> dict[str, float | None]:
    """The numbers of the finished run, as logged once at the end."""
    metrics: dict[str, float | None] = {
        "test_accuracy": summary.test_accuracy,
        "test_examples": summary.test_examples,
        "best_val_accuracy": summary.best_val_accuracy,
        "best_round": summary.best_round,
        "initial_val_accuracy": summary.initial_val_accuracy,
        "rounds": summary.rounds,
        **interval_metrics("test_accuracy", summary.test_intervals.get("best")),
        **interval_metrics("best_val_accuracy", summary.best_val_interval),
        **interval_metrics("initial_val_accuracy", summary.initial_val_interval),
        **comparison_metrics(summary)[0],
    }
    for part, spent in sorted(summary.cost.items()):
        for what, amount in sorted(spent.items()):
            metrics[f"cost_{part}_{what}"] = amount
    return metrics


class MlflowTracker:
    """``tracker = mlflow``: one MLflow run per federation, in ``experiment`` at ``uri``.

    Every public call is guarded: the first failure is reported in one line through
    ``echo``, the MLflow run is marked FAILED if the store can still be reached (one more
    call, without retries), and the tracker is off from then on, silently. The federation
    never sees an exception.

    ``http_timeout`` and ``http_retries`` bound each request to an http(s) server (see
    ``HTTP_TIMEOUT_SECONDS``); tests set them lower.
    """

    def __init__(self, uri: str = "", experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str = "",
                 echo: Echo = print, *, http_timeout: int = HTTP_TIMEOUT_SECONDS,
                 http_retries: int = HTTP_MAX_RETRIES):
        self.store = _Store(uri, http_timeout, http_retries)
        self.experiment = experiment.strip() or DEFAULT_EXPERIMENT
        self.parent_run_id = parent_run_id.strip()
        self.echo = echo
        self.run_id: str | None = None  # the MLflow run, once started (kept after it ended, to be found)
        self.ended = False
        self.disabled = False
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether calls still reach MLflow: started, not ended, and not switched off by a failure."""
        return self.run_id is not None and not self.ended and not self.disabled

    # --- the Tracker calls: each one guarded -----------------------------------------------------------
    def start(self, settings: RunSettings, run_config: Mapping[str, object], run_folder: Path) -> None:
        self._guarded(self._start, settings, run_config, Path(run_folder), needs_run=False)

    def log_initial(self, accuracy: float | None) -> None:
        self._guarded(self._log_initial, accuracy)

    def log_round(self, record: RoundRecord) -> None:
        self._guarded(self._log_round, record)

    def finish(self, summary: RunSummary, run_folder: Path) -> None:
        self._guarded(self._finish, summary, Path(run_folder))

    def fail(self, error: str, run_folder: Path) -> None:
        self._guarded(self._fail, error, Path(run_folder))

    def _guarded(self, call: Callable[..., None], *args: Any, needs_run: bool = True) -> None:
        with self._lock:
            if self.disabled or (needs_run and not self.active):
                return
            try:
                with self.store.bounded():
                    call(*args)
            except Exception as exc:
                self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        """Say once why tracking stopped, and leave the MLflow run marked FAILED rather than
        RUNNING forever: best effort, with no retries, and not tried when the server itself is
        out of reach (that would only cost the run the same wait again)."""
        self.disabled = True
        self.echo(f"tracking: MLflow at {self.store.shown} failed ({_reason(exc, self.store)}); "
                  f"the run goes on without tracking")
        if self.run_id is None or self.ended or self.store.client is None or _network_failure(exc):
            return
        with self.store.bounded(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
            try:
                self.store.end(self.run_id, "FAILED")
                self.store.log(self.run_id, tags={"tracking_error": _reason(exc, self.store)})
            except Exception:
                pass

    # --- what each call does ---------------------------------------------------------------------------
    def _start(self, settings: RunSettings, run_config: Mapping[str, object], run_folder: Path) -> None:
        store = self.store
        store.open()
        with store.bounded():
            experiment_id = store.experiment_id(self.experiment)
            self.run_id, resumed = store.reopen_or_create(
                run_folder, experiment_id, lambda: self._create_run(settings, run_config, run_folder, experiment_id),
                reopen=bool(settings.resume_from))
        self.echo(f"tracking: MLflow run {self.run_id}{' (resumed)' if resumed else ''} in experiment "
                  f"'{self.experiment}' at {store.shown}")

    def _create_run(self, settings: RunSettings, run_config: Mapping[str, object], run_folder: Path,
                    experiment_id: str) -> str:
        store = self.store
        tags: dict[str, object] = {
            "task": ",".join(settings.tasks),
            "partitioning": settings.partitioning,
            "merge": settings.merge,
            "client_llm": settings.forward.describe(),
            "server_llm": settings.server_llm,
            "simulated": settings.simulated,
            "results_folder": str(run_folder),
        }
        if self.parent_run_id:
            if self.store.find_run(self.parent_run_id) is not None:
                tags["mlflow.parentRunId"] = self.parent_run_id
            else:
                self.echo(f"tracking: parent run {self.parent_run_id} is not in {store.shown}; this run is "
                          f"tracked on its own")
        run = store.client.create_run(experiment_id, run_name=run_folder.name,
                                      tags={_tag_key(name): _cut(_text(value), MAX_TAG_CHARS)
                                            for name, value in tags.items()})
        self.run_id = str(run.info.run_id)  # before the params: if they fail, _give_up marks this run FAILED
        store.log(self.run_id, params=dict(run_config))
        return self.run_id

    def _log_initial(self, accuracy: float | None) -> None:
        assert self.run_id is not None
        self.store.log(self.run_id, {"val_accuracy": accuracy}, step=0)

    def _log_round(self, record: RoundRecord) -> None:
        assert self.run_id is not None
        self.store.log(self.run_id, round_metrics(record), step=record.round, timestamp=record.ended_at or None)
        self.store.client.log_text(self.run_id, record.merged_prompt, f"prompts/round-{record.round:03d}-merged.txt")

    def _finish(self, summary: RunSummary, run_folder: Path) -> None:
        assert self.run_id is not None
        tags: dict[str, object] = {"client_llms": ", ".join(sorted(set(summary.client_llms.values()))),
                                   "simulated": summary.simulated}  # as the clients reported their LLMs
        if summary.error:
            tags["error"] = summary.error
        tags.update(comparison_metrics(summary)[1])
        self.store.log(self.run_id, summary_metrics(summary), step=summary.rounds, tags=tags)
        self.store.client.log_text(self.run_id, summary.best_prompt, "prompts/best.txt")
        self.store.log_folder(self.run_id, run_folder)
        self.store.end(self.run_id, "FINISHED")
        self.ended = True

    def _fail(self, error: str, run_folder: Path) -> None:
        assert self.run_id is not None
        self.store.log(self.run_id, tags={"error": error or "the run stopped"})
        self.store.log_folder(self.run_id, run_folder)
        self.store.end(self.run_id, "FAILED")
        self.ended = True


# --- the experiment grid's parent run ----------------------------------------------------------------


def start_parent(uri: str, experiment: str, name: str, params: Mapping[str, object],
                 echo: Echo = print, folder: Path | None = None) -> str | None:
    """A parent run for an experiment grid (each cell's federation becomes its child through
    ``tracking-parent-run``); its id, or None when MLflow cannot be used (said in one line).
    With ``folder`` (the grid's output folder) the parent of an earlier, interrupted run of
    the grid is continued instead of starting another."""
    store = _Store(uri)
    try:
        store.open()
        with store.bounded():
            experiment_id = store.experiment_id(experiment.strip() or DEFAULT_EXPERIMENT)

            def create() -> str:
                run = store.client.create_run(experiment_id, run_name=name, tags={"kind": "experiment-grid"})
                store.log(str(run.info.run_id), params=params)
                return str(run.info.run_id)

            run_id, _ = store.reopen_or_create(folder, experiment_id, create)
    except Exception as exc:
        echo(f"tracking: MLflow at {store.shown} failed ({_reason(exc, store)}); the grid goes on without "
             f"tracking")
        return None
    return run_id


def finish_parent(uri: str, run_id: str | None, status: str = "FINISHED", artifacts_dir: Path | str | None = None,
                  echo: Echo = print) -> None:
    """End the grid's parent run with ``status`` (FINISHED, FAILED or KILLED), with the files of
    ``artifacts_dir`` (the grid's results) as its artifacts. No parent (None): nothing to do.
    A failure is said in one line, never raised: the grid's results are already on disk."""
    status = status.strip().upper()
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if not run_id:
        return
    store = _Store(uri)
    try:
        store.open()
        with store.bounded():
            if artifacts_dir is not None:
                store.log_folder(run_id, Path(artifacts_dir))
            store.end(run_id, status)
    except Exception as exc:
        echo(f"tracking: MLflow at {store.shown} failed to end the grid's run {run_id} ({_reason(exc, store)})")
