"""Run settings: Flower's flat run config turned into checked, typed records.

The keys, defaults, bounds and docs are those of ``run/schema.py`` (the one table of
settings); this module groups the checked values into what each part of the system
needs and checks what involves several settings at once. Every value is checked once,
at start, so a typo stops the run with one line instead of failing rounds later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from fedtextgrad_core.data.tasks import check_parser, format_for, start_prompt_for
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.method.local_training import LocalSettings
from fedtextgrad_core.method.merging import check_token_budget
from fedtextgrad_core.method.robust_merge import RobustSettings
from fedtextgrad_core.run import schema

Config = Mapping[str, object]

ENDPOINT_ROLES = ("llm", "backward", "server")


def endpoint_settings(config: Config, role: str, fallback: EndpointSettings | None = None) -> EndpointSettings:
    """The endpoint for ``role`` ('llm', 'backward' or 'server') from flat config keys.

    Empty keys inherit from ``fallback``: the backward model defaults to the forward one.
    """
    read = lambda key: schema.read(config, key)  # noqa: E731 - a short name for a long call
    key_env = read(f"{role}-api-key-env")
    backend = read(f"{role}-backend")
    base_url = read(f"{role}-base-url")
    model = read(f"{role}-model")
    if fallback is not None:
        backend = backend or fallback.backend
        base_url = base_url or fallback.base_url
        model = model or fallback.model
        key_env = key_env or fallback.api_key_env
    kind = read(f"{role}-server-kind") if f"{role}-server-kind" in schema.BY_KEY else ""
    if not kind:  # the backward endpoint inherits the kind when it is the same server
        kind = fallback.server_kind if fallback is not None and base_url == fallback.base_url else "auto"
    settings = EndpointSettings(
        backend=backend,
        base_url=base_url,
        model=model,
        api_key_env=key_env,
        temperature=read("llm-temperature"),
        max_tokens=read("llm-max-tokens"),
        timeout=read("llm-timeout"),
        server_kind=kind,
        startup_wait=read("llm-startup-wait"),
        concurrency=read("llm-concurrency"),
        max_retries=read("llm-max-retries"),
        retry_backoff=read("llm-retry-backoff"),
        cache_path=read("llm-cache-path"),
        sim_latency_ms=read("sim-latency-ms"),
    )
    if settings.backend == "openai" and not settings.base_url:
        raise ConfigError(f"{role}-base-url", "", "the URL of an OpenAI-compatible endpoint (e.g. "
                                                  "http://127.0.0.1:8000/v1) when the backend is openai")
    return settings


def server_endpoint(config: Config, forward: EndpointSettings) -> EndpointSettings:
    """The server's own endpoint. Unset, it is the run's forward endpoint when that is a real server
    (the merge then uses the model the clients are prompted with), else the simulator; the loop
    stops a run whose clients turn out to use real LLMs while the server merges with the simulator
    by default (see federation.py), so no real-model run is merged by a test double unasked."""
    if schema.read(config, "server-backend") or forward.simulated:
        fallback = replace(forward, backend="sim", base_url="", model="sim", api_key_env="")
        return endpoint_settings(config, "server", fallback=fallback)
    return endpoint_settings(config, "server", fallback=forward)


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, checked. Built from Flower's run config (and, on a client, its node config)."""

    num_rounds: int
    fraction_train: float
    min_train_clients: int
    wait_for_clients: float
    seed: int
    task: str
    partitioning: str
    heterogeneous_tasks: tuple[str, ...]
    data_source: str
    synthetic_size: int
    max_val_examples: int
    max_test_examples: int
    local: LocalSettings
    client_val_eval: bool
    test_prompts: tuple[str, ...]
    merge: str
    loss: str  # exact | judge
    gsm8k_split: str  # textgrad | fedtextgrad
    forward: EndpointSettings
    backward: EndpointSettings
    judge: EndpointSettings
    server: EndpointSettings
    server_set: bool  # server-backend was given; else the server took the run's llm-* endpoint or the simulator
    results_dir: str
    run_name: str
    resume_from: str  # folder of an earlier, unfinished run to continue
    tracker: str  # none | mlflow
    tracking_uri: str
    tracking_experiment: str
    tracking_parent_run: str
    max_prompt_chars: int  # a client upload longer than this is rejected before merging
    robust_merge: bool  # score each upload on a server-side held-out set; leave out outliers
    robust_holdout_size: int
    robust_margin: float
    leakage_guard: str  # redact | refuse | off: verbatim training text in an upload
    leakage_ngram: int
    merge_token_budget: int  # most tokens one summariser call reads; the merged prompt never exceeds it

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

    @property
    def robust(self) -> RobustSettings:
        return RobustSettings(tasks=self.tasks, seed=self.seed, holdout_size=self.robust_holdout_size,
                              margin=self.robust_margin, format_instruction=self.format_instruction)

    @property
    def server_llm_used(self) -> bool:
        return (self.merge != "concat" and self.partitioning != "centralized") or self.robust_merge

    @property
    def server_sim_by_default(self) -> bool:
        """The server would merge with the simulated LLM only because ``server-backend`` was left unset:
        such a run stops when a client answers with a real LLM (``Federation.check_server_llm``)."""
        return not self.server_set and self.server.simulated and self.server_llm_used

    @property
    def server_llm(self) -> str:
        """The server's LLM as the run header and summary name it."""
        if self.server_llm_used:
            return self.server.describe()
        return "none (centralized: no merge)" if self.partitioning == "centralized" else "none (concat needs no LLM)"

    @property
    def simulated(self) -> bool:
        """Whether any number of this run comes from the simulated LLM."""
        return "sim" in {self.forward.backend, self.backward.backend} or (
            self.server_llm_used and self.server.backend == "sim")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Config) -> RunSettings:
        schema.check_known(config)
        read = lambda key: schema.read(config, key)  # noqa: E731
        partitioning = read("partitioning")
        hetero = read("heterogeneous-tasks")
        if partitioning == "heterogeneous" and not hetero:
            raise ConfigError("heterogeneous-tasks", "", "a comma-separated list of tasks, one per client, from "
                              + ", ".join(schema.BY_KEY["task"].accepted()))
        # A data path is checked where the data lives: on the clients, which may be other
        # machines than this one (each SuperNode may also name its own data-source).
        data_source = read("data-source")
        if not data_source:
            raise ConfigError("data-source", data_source, "synthetic, hub, or a data file or folder")
        forward = endpoint_settings(config, "llm")
        settings = cls(
            num_rounds=read("num-server-rounds"),
            fraction_train=read("fraction-train"),
            min_train_clients=read("min-train-clients"),
            wait_for_clients=read("wait-for-clients"),
            seed=read("seed"),
            task=read("task"),
            partitioning=partitioning,
            heterogeneous_tasks=hetero,
            data_source=data_source,
            synthetic_size=read("synthetic-size"),
            max_val_examples=read("max-val-examples"),
            max_test_examples=read("max-test-examples"),
            local=LocalSettings(steps=read("local-steps"), batch_size=read("batch-size"), keep_rule=read("keep-rule"),
                                constrained_updates=read("constrained-updates") == "auto",
                                max_prompt_chars=read("max-prompt-chars"), seed=read("seed"),
                                parser=read("answer-parser")),
            loss=read("loss"),
            gsm8k_split=read("gsm8k-split"),
            client_val_eval=read("client-val-eval"),
            test_prompts=read("test-prompts"),
            merge=read("merge"),
            forward=forward,
            backward=(backward := endpoint_settings(config, "backward", fallback=forward)),
            judge=endpoint_settings(config, "judge", fallback=backward),
            server=server_endpoint(config, forward),
            server_set=bool(read("server-backend")),
            results_dir=read("results-dir") or schema.BY_KEY["results-dir"].default,
            run_name=read("run-name"),
            resume_from=read("resume-from"),
            tracker=read("tracker"),
            tracking_uri=read("tracking-uri"),
            tracking_experiment=read("tracking-experiment") or schema.BY_KEY["tracking-experiment"].default,
            tracking_parent_run=read("tracking-parent-run"),
            max_prompt_chars=read("max-prompt-chars"),
            robust_merge=read("robust-merge"),
            robust_holdout_size=read("robust-holdout-size"),
            robust_margin=read("robust-margin"),
            leakage_guard=read("leakage-guard"),
            leakage_ngram=read("leakage-ngram"),
            merge_token_budget=read("merge-token-budget"),
        )
        # a budget too small for the merge method is refused now, not at the first merge
        check_token_budget(settings.merge_token_budget, settings.merge, settings.format_instruction)
        check_parser(settings.local.parser, settings.tasks)
        return settings


