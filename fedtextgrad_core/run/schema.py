"""Every run setting in one table: its key, kind, default, bounds, who may set it, where it goes, and a line of doc.

Validation, the node-override rule, the typed settings (``settings.py`` fills each record from the
settings that name it), the defaults in ``[tool.flwr.app.config]`` and the settings reference all
come from ``SETTINGS``, so a setting is one ``Setting(...)`` here and one field in its record.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from fedtextgrad_core.data.loaders import GSM8K_SPLITS, MAX_SYNTHETIC_SIZE
from fedtextgrad_core.data.partitioning import PARTITIONINGS
from fedtextgrad_core.data.tasks import ANSWER_PARSERS, TASKS
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm.engine import backend_names
from fedtextgrad_core.llm.server_kind import KINDS as SERVER_KINDS
from fedtextgrad_core.method.leakage import LEAKAGE_GUARDS
from fedtextgrad_core.method.local_training import KEEP_RULES
from fedtextgrad_core.method.merging import MERGE_METHODS

Config = Mapping[str, object]

# Upper bounds where a larger value is never meant and would stall a run instead of failing
# it: Python cannot sleep or wait on a socket for 1e300 seconds, and a million retries at the
# 8 s back-off cap is a hang.
MAX_TIMEOUT_SECONDS = 86_400.0  # one day per LLM call
MAX_RETRIES = 100
MAX_SIM_LATENCY_MS = 60_000.0  # one minute per simulated call
MAX_ROUNDS = 10_000
MAX_STEPS = 1_000
MAX_BATCH = 10_000
MAX_CLIENTS = 1_000_000
MAX_SEED = 2**32 - 1
MAX_TOKENS = 1_000_000
MAX_CONCURRENCY = 1_024
MAX_PROMPT_CHARS = 10_000_000

# Keys Flower itself puts in a node's config (simulation injects them; a SuperNode is given them).
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# Which record a setting's value goes into (``Setting.record``): a field of RunSettings, a field of
# every endpoint's EndpointSettings, or a field of one endpoint's (the role names).
RUN = "run"
ENDPOINT = "endpoint"
ROLES = ("llm", "backward", "judge", "server")

# Who sets a setting (``Setting.who``). The run config sets every setting, and a SuperNode's node config
# may override the NODE ones for its own client. The SITE ones decide where a site's data, prompts and
# keys go and how its private data is guarded: in a deployment they come from the node config (or the
# default) only, and a run config that sets one otherwise is refused, unless the site allows it by name
# (allow-run-config). In Flower's simulation every client is the run submitter's own, so the run config
# may set them too.
BY_RUN = "run"
NODE = "node"
SITE = "site"


@dataclass(frozen=True)
class Setting:
    """One run setting."""

    key: str
    kind: str  # int | number | fraction | bool | text | choice | list | url | env-name
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: Callable[[], tuple[str, ...]] | None = None  # a function: some lists are only known at run time
    who: str = BY_RUN  # BY_RUN, NODE or SITE (see above)
    section: str = "federation"
    record: str = RUN  # RUN, ENDPOINT or a role of ROLES (see above)
    field: str = ""  # the record's field it fills; empty: the key in snake case
    empty_is_default: bool = False  # an empty text value means the default (a folder, a name)

    @property
    def attribute(self) -> str:
        return self.field or self.key.replace("-", "_")

    @property
    def node(self) -> bool:
        """A SuperNode's node config may set it (for its own client)."""
        return self.who in (NODE, SITE)

    @property
    def pinned(self) -> bool:
        """In a deployment, only the site sets it (see SITE)."""
        return self.who == SITE

    def accepted(self) -> tuple[str, ...]:
        return self.choices() if self.choices else ()

    def read(self, config: Config) -> Any:
        """The checked value of this setting in ``config`` (its default when absent)."""
        return _READERS[self.kind](self, config.get(self.key, self.default))

    def shown_default(self) -> str:
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, str):
            return f"`{self.default}`" if self.default else "empty"
        return str(self.default)

    def shown_accepted(self) -> str:
        if self.kind in ("choice", "list"):
            return ("comma-separated, from " if self.kind == "list" else "") + ", ".join(f"`{c}`" for c in self.accepted())
        if self.kind == "bool":
            return "true, false"
        if self.kind in ("int", "number"):
            whole = "whole number " if self.kind == "int" else ""
            return f"{whole}{_plain(0 if self.low is None else self.low)} to {_plain(self.high) if self.high else 'any'}"
        if self.kind == "fraction":
            return "(0, 1]"
        if self.kind == "url":
            return "empty or an `http(s)://host[:port]` URL"
        if self.kind == "env-name":
            return "empty or an environment variable's NAME"
        return "text"


