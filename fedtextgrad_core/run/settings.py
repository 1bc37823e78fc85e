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

# the endpoint of each role (schema.ROLES), by its RunSettings field
ENDPOINT_FIELDS = {"llm": "forward", "backward": "backward", "judge": "judge", "server": "server"}
_INHERITED = ("backend", "base_url", "model", "api_key_env")  # empty: the fallback endpoint's


def endpoint_settings(config: Config, role: str, fallback: EndpointSettings | None = None) -> EndpointSettings:
    """The endpoint for ``role`` (one of schema.ROLES) from flat config keys.

    Empty keys inherit from ``fallback``: the backward model defaults to the forward one. A role
    without a server-kind setting, or with it empty, takes the fallback's kind when it is the same
    server, else 'auto'.
    """
    own = schema.values(config, role)
    if fallback is not None:
        for name in _INHERITED:
            own[name] = own[name] or getattr(fallback, name)
    if not own.get("server_kind"):
        same_server = fallback is not None and own["base_url"] == fallback.base_url
        own["server_kind"] = fallback.server_kind if fallback is not None and same_server else "auto"
    settings = EndpointSettings(**own, **schema.values(config, schema.ENDPOINT))
    if settings.backend == "openai" and not settings.base_url:
        raise ConfigError(f"{role}-base-url", "", "the URL of an OpenAI-compatible endpoint (e.g. "
                                                  "http://127.0.0.1:8000/v1) when the backend is openai")
    return settings


def server_endpoint(config: Config, forward: EndpointSettings) -> EndpointSettings:
    """The server's own endpoint. Unset, it is the run's forward endpoint when that is a real server
    (the merge then uses the model the clients are prompted with), else the simulator; the loop
    stops a run whose clients turn out to use real LLMs while the server merges with the simulator
    by default (see federation.py), so no real-model run is merged by a test double unasked."""
    if schema.BY_KEY["server-backend"].read(config) or forward.simulated:
        fallback = replace(forward, backend="sim", base_url="", model="sim", api_key_env="")
        return endpoint_settings(config, "server", fallback=fallback)
    return endpoint_settings(config, "server", fallback=forward)


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, checked. Built from Flower's run config (and, on a client, its node config).

    One field per setting of the table (schema.py; the docs of each are there), and the four endpoints,
    each built from its role's settings; the records other modules take are derived from the fields."""

    # the federation
    num_rounds: int
    fraction_train: float
    min_train_clients: int
    seed: int
    wait_for_clients: float
    # the task and its data
    task: str
    partitioning: str
    heterogeneous_tasks: tuple[str, ...]
    gsm8k_split: str
    data_source: str
    synthetic_size: int
    max_val_examples: int
    max_test_examples: int
    # local TextGrad steps
    local_steps: int
    batch_size: int
    keep_rule: str
    loss: str
    answer_parser: str
    client_val_eval: bool
    test_prompts: tuple[str, ...]
    constrained_updates: str
    sequential_feedback: bool
    # merging
    merge: str
    best_rule: str
    start_eval_repeats: int
    merge_token_budget: int
    # untrusted uploads and private data
    max_prompt_chars: int
    robust_merge: bool
    robust_holdout_size: int
    robust_margin: float
    leakage_guard: str
    leakage_ngram: int
    allow_run_config: tuple[str, ...]
    # results
    results_dir: str
    run_name: str
    resume_from: str
    debug: bool
    tracker: str
    tracking_uri: str
    tracking_experiment: str
    tracking_parent_run: str
    # the endpoints (schema.ROLES)
    forward: EndpointSettings
    backward: EndpointSettings
    judge: EndpointSettings
    server: EndpointSettings
    server_set: bool  # server-backend was given; else the server took the run's llm-* endpoint or the simulator

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
    def local(self) -> LocalSettings:
        """What a client's local steps need."""
        return LocalSettings(steps=self.local_steps, batch_size=self.batch_size, keep_rule=self.keep_rule,
                             seed=self.seed, constrained_updates=self.constrained_updates == "auto",
                             max_prompt_chars=self.max_prompt_chars, parser=self.answer_parser,
                             sequential_feedback=self.sequential_feedback)

    @property
    def robust(self) -> RobustSettings:
        return RobustSettings(tasks=self.tasks, holdout_size=self.robust_holdout_size, margin=self.robust_margin,
                              format_instruction=self.format_instruction)

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
        values = schema.values(config, schema.RUN)
        if values["partitioning"] == "heterogeneous" and not values["heterogeneous_tasks"]:
            raise ConfigError("heterogeneous-tasks", "", "a comma-separated list of tasks, one per client, from "
                              + ", ".join(schema.BY_KEY["task"].accepted()))
        # A data path is checked where the data lives: on the clients, which may be other
        # machines than this one (each SuperNode may also name its own data-source).
        if not values["data_source"]:
            raise ConfigError("data-source", "", "synthetic, hub, or a data file or folder")
        forward = endpoint_settings(config, "llm")
        backward = endpoint_settings(config, "backward", fallback=forward)
        settings = cls(**values, forward=forward, backward=backward,
                       judge=endpoint_settings(config, "judge", fallback=backward),
                       server=server_endpoint(config, forward),
                       server_set=bool(schema.BY_KEY["server-backend"].read(config)))
        # a budget too small for the merge method is refused now, not at the first merge
        check_token_budget(settings.merge_token_budget, settings.merge, settings.format_instruction)
        check_parser(settings.answer_parser, settings.tasks)
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


