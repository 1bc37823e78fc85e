"""Run settings: Flower's flat run config turned into checked, typed data classes.

Every value is checked once, at start, so a typo stops the run with one line that
names the setting, the value and what is accepted, instead of failing rounds later.
The keys are those of ``[tool.flwr.app.config]`` in pyproject.toml; a SuperNode's
node config may override the client-side endpoint keys.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from fedtextgrad_core.data.loaders import MAX_SYNTHETIC_SIZE
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm.engine import BACKENDS, EndpointSettings
from fedtextgrad_core.method.local_training import LocalSettings
from fedtextgrad_core.method.merging import check_method, check_token_budget
from fedtextgrad_core.data.partitioning import PARTITIONINGS
from fedtextgrad_core.data.tasks import TASKS, format_for, get_task, start_prompt_for

Config = Mapping[str, object]

ENDPOINT_ROLES = ("llm", "backward", "server")
LEAKAGE_GUARDS = ("redact", "refuse", "off")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Upper bounds where a larger value is never meant and would stall a run instead of
# failing it: Python cannot sleep or wait on a socket for 1e300 seconds, and a million
# retries at the 8 s back-off cap is a hang.
MAX_TIMEOUT_SECONDS = 86_400.0  # one day per LLM call
MAX_RETRIES = 100
MAX_SIM_LATENCY_MS = 60_000.0  # one minute per simulated call


def _get(config: Config, key: str, default: object = None) -> object:
    return config.get(key, default)


def _finite(value: object) -> bool:
    """A real number (not a bool, NaN or infinity), which TOML config may also hold.

    Python ints are always finite; ``math.isfinite`` would overflow on one too big
    for a float, so ints are not passed to it.
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _positive_int(config: Config, key: str, default: int, most: int | None = None) -> int:
    value = _get(config, key, default)
    if not _finite(value) or int(value) != value or value < 1 or (most is not None and value > most):
        raise ConfigError(key, value, "a whole number of at least 1" + (f" and at most {most}" if most else ""))
    return int(value)


def _whole(config: Config, key: str, default: int, most: int | None = None) -> int:
    value = _get(config, key, default)
    if not _finite(value) or int(value) != value or value < 0 or (most is not None and value > most):
        raise ConfigError(key, value, "a whole number of at least 0" + (f" and at most {most}" if most else ""))
    return int(value)


def _non_negative_number(config: Config, key: str, default: float, most: float | None = None) -> float:
    value = _get(config, key, default)
    if not _finite(value) or value < 0 or (most is not None and value > most):
        raise ConfigError(key, value, "a number of at least 0" + (f" and at most {most:g}" if most else ""))
    try:
        return float(value)
    except OverflowError:  # an int beyond float range: only reachable without an upper bound
        raise ConfigError(key, value, "a number of at least 0 and below 1e308") from None


def _fraction(config: Config, key: str, default: float) -> float:
    value = _get(config, key, default)
    if not _finite(value) or not 0 < value <= 1:
        raise ConfigError(key, value, "a number in (0, 1]")
    return float(value)