def _plain(number: float | None) -> str:
    """1000000 as 1,000,000 and 0.5 as 0.5, for people."""
    if number is None:
        return ""
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


# --- readers: one per kind, each refusing with the setting, the value and what is accepted ------------

def _finite(value: object) -> bool:
    """A real number (not a bool, NaN or infinity). Python ints are always finite; passing a huge
    one to ``math.isfinite`` would overflow, so ints are not."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _bounds(setting: Setting) -> str:
    low = 0 if setting.low is None else setting.low
    text = f"at least {low:g}"
    return text + (f" and at most {setting.high:g}" if setting.high is not None else "")


def _int(setting: Setting, value: object) -> int:
    low = 0 if setting.low is None else setting.low
    if (not _finite(value) or int(value) != value or value < low  # type: ignore[call-overload, operator]
            or (setting.high is not None and value > setting.high)):  # type: ignore[operator]
        raise ConfigError(setting.key, value, f"a whole number of {_bounds(setting)}")
    return int(value)  # type: ignore[call-overload, no-any-return]


def _number(setting: Setting, value: object) -> float:
    low = 0 if setting.low is None else setting.low
    if not _finite(value) or value < low or (setting.high is not None and value > setting.high):  # type: ignore[operator]
        raise ConfigError(setting.key, value, f"a number of {_bounds(setting)}")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range: only reachable without an upper bound
        raise ConfigError(setting.key, value, "a number of at least 0 and below 1e308") from None


def _fraction(setting: Setting, value: object) -> float:
    if not _finite(value) or not 0 < value <= 1:  # type: ignore[operator]
        raise ConfigError(setting.key, value, "a number in (0, 1]")
    return float(value)  # type: ignore[arg-type]


def _bool(setting: Setting, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(setting.key, value, "true or false")
    return value


def has_control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


def _text(setting: Setting, value: object) -> str:
    """Quoted text, trimmed. Control characters are refused: every text setting is a name, a path or
    a URL, where a NUL or a newline only ever causes a confusing failure later."""
    if not isinstance(value, str):
        raise ConfigError(setting.key, value, "a text value in quotes")
    value = value.strip()
    if has_control(value):
        raise ConfigError(setting.key, value, "text without control characters (no NUL, tab, newline or escape codes)")
    if not value and setting.empty_is_default:
        return str(setting.default)
    return value


def _choice(setting: Setting, value: object) -> str:
    text = _text(setting, value)
    if text == "" and setting.default == "":  # empty: inherit (the backward model's backend is the forward one's)
        return text
    if text not in setting.accepted():
        raise ConfigError(setting.key, text, ", ".join(setting.accepted()))
    return text


def _list(setting: Setting, value: object) -> tuple[str, ...]:
    items = tuple(item.strip() for item in _text(setting, value).split(",") if item.strip())
    for item in items:
        if item not in setting.accepted():
            raise ConfigError(setting.key, item, "comma-separated names from " + ", ".join(setting.accepted()))
    return items


def _url(setting: Setting, value: object) -> str:
    """An http(s) URL with a host (and a valid port, if one is given), or empty."""
    text = _text(setting, value)
    if not text:
        return text
    accepted = "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ConfigError(setting.key, text, accepted) from None
    if parts.username is not None or parts.password is not None:
        # a key in a URL would be written wherever the settings are (config.json, MLflow, a client's line)
        hidden = parts._replace(netloc=f"***@{parts.netloc.rsplit('@', 1)[1]}").geturl()
        role = setting.key.removesuffix("-base-url")
        raise ConfigError(setting.key, hidden, f"a URL without a user name or password in it: give the key in the "
                                               f"environment variable that {role}-api-key-env names")
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ConfigError(setting.key, text, accepted)
    return text


def _env_name(setting: Setting, value: object) -> str:
    text = value.strip() if isinstance(value, str) else value
    if text != "" and not (isinstance(text, str) and _ENV_NAME.fullmatch(text)):
        # never repeat the value: it may be the key itself, pasted in the wrong place
        raise ConfigError(setting.key, "<not shown>",
                          "the NAME of an environment variable (letters, digits and '_'), never the key itself")
    return str(text)


_READERS: dict[str, Callable[[Setting, object], Any]] = {
    "int": _int, "number": _number, "fraction": _fraction, "bool": _bool, "text": _text,
    "choice": _choice, "list": _list, "url": _url, "env-name": _env_name,
}


# --- the table ---------------------------------------------------------------------------------------

def _tasks() -> tuple[str, ...]:
    return tuple(TASKS)


def _endpoint(role: str, what: str, who: str, backend_default: str, model_default: str,
              when_empty: str = "") -> list[Setting]:
    """The four settings of one endpoint role (``{role}-backend``, ``-base-url``, ``-model``, ``-api-key-env``)."""
    section = "endpoints"
    return [
        Setting(f"{role}-backend", "choice", backend_default,
                f"{what}: `sim` (the simulated LLM, a test double) or `openai` (any OpenAI-compatible server)"
                + (f"; empty: {when_empty}" if when_empty else ""),
                choices=backend_names, who=who, section=section, record=role, field="backend"),
        Setting(f"{role}-base-url", "url", "", f"{what}: the server's URL, e.g. `http://127.0.0.1:8000/v1`",
                who=who, section=section, record=role, field="base_url"),
        Setting(f"{role}-model", "text", model_default, f"{what}: the model name the server knows", who=who,
                section=section, record=role, field="model"),
        Setting(f"{role}-api-key-env", "env-name", "",
                f"{what}: the NAME of the environment variable holding the API key (never the key)", who=who,
                section=section, record=role, field="api_key_env"),
    ]


SETTINGS: tuple[Setting, ...] = (
    # --- the federation ---
    Setting("num-server-rounds", "int", 3, "federated rounds", low=1, high=MAX_ROUNDS, field="num_rounds"),
    Setting("fraction-train", "fraction", 1.0, "share of connected clients sampled per round (at least min-train-clients)"),
    Setting("min-train-clients", "int", 2, "a round with fewer successful clients stops the run with their errors",
            low=1, high=MAX_CLIENTS),
    Setting("seed", "int", 0, "data split, client sampling and batch sampling", high=MAX_SEED),
    Setting("wait-for-clients", "number", 300.0, "seconds the server waits for min-train-clients SuperNodes to "
            "connect before it stops the run (a simulation smaller than min-train-clients is refused at once)",
            high=MAX_TIMEOUT_SECONDS),
    # --- the task and its data ---
    Setting("task", "choice", "object_counting", "the task of every client (homogeneous, centralized)",
            choices=_tasks, section="data"),
    Setting("partitioning", "choice", "homogeneous",
            "`homogeneous`: one task split evenly (seeded); `heterogeneous`: client i gets task i of "
            "heterogeneous-tasks; `centralized`: one client, all training data",
            choices=lambda: PARTITIONINGS, section="data"),
    Setting("heterogeneous-tasks", "list", "object_counting,word_sorting,multistep_arithmetic_two",
            "one task per client when heterogeneous", choices=_tasks, section="data"),
    Setting("gsm8k-split", "choice", "textgrad", "GSM8K's split: `textgrad` (TextGrad's DSPy split: train 200, val "
            "300, test 1319) or `fedtextgrad` (the FedTextGrad code's: train 50, val 100, test 100 of the same "
            "shuffles, questions prefixed 'Question: ')", choices=lambda: GSM8K_SPLITS, section="data"),
    Setting("data-source", "text", "synthetic",
            "`synthetic` (seeded generator, no files), `hub` (online), or a local file or folder", who=SITE,
            section="data"),
    Setting("synthetic-size", "int", 250, "examples generated per task (split 20/40/40 % train/val/test)",
            low=1, high=MAX_SYNTHETIC_SIZE, section="data"),
    Setting("max-val-examples", "int", 0, "use only the first N validation examples of each task, before they "
            "are dealt out (0: all); for slow models", high=MAX_SYNTHETIC_SIZE, section="data"),
    Setting("max-test-examples", "int", 0, "use only the first N test examples of each task, before they are "
            "dealt out (0: all); for slow models", high=MAX_SYNTHETIC_SIZE, section="data"),
    # --- local TextGrad optimisation on each client ---
    Setting("local-steps", "int", 3, "TextGrad steps per client per round", low=1, high=MAX_STEPS, section="local"),
    Setting("batch-size", "int", 3, "examples per step", low=1, high=MAX_BATCH, section="local"),
    Setting("keep-rule", "choice", "reference", "after a local step the same batch is scored again: `reference` "
            "keeps the rewrite only if the score rose or is perfect (the reference code's --proximal_update), "
            "`not-worse` unless it fell, `always` keeps every well-formed rewrite",
            choices=lambda: KEEP_RULES, section="local"),
    Setting("loss", "choice", "exact", "how training batches are scored: `exact` match in code, or `judge`, the "
            "reference's LLM judge (judge-* endpoint); validation and test stay exact match",
            choices=lambda: ("exact", "judge"), section="local"),
    Setting("answer-parser", "choice", "answer-line", "how an answer is read from a reply: `answer-line` (after "
            "the last 'Answer:'; none is wrong and malformed) or `last-number` (the reference's parser: the last "
            "number, digits only; numeric tasks)", choices=lambda: ANSWER_PARSERS, section="local"),
    Setting("client-val-eval", "bool", True, "each client also scores its own new prompt on its validation split",
            section="local"),
    Setting("test-prompts", "list", "best,last,initial",
            "the prompts scored on the clients' test splits at the end: the best by validation, the last merged "
            "one, the start prompt (a prompt that is two of them is scored once)",
            choices=lambda: ("best", "last", "initial"), section="local"),
    Setting("constrained-updates", "choice", "auto", "auto: the optimizer's reply is constrained by the server "
            "(llama.cpp grammar, vLLM/SGLang regex, Ollama/OpenAI JSON schema) to a well-formed "
            "<IMPROVED_VARIABLE> rewrite; off: plain requests", choices=lambda: ("auto", "off"), who=NODE,
            section="local"),
    Setting("sequential-feedback", "bool", False, "send a batch's feedback calls one after another, as "
            "TextGrad does, instead of side by side up to llm-concurrency: faster on a server that gains nothing "
            "from requests in flight (llama.cpp on one CPU thread); the feedback, rewrites and decisions are the "
            "same either way", who=NODE, section="local"),
    # --- merging on the server ---
    Setting("merge", "choice", "summarize-uid", "how the server merges client prompts",
            choices=lambda: MERGE_METHODS, section="merge"),
    Setting("best-rule", "choice", "reference", "how the server picks the best prompt by validation: `reference` "
            "takes any increase (the reference code's); `paired` only a merged prompt that beats the best so far "
            "on the same validation examples by a paired difference whose 95% interval excludes zero (McNemar)",
            choices=lambda: ("reference", "paired"), section="merge"),
    Setting("start-eval-repeats", "int", 1, "times the start prompt's validation is scored at the start of a run "
            "(2 or more: the header says how far the scores differed, the server's own noise)", low=1, high=10,
            section="merge"),
    Setting("merge-token-budget", "int", 3000,
            "most tokens one summariser call reads (larger merges go in groups); the merged prompt never exceeds it",
            low=1, high=MAX_TOKENS, section="merge"),
    # --- untrusted uploads and private data ---
    Setting("max-prompt-chars", "int", 8000,
            "a client upload longer than this, empty, or with control characters is rejected before merging",
            low=1, high=MAX_PROMPT_CHARS, section="safety"),
    Setting("robust-merge", "bool", False,
            "score each upload on a server-side held-out set and leave out those far below the others",
            section="safety"),
    Setting("robust-holdout-size", "int", 12, "size of that held-out set (robust-merge)", low=1, high=10_000,
            section="safety"),
    Setting("robust-margin", "fraction", 0.2,
            "an upload scoring more than this below the median upload is left out (robust-merge)", section="safety"),
    Setting("leakage-guard", "choice", "redact",
            "what a client does when its prompt quotes its own training examples", choices=lambda: LEAKAGE_GUARDS,
            who=SITE, section="safety"),
    Setting("leakage-ngram", "int", 8, "that many words in a row shared with a training example count as a quote",
            low=1, high=10_000, who=SITE, section="safety"),
    Setting("allow-run-config", "list", "", "the site settings this site lets a run config set in a deployment "
            "(its SuperNode's node config only; e.g. judge-model); the others come from the node config or their "
            "default", choices=lambda: tuple(s.key for s in SETTINGS if s.pinned and s.key != "allow-run-config"),
            who=SITE, section="safety"),
    # --- LLM endpoints ---
    *_endpoint("llm", "the model being prompted on each client (forward)", SITE, "sim", "sim"),
    *_endpoint("backward", "the model that writes feedback and rewrites prompts", SITE, "", "",
               when_empty="the forward model's"),
    *_endpoint("judge", "the LLM judge of loss = judge", SITE, "", "", when_empty="the backward model's"),
    *_endpoint("server", "the ServerApp's own model, for the summarize merges and robust-merge scoring", BY_RUN, "", "",
               when_empty="the run's `llm-*` endpoint when it is a real one, else the simulator; a run whose clients "
                          "report real LLMs then stops at once, naming this setting"),
    Setting("llm-temperature", "number", 0.0, "sampling temperature of every endpoint", high=100, who=NODE,
            section="endpoints", record=ENDPOINT,
            field="temperature"),
    Setting("llm-max-tokens", "int", 512, "most tokens per reply", low=1, high=MAX_TOKENS, who=NODE,
            section="endpoints", record=ENDPOINT,
            field="max_tokens"),
    Setting("llm-timeout", "number", 0.0, "seconds per LLM call; 0: by the kind of server (llama.cpp and Ollama "
            "900, vLLM and SGLang 300, OpenAI 120, others 600)", high=MAX_TIMEOUT_SECONDS, who=NODE,
            section="endpoints", record=ENDPOINT,
            field="timeout"),
    Setting("llm-startup-wait", "number", 60.0, "seconds a process waits for an LLM server that is not answering "
            "yet (still loading) before it gives up", high=MAX_TIMEOUT_SECONDS, who=NODE, section="endpoints", record=ENDPOINT,
            field="startup_wait"),
    Setting("llm-server-kind", "choice", "auto", "the kind of server at llm-base-url, for its constrained-output "
            "field and timeout; auto: detected from GET /v1/models (owned_by) and the server's own endpoints",
            choices=lambda: ("auto", *SERVER_KINDS), who=NODE, section="endpoints", record="llm",
            field="server_kind"),
    Setting("backward-server-kind", "choice", "", "the same for backward-base-url; empty: llm-server-kind when "
            "the backward model is the forward one's server, else auto", choices=lambda: ("auto", *SERVER_KINDS),
            who=NODE, section="endpoints", record="backward",
            field="server_kind"),
    Setting("llm-concurrency", "int", 8, "requests in flight per endpoint (batch answers, evaluation)",
            low=1, high=MAX_CONCURRENCY, who=NODE, section="endpoints", record=ENDPOINT,
            field="concurrency"),
    Setting("llm-max-retries", "int", 3, "retries on connection errors, timeouts, 429 and 5xx (never on other 4xx)",
            high=MAX_RETRIES, who=NODE, section="endpoints", record=ENDPOINT,
            field="max_retries"),
    Setting("llm-retry-backoff", "number", 0.5, "seconds before the first retry; doubles each time (with jitter), at most 8",
            high=3600, who=NODE, section="endpoints", record=ENDPOINT,
            field="retry_backoff"),
    Setting("llm-cache-path", "text", "", "a SQLite file to cache replies in (off when empty); hits are counted",
            who=SITE, section="endpoints", record=ENDPOINT,
            field="cache_path"),
    Setting("sim-latency-ms", "number", 0.0, "added delay per simulated LLM call (benchmarks)",
            high=MAX_SIM_LATENCY_MS, who=NODE, section="endpoints", record=ENDPOINT,
            field="sim_latency_ms"),
    # --- results ---
    Setting("results-dir", "text", "results",
            "where the run folder goes (a relative path is taken from the folder the SuperLink was started in)",
            section="results", empty_is_default=True),
    Setting("run-name", "text", "", "the run folder's name; empty: <task>-<partitioning>-<merge>-<timestamp>",
            section="results"),
    Setting("resume-from", "text", "", "the folder of an unfinished run: continue after its last finished round",
            section="results"),
    Setting("debug", "bool", False, "also print Python tracebacks for this project's own errors (for "
            "reporting a problem); without it such an error is one line", section="results"),
    Setting("tracker", "choice", "none", "also track the run in MLflow: settings, per-round metrics, prompts and "
            "the run folder (a tracker that fails never stops the run)", choices=lambda: ("none", "mlflow"),
            section="results"),
    Setting("tracking-uri", "text", "", "MLflow tracking URI: a folder, sqlite:///FILE or http://HOST:PORT "
            "(empty: MLflow's local default)", section="results"),
    Setting("tracking-experiment", "text", "fedtextgrad", "the MLflow experiment the run goes into",
            section="results", empty_is_default=True),
    Setting("tracking-parent-run", "text", "", "an MLflow run id to nest this run under (set by "
            "`fedtextgrad experiment` for its grid)", section="results"),
)

BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS}
NODE_KEYS = frozenset(setting.key for setting in SETTINGS if setting.node)


def defaults() -> dict[str, object]:
    """The default run config, as ``[tool.flwr.app.config]`` must declare it."""
    return {setting.key: setting.default for setting in SETTINGS}


def values(config: Config, record: str) -> dict[str, Any]:
    """The checked values of every setting of ``record``, by field name: what builds that record."""
    return {setting.attribute: setting.read(config) for setting in SETTINGS if setting.record == record}


def check_known(config: Config, where: str = "run config") -> None:
    """Refuse a key no setting has: a typo would otherwise be ignored in silence."""
    for key in config:
        if key not in BY_KEY:
            raise ConfigError(key, config[key], f"a known setting; '{key}' is not one (see docs/settings.md, "
                                                f"or [tool.flwr.app.config] in pyproject.toml)")


def node_overrides(node_config: Config) -> dict[str, object]:
    """The settings a SuperNode's own config sets for its client, checked to be ones it may set.

    A site decides where its data and LLM servers are and what leaves it (``who=NODE`` keys);
    settings that shape the federation (the task, the merge, the rounds) are the run's alone.
    """
    overrides: dict[str, object] = {}
    for key, value in node_config.items():
        if key in FLOWER_NODE_KEYS:
            continue
        setting = BY_KEY.get(key)
        if setting is None:
            raise ConfigError(key, value, "a setting a node may set: " + ", ".join(sorted(NODE_KEYS)) + " (and "
                              + ", ".join(FLOWER_NODE_KEYS) + ")")
        if not setting.node:
            raise ConfigError(key, value, "a run setting, set by the run (--run-config), not by one node's config")
        overrides[key] = value
    return overrides


WHO_SHOWN = {BY_RUN: "run", NODE: "run, or a node for itself", SITE: "**site** (run only in simulation)"}
SECTION_TITLES = {
    "federation": "the federation", "data": "the task and its data", "local": "local TextGrad steps on each client",
    "merge": "merging on the server", "safety": "untrusted uploads and private data",
    "endpoints": "LLM endpoints", "results": "results",
}


def by_section() -> list[tuple[str, list[Setting]]]:
    """The settings grouped under their section titles, each section once, in the titles' order."""
    return [(title, [s for s in SETTINGS if s.section == section]) for section, title in SECTION_TITLES.items()]


def markdown_table() -> str:
    """The settings reference, written from ``SETTINGS`` (``fedtextgrad settings --format markdown``):
    one heading and one table per section, so a reader can link to a section (docs/settings.md holds it
    verbatim, checked by a test)."""
    lines: list[str] = []
    for title, settings in by_section():
        if lines:
            lines.append("")
        lines += [f"## {title[0].upper()}{title[1:]}", "", "| key | default | accepted | set by | what |",
                  "|---|---|---|---|---|"]
        for setting in settings:
            lines.append(f"| `{setting.key}` | {setting.shown_default()} | {setting.shown_accepted()} | "
                         f"{WHO_SHOWN[setting.who]} | {setting.doc} |")
    return "\n".join(lines)


def pyproject_block() -> str:
    """``[tool.flwr.app.config]`` as pyproject.toml holds it, one commented line per setting."""
    lines = []
    for title, settings in by_section():
        lines.append(f"# --- {title} ---")
        lines.extend(tomli_w.dumps({setting.key: setting.default}).strip() for setting in settings)
    return "\n".join(lines)