def client_config(run_config: Config, node_config: Config, pinned: bool = True) -> dict[str, object]:
    """The config a client runs under: the run's, with the keys its SuperNode may set taken from the node
    config (``schema.node_overrides`` refuses any other key).

    ``pinned`` (a deployment): the site settings (schema.SITE) come from the node config or their default.
    A run config that gives one another value is refused with one line, unless the node config's
    allow-run-config names it (then the run's value is used, and the node's is the default); a run
    config that leaves it at the app's default has not set it.
    Without ``pinned`` (Flower's simulation, where every client is the submitter's), the run config may
    set them, and the node config still wins.
    """
    node = schema.node_overrides(node_config)
    config = {**run_config, **node}
    if not pinned:
        return config
    allowed = set(schema.BY_KEY["allow-run-config"].read(node))
    for setting in (s for s in schema.SETTINGS if s.pinned):
        key = setting.key
        site_value = node.get(key, setting.default)
        config[key] = site_value
        if key not in run_config:
            continue
        asked = setting.read(run_config)  # a value the run may not set at all is refused here
        if asked == setting.read({}):
            continue  # the app's default: the run did not set it
        if key in allowed:
            config[key] = run_config[key]
        elif asked != setting.read({key: site_value}):
            raise ConfigError(key, run_config[key], pinned_by_site(key))
    return config


def pinned_by_site(key: str) -> str:
    """What a site accepts for a setting it pins: the line that refuses a run config's value."""
    return (f"the value this site set in its SuperNode's node config, or the default: '{key}' decides where a site's "
            "data, prompts or keys go or how they are guarded, so in a deployment the site sets it, not the run "
            f"config (a site may let runs set it with --node-config \"allow-run-config='{key}'\")")


@lru_cache(maxsize=64)
def _client_settings(run_items: tuple[tuple[str, str, object], ...], node_items: tuple[tuple[str, str, object], ...],
                     pinned: bool) -> RunSettings:
    return RunSettings.from_config(client_config({k: v for k, _, v in run_items}, {k: v for k, _, v in node_items},
                                                  pinned))


def _typed_items(config: Config) -> tuple[tuple[str, str, object], ...]:
    """The config as a cache key that tells 1, 1.0 and True apart (Python finds them equal)."""
    return tuple(sorted((key, type(value).__name__, value) for key, value in config.items()))


def client_settings(run_config: Config, node_config: Config, pinned: bool = True) -> RunSettings:
    """A client's settings (``client_config``), parsed once per process for a given run and node config.

    Flower hands every message the same run and node config; a simulated client process
    answers many messages, so it parses them once instead of once per message.
    """
    try:
        return _client_settings(_typed_items(run_config), _typed_items(node_config), pinned)
    except TypeError:  # an unhashable value (not something Flower produces): parse without the cache
        return RunSettings.from_config(client_config(run_config, node_config, pinned))