def _bool(config: Config, key: str, default: bool) -> bool:
    value = _get(config, key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def text_setting(config: Config, key: str, default: str) -> str:
    """A quoted text value, trimmed. Control characters are refused: every text setting
    is a name, a path or a URL, where a NUL or a newline only ever causes a confusing
    failure later (an OS error on a path, a broken HTTP header)."""
    value = _get(config, key, default)
    if not isinstance(value, str):
        raise ConfigError(key, value, "a text value in quotes")
    value = value.strip()
    if _has_control(value):
        raise ConfigError(key, value, "text without control characters (no NUL, tab, newline or escape codes)")
    return value


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


def _url(key: str, value: str) -> str:
    """An http(s) URL with a host (and a valid port, if one is given), or empty."""
    if not value:
        return value
    accepted = "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ConfigError(key, value, accepted) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ConfigError(key, value, accepted)
    return value


def _choice(config: Config, key: str, default: str, accepted: tuple[str, ...]) -> str:
    value = text_setting(config, key, default)
    if value not in accepted:
        raise ConfigError(key, value, ", ".join(accepted))
    return value


def endpoint_settings(config: Config, role: str, fallback: EndpointSettings | None = None) -> EndpointSettings:
    """The endpoint for ``role`` ('llm', 'backward' or 'server') from flat config keys.

    Empty keys inherit from ``fallback``: the backward model defaults to the forward one.
    """
    base = fallback or EndpointSettings()
    key_env = _get(config, f"{role}-api-key-env", "")
    key_env = key_env.strip() if isinstance(key_env, str) else key_env
    if key_env != "" and not (isinstance(key_env, str) and _ENV_NAME.fullmatch(key_env)):
        # never repeat the value: it may be the key itself, pasted in the wrong place
        raise ConfigError(f"{role}-api-key-env", "<not shown>",
                          "the NAME of an environment variable (letters, digits and '_'), never the key itself")
    backend = text_setting(config, f"{role}-backend", "") or base.backend
    if backend not in BACKENDS:
        raise ConfigError(f"{role}-backend", backend, " or ".join(BACKENDS))
    settings = EndpointSettings(
        backend=backend,
        base_url=_url(f"{role}-base-url", text_setting(config, f"{role}-base-url", "")) or base.base_url,
        model=text_setting(config, f"{role}-model", "") or base.model,
        api_key_env=key_env or base.api_key_env,
        temperature=_non_negative_number(config, "llm-temperature", base.temperature),
        max_tokens=_positive_int(config, "llm-max-tokens", base.max_tokens),
        timeout=_non_negative_number(config, "llm-timeout", base.timeout, MAX_TIMEOUT_SECONDS) or base.timeout,
        concurrency=_positive_int(config, "llm-concurrency", base.concurrency),
        max_retries=_whole(config, "llm-max-retries", base.max_retries, MAX_RETRIES),
        retry_backoff=_non_negative_number(config, "llm-retry-backoff", base.retry_backoff),
        cache_path=text_setting(config, "llm-cache-path", base.cache_path),
        sim_latency_ms=_non_negative_number(config, "sim-latency-ms", base.sim_latency_ms, MAX_SIM_LATENCY_MS),
    )
    if settings.backend == "openai" and not settings.base_url:
        raise ConfigError(f"{role}-base-url", "", "the URL of an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) when the backend is openai")
    return settings


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, checked. Built from Flower's run config."""

    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 2
    seed: int = 0
    task: str = "object_counting"
    partitioning: str = "homogeneous"
    heterogeneous_tasks: tuple[str, ...] = ("object_counting", "word_sorting", "multistep_arithmetic_two")
    data_source: str = "synthetic"
    synthetic_size: int = 250
    local: LocalSettings = field(default_factory=LocalSettings)
    client_val_eval: bool = True
    merge: str = "summarize-uid"
    forward: EndpointSettings = field(default_factory=EndpointSettings)
    backward: EndpointSettings = field(default_factory=EndpointSettings)
    server: EndpointSettings = field(default_factory=EndpointSettings)
    results_dir: str = "results"
    run_name: str = ""
    # --- reliability and security (issue 6) ---
    resume_from: str = ""  # folder of an earlier, unfinished run to continue
    max_prompt_chars: int = 8000  # a client upload longer than this is rejected before merging
    robust_merge: bool = False  # score each upload on a server-side held-out set; leave out outliers
    robust_holdout_size: int = 12  # examples in that held-out set
    robust_margin: float = 0.2  # left out when scoring more than this below the median upload
    leakage_guard: str = "redact"  # redact | refuse | off: verbatim training text in an upload
    leakage_ngram: int = 8  # words in a row shared with a training example that count as a leak
    # --- scale (issue 5) ---
    merge_token_budget: int = 3000  # most tokens one summariser call reads; the merged prompt never exceeds it

    @property
    def tasks(self) -> list[str]:
        """The tasks in play: one per client when heterogeneous, else the one task."""
        return list(self.heterogeneous_tasks) if self.partitioning == "heterogeneous" else [self.task]

    @property
    def clients_needed(self) -> int:
        """Successful clients a round needs: one when centralized (one client holds all data)."""
        return 1 if self.partitioning == "centralized" else self.min_train_clients

    @property
    def format_instruction(self) -> str:
        return format_for(self.tasks)

    @property
    def start_prompt(self) -> str:
        return start_prompt_for(self.tasks)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Config) -> RunSettings:
        task = text_setting(config, "task", cls.task)
        get_task(task)
        partitioning = text_setting(config, "partitioning", cls.partitioning)
        if partitioning not in PARTITIONINGS:
            raise ConfigError("partitioning", partitioning, ", ".join(PARTITIONINGS))
        hetero = tuple(t.strip() for t in text_setting(config, "heterogeneous-tasks", ",".join(cls.heterogeneous_tasks)).split(",") if t.strip())
        if partitioning == "heterogeneous":
            if not hetero:
                raise ConfigError("heterogeneous-tasks", "", "a comma-separated list of tasks, one per client, from " + ", ".join(TASKS))
            for name in hetero:
                if name not in TASKS:
                    raise ConfigError("heterogeneous-tasks", name, "task names from " + ", ".join(TASKS))
        # A data path is checked where the data lives: on the clients, which may be other
        # machines than this one (each SuperNode may also name its own data-source).
        data_source = text_setting(config, "data-source", cls.data_source)
        if not data_source:
            raise ConfigError("data-source", data_source, "synthetic, hub, or a data file or folder")
        forward = endpoint_settings(config, "llm")
        settings = cls(
            num_rounds=_positive_int(config, "num-server-rounds", cls.num_rounds),
            fraction_train=_fraction(config, "fraction-train", cls.fraction_train),
            min_train_clients=_positive_int(config, "min-train-clients", cls.min_train_clients),
            seed=_whole(config, "seed", cls.seed),
            task=task,
            partitioning=partitioning,
            heterogeneous_tasks=hetero,
            data_source=data_source,
            synthetic_size=_positive_int(config, "synthetic-size", cls.synthetic_size, MAX_SYNTHETIC_SIZE),
            local=LocalSettings(
                steps=_positive_int(config, "local-steps", LocalSettings.steps),
                batch_size=_positive_int(config, "batch-size", LocalSettings.batch_size),
                proximal=_bool(config, "proximal", LocalSettings.proximal),
                seed=_whole(config, "seed", 0),
            ),
            client_val_eval=_bool(config, "client-val-eval", cls.client_val_eval),
            merge=check_method(text_setting(config, "merge", cls.merge)),
            forward=forward,
            backward=endpoint_settings(config, "backward", fallback=forward),
            server=endpoint_settings(config, "server"),
            results_dir=text_setting(config, "results-dir", cls.results_dir) or cls.results_dir,
            run_name=text_setting(config, "run-name", cls.run_name),
            resume_from=text_setting(config, "resume-from", cls.resume_from),
            max_prompt_chars=_positive_int(config, "max-prompt-chars", cls.max_prompt_chars),
            robust_merge=_bool(config, "robust-merge", cls.robust_merge),
            robust_holdout_size=_positive_int(config, "robust-holdout-size", cls.robust_holdout_size),
            robust_margin=_fraction(config, "robust-margin", cls.robust_margin),
            leakage_guard=_choice(config, "leakage-guard", cls.leakage_guard, LEAKAGE_GUARDS),
            leakage_ngram=_positive_int(config, "leakage-ngram", cls.leakage_ngram),
            merge_token_budget=_positive_int(config, "merge-token-budget", cls.merge_token_budget),
        )
        # a budget too small for the merge method is refused now, not at the first merge
        check_token_budget(settings.merge_token_budget, settings.merge, settings.format_instruction)
        return settings


def client_endpoints(run_config: Config, node_config: Config) -> tuple[EndpointSettings, EndpointSettings]:
    """A client's (forward, backward) endpoints: its node config first, then the run config.

    A site points its SuperNode at its own LLM server with node config such as
    ``llm-backend='openai' llm-base-url='http://127.0.0.1:8000/v1' llm-model='…'``.
    """
    merged = dict(run_config)
    merged.update({k: v for k, v in node_config.items() if k.startswith(("llm-", "backward-", "sim-"))})
    forward = endpoint_settings(merged, "llm")
    return forward, endpoint_settings(merged, "backward", fallback=forward)