def real_clients_need_a_server_llm(client: str) -> ConfigError:
    """The line that stops a run whose server would merge with the simulated LLM by default while
    ``client`` (e.g. "client 2 uses llama3 at http://...") uses a real one: its merged prompts would be
    a test double's."""
    return ConfigError("server-backend", "", (
        f"the server's own LLM when clients use real ones ({client}): set server-backend='openai' with "
        "server-base-url and server-model, or the run's llm-backend/llm-base-url/llm-model for the server to use, "
        "or server-backend='sim' to merge with the simulated LLM on purpose"))


def defaults() -> RunSettings:
    """The settings of a run that sets nothing: every default of the schema."""
    return RunSettings.from_config({})


def default_endpoint(**changes: object) -> EndpointSettings:
    """The forward endpoint a run gets by default, with ``changes``: for tools and tests."""
    return replace(defaults().forward, **changes)  # type: ignore[arg-type]


def client_config(run_config: Config, node_config: Config) -> dict[str, object]:
    """The config a client runs under: the run's, with the keys its SuperNode may set taken from
    the node config (``schema.node_overrides`` refuses any other key)."""
    return {**run_config, **schema.node_overrides(node_config)}


@lru_cache(maxsize=64)
def _client_settings(run_items: tuple, node_items: tuple) -> RunSettings:
    return RunSettings.from_config(client_config({k: v for k, _, v in run_items}, {k: v for k, _, v in node_items}))


def _typed_items(config: Config) -> tuple:
    """The config as a cache key that tells 1, 1.0 and True apart (Python finds them equal)."""
    return tuple(sorted((key, type(value).__name__, value) for key, value in config.items()))


def client_settings(run_config: Config, node_config: Config) -> RunSettings:
    """A client's settings, parsed once per process for a given run and node config.

    Flower hands every message the same run and node config; a simulated client process
    answers many messages, so it parses them once instead of once per message.
    """
    try:
        return _client_settings(_typed_items(run_config), _typed_items(node_config))
    except TypeError:  # an unhashable value (not something Flower produces): parse without the cache
        return RunSettings.from_config(client_config(run_config, node_config))
