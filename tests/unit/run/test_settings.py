"""Run settings from Flower's flat config: defaults, every rejected value, endpoint resolution,
and the one table of settings (run/schema.py) that pyproject.toml and docs/settings.md must agree with."""

from __future__ import annotations

import dataclasses
import tomllib
import typing

import pytest

from fedtextgrad_core.data.tasks import GENERIC_FORMAT, get_task
from fedtextgrad_core.errors import ConfigError, DataError
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.run import schema
from fedtextgrad_core.run.client_round import answer, node_identity
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest
from fedtextgrad_core.run.settings import RunSettings, client_config, client_settings, endpoint_settings
from tests import ROOT
from tests.support.settings_helpers import endpoint


def evaluate(run_config: dict, node_config: dict, prompt: str = "prompt", pinned: bool = False) -> EvalReply:
    """What a client answers to a validation request, as the ClientApp would call it (in Flower's simulation
    unless ``pinned``: a deployed site)."""
    request = RoundRequest(phase=Phase.EVALUATE.value, server_round=1, prompt=prompt)
    return answer(run_config, node_config, request, pinned)


def train(run_config: dict, node_config: dict, prompt: str = "prompt", pinned: bool = False):
    """What a client answers to a training request, as the ClientApp would call it (in simulation unless ``pinned``)."""
    return answer(run_config, node_config, RoundRequest(phase=Phase.TRAIN.value, server_round=1, prompt=prompt), pinned)


def rejected(config: dict, setting: str, value: object) -> str:
    """The message of the ConfigError ``config`` raises; it must name the setting and the value."""
    with pytest.raises(ConfigError) as info:
        RunSettings.from_config(config)
    error = info.value
    assert error.setting == setting
    assert error.value == value or (isinstance(value, float) and value != value)
    message = str(error)
    assert f"'{setting}'" in message and repr(value) in message and "expected" in message
    return message


def test_defaults_match_the_design() -> None:
    settings = RunSettings.from_config({})
    assert (settings.num_rounds, settings.local.steps, settings.local.batch_size) == (3, 3, 3)
    assert settings.local.keep_rule == "reference" and settings.loss == "exact"
    assert settings.local.parser == "answer-line" and settings.gsm8k_split == "textgrad"
    assert settings.merge == "summarize-uid" and settings.partitioning == "homogeneous"
    assert settings.forward == endpoint() and settings.backward == settings.forward
    forward = settings.forward
    assert (forward.backend, forward.base_url, forward.model, forward.api_key_env) == ("sim", "", "sim", "")
    assert (forward.temperature, forward.max_tokens, forward.timeout, forward.concurrency) == (0.0, 512, 0.0, 8)
    assert (forward.max_retries, forward.retry_backoff, forward.cache_path, forward.sim_latency_ms) == (3, 0.5, "", 0.0)
    assert (settings.server.backend, settings.server.model) == ("sim", "sim")
    assert settings.start_prompt == get_task("object_counting").start_prompt


def test_values_are_read_and_typed() -> None:
    settings = RunSettings.from_config({
        "num-server-rounds": 5, "local-steps": 2.0, "batch-size": 4, "keep-rule": "not-worse", "merge": "concat",
        "task": "word_sorting", "seed": 3, "fraction-train": 0.5, "run-name": "  mine ",
    })
    assert (settings.num_rounds, settings.local.steps, settings.local.batch_size) == (5, 2, 4)
    assert isinstance(settings.local.steps, int)
    assert settings.local.keep_rule == "not-worse" and settings.merge == "concat"
    assert settings.tasks == ["word_sorting"] and settings.local.seed == 3 == settings.seed
    assert settings.fraction_train == 0.5 and settings.run_name == "mine"
    assert settings.as_dict()["batch_size"] == 4


def test_heterogeneous_uses_one_task_per_client_and_the_generic_format() -> None:
    settings = RunSettings.from_config({"partitioning": "heterogeneous",
                                        "heterogeneous-tasks": "object_counting, word_sorting"})
    assert settings.tasks == ["object_counting", "word_sorting"]
    assert settings.format_instruction == GENERIC_FORMAT
    assert settings.start_prompt.endswith(GENERIC_FORMAT)


def test_unknown_names_are_rejected_with_what_is_accepted() -> None:
    assert "object_counting" in rejected({"task": "counting"}, "task", "counting")
    assert "homogeneous" in rejected({"partitioning": "iid"}, "partitioning", "iid")
    message = rejected({"merge": "mean"}, "merge", "mean")
    assert all(name in message for name in ("concat", "summarize", "summarize-uid"))
    assert "sim, openai" in rejected({"llm-backend": "vllm"}, "llm-backend", "vllm")
    assert "openai" in rejected({"backward-backend": "ollama"}, "backward-backend", "ollama")
    assert "openai" in rejected({"server-backend": "gpt"}, "server-backend", "gpt")
    assert "word_sorting" in rejected({"partitioning": "heterogeneous", "heterogeneous-tasks": "object_counting,sorting"},
                                      "heterogeneous-tasks", "sorting")


@pytest.mark.parametrize("setting", ["num-server-rounds", "local-steps", "batch-size"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None, float("nan"), float("inf")],
                         ids=["zero", "negative", "fraction", "text", "bool", "none", "nan", "inf"])
def test_counts_must_be_positive_whole_numbers(setting: str, value: object) -> None:
    assert "whole number of at least 1" in rejected({setting: value}, setting, value)


@pytest.mark.parametrize("setting, high", [("num-server-rounds", 10_000), ("local-steps", 1_000),
                                           ("batch-size", 10_000)])
def test_counts_have_an_upper_bound(setting: str, high: int) -> None:
    assert RunSettings.from_config({setting: high}) is not None
    message = rejected({setting: high + 1}, setting, high + 1)
    assert f"a whole number of at least 1 and at most {high}" in message


def test_other_number_settings_are_checked() -> None:
    assert "(0, 1]" in rejected({"fraction-train": 0}, "fraction-train", 0)
    assert "at least 0" in rejected({"llm-temperature": -0.5}, "llm-temperature", -0.5)
    assert "at least 0" in rejected({"seed": float("nan")}, "seed", float("nan"))
    assert "true or false" in rejected({"client-val-eval": "yes"}, "client-val-eval", "yes")
    assert "reference, not-worse, always" in rejected({"keep-rule": "proximal"}, "keep-rule", "proximal")
    assert "answer-line for word_sorting" in rejected({"answer-parser": "last-number", "task": "word_sorting"},
                                                      "answer-parser", "last-number")


def test_data_source_path_is_checked_where_the_data_lives(tmp_path) -> None:
    # the server may be another machine than the clients: it does not check data paths
    missing = str(tmp_path / "no-such-folder")
    assert RunSettings.from_config({"data-source": missing}).data_source == missing
    rejected({"data-source": ""}, "data-source", "")
    # the client that would read it stops with a line naming the path
    with pytest.raises(DataError, match=r"no-such-folder.*does not exist"):
        evaluate({"data-source": missing}, {"partition-id": 0, "num-partitions": 1}, "p")


def test_openai_backend_needs_a_base_url_and_a_model() -> None:
    message = rejected({"llm-backend": "openai", "llm-model": "qwen"}, "llm-base-url", "")
    assert "OpenAI-compatible" in message
    rejected({"server-backend": "openai", "server-model": "qwen"}, "server-base-url", "")


def test_missing_api_key_variable_names_the_setting_but_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTG_TEST_UNSET_KEY", raising=False)
    settings = endpoint(backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
                        api_key_env="FTG_TEST_UNSET_KEY")
    with pytest.raises(ConfigError) as info:
        make_engine(settings, "backward-api-key-env")
    message = str(info.value)
    assert info.value.setting == "backward-api-key-env"
    assert "'backward-api-key-env'" in message and "FTG_TEST_UNSET_KEY" in message and "not set" in message


def test_a_key_pasted_in_place_of_the_variable_name_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-proj-Zq81xT0pSecretValue"
    monkeypatch.delenv(secret, raising=False)
    with pytest.raises(ConfigError) as info:
        endpoint_settings({"llm-backend": "openai", "llm-base-url": "http://127.0.0.1:9/v1",
                           "llm-model": "m", "llm-api-key-env": secret}, "llm")
    assert "'llm-api-key-env'" in str(info.value) and "NAME of an environment variable" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value.value)


# --- endpoints of a client: node config first, backward falls back to forward ---------------


def test_node_config_overrides_the_run_config_for_llm_keys() -> None:
    run = {"llm-backend": "sim", "llm-model": "sim", "llm-concurrency": 4, "task": "word_sorting"}
    node = {"llm-backend": "openai", "llm-base-url": "http://127.0.0.1:8000/v1", "llm-model": "qwen",
            "llm-concurrency": 2, "partition-id": 0}
    settings = client_settings(run, node)
    forward, backward = settings.forward, settings.backward
    assert (forward.backend, forward.base_url, forward.model, forward.concurrency) == (
        "openai", "http://127.0.0.1:8000/v1", "qwen", 2)
    assert backward == forward  # nothing set for backward: the forward model does both
    assert settings.task == "word_sorting"  # the run's: a node sets where its LLM is, not the task
    # the run's own settings are untouched: only this client's config changed
    assert RunSettings.from_config(run).forward.backend == "sim"


def test_a_node_cannot_set_the_task() -> None:
    # the task shapes the federation: a node config naming it is refused, not silently ignored
    with pytest.raises(ConfigError) as info:
        client_settings({"task": "word_sorting"}, {"task": "gsm8k", "partition-id": 0})
    assert (info.value.setting, info.value.value) == ("task", "gsm8k")


def test_backward_keys_override_only_the_backward_endpoint() -> None:
    run = {"llm-backend": "openai", "llm-base-url": "http://127.0.0.1:8000/v1", "llm-model": "small",
           "llm-api-key-env": "SMALL_KEY"}
    node = {"backward-model": "large", "backward-base-url": "http://127.0.0.1:8001/v1"}
    settings = client_settings(run, node, pinned=False)  # in simulation the run config may name the endpoints
    forward, backward = settings.forward, settings.backward
    assert (forward.model, forward.base_url) == ("small", "http://127.0.0.1:8000/v1")
    assert (backward.backend, backward.model, backward.base_url) == ("openai", "large", "http://127.0.0.1:8001/v1")
    assert backward.api_key_env == "SMALL_KEY"  # inherited


def test_client_settings_reject_bad_node_values() -> None:
    with pytest.raises(ConfigError) as info:
        client_settings({}, {"llm-backend": "openai", "llm-model": "qwen"})
    assert info.value.setting == "llm-base-url"
    with pytest.raises(ConfigError) as info:
        client_settings({}, {"backward-backend": "tgi"})
    assert (info.value.setting, info.value.value) == ("backward-backend", "tgi")


# --- a node's identity ---------------------------------------------------------------------


@pytest.mark.parametrize("node, setting, value", [
    ({}, "partition-id", None),
    ({"partition-id": 0}, "num-partitions", None),
    ({"partition-id": "first", "num-partitions": 2}, "partition-id", "first"),
], ids=["no-partition-id", "no-num-partitions", "not-a-number"])
def test_node_without_a_partition_is_a_clear_error(node: dict, setting: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        node_identity(node)
    assert (info.value.setting, info.value.value) == (setting, value)
    assert "--node-config" in str(info.value)
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        train({}, node)
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        evaluate({}, node)


def test_node_identity_and_the_nodes_own_data_source() -> None:
    node = {"partition-id": "1", "num-partitions": 3, "data-source": "/data/site-b"}
    identity = node_identity(node)
    assert (identity.partition_id, identity.num_partitions) == (1, 3)
    # the node's data-source reaches the client through its config, checked like the run's
    assert client_settings({}, node).data_source == "/data/site-b"
    assert client_settings({}, {"partition-id": 0, "num-partitions": 1}).data_source == "synthetic"
    with pytest.raises(ConfigError) as info:
        client_settings({}, {**node, "data-source": "/data/\nsite-b"})
    assert info.value.setting == "data-source"


def test_partition_id_out_of_range_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        evaluate({}, {"partition-id": 3, "num-partitions": 3})
    assert (info.value.setting, info.value.value) == ("partition-id", 3)


def test_a_nodes_own_data_source_replaces_the_runs(tmp_path) -> None:
    prompt = get_task("object_counting").start_prompt
    run = {"data-source": str(tmp_path / "only-on-the-server"), "synthetic-size": 50}
    node = {"partition-id": 0, "num-partitions": 2, "data-source": "synthetic"}
    assert evaluate(run, node, prompt).scores.total == 10  # half of the 20 validation examples
    missing = str(tmp_path / "not-on-this-node")
    with pytest.raises(DataError, match="not-on-this-node' does not exist"):
        evaluate({}, {**node, "data-source": missing}, prompt)


# --- the one table of settings (run/schema.py) ---------------------------------------------


def test_pyproject_declares_every_setting_with_the_schemas_default() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    expected = schema.defaults()
    assert list(declared) == list(expected)  # same keys, in the table's order
    for key, default in expected.items():
        assert type(declared[key]) is type(default) and declared[key] == default, key


def test_the_configuration_page_holds_the_schemas_settings_tables() -> None:
    lines = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8").splitlines()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    assert lines.count(start) == 1 and lines.count(end) == 1, "docs/settings.md needs one pair of settings-table markers"
    between = "\n".join(lines[lines.index(start) + 1:lines.index(end)]).strip("\n")
    assert between == schema.markdown_table()  # verbatim: `fedtextgrad settings --format markdown`


@pytest.mark.parametrize("key, value", [
    ("merge", "concat"), ("task", "word_sorting"), ("num-server-rounds", 5), ("results-dir", "elsewhere"),
    ("server-base-url", "http://127.0.0.1:8000/v1"), ("llm-bakend", "openai"), ("no-such-setting", 1),
], ids=lambda v: str(v))
def test_a_node_may_not_set_run_only_or_unknown_keys(key: str, value: object) -> None:
    assert key not in schema.NODE_KEYS
    node = {"partition-id": 0, "num-partitions": 2, key: value}
    for refuse in (schema.node_overrides, lambda config: client_config({}, config),
                   lambda config: client_settings({}, config)):
        with pytest.raises(ConfigError) as info:
            refuse(node)
        assert (info.value.setting, info.value.value) == (key, value)
        assert f"'{key}'" in str(info.value)


def test_a_node_may_set_its_own_keys() -> None:
    node = {"partition-id": 1, "num-partitions": 2, "llm-base-url": "http://127.0.0.1:8000/v1",
            "data-source": "/data/site-a", "leakage-guard": "refuse", "leakage-ngram": 5}
    assert schema.node_overrides(node) == {"llm-base-url": "http://127.0.0.1:8000/v1",
                                           "data-source": "/data/site-a", "leakage-guard": "refuse",
                                           "leakage-ngram": 5}
    config = client_config({"merge": "concat", "leakage-guard": "redact"}, node)
    assert config["merge"] == "concat" and config["leakage-guard"] == "refuse"  # the node's choice wins
    settings = client_settings({"merge": "concat"}, node)
    assert (settings.forward.base_url, settings.data_source) == ("http://127.0.0.1:8000/v1", "/data/site-a")
    assert (settings.leakage_guard, settings.leakage_ngram, settings.merge) == ("refuse", 5, "concat")
    # every key the schema marks as a node's is accepted from a node config
    assert set(schema.node_overrides({key: schema.BY_KEY[key].default for key in schema.NODE_KEYS})) == schema.NODE_KEYS


@pytest.mark.parametrize("key", [setting.key for setting in schema.SETTINGS])
def test_every_default_passes_its_own_reader(key: str) -> None:
    setting = schema.BY_KEY[key]
    setting.read({})  # raises ConfigError if the table's default is not one it accepts
    assert setting.read({key: setting.default}) == setting.read({})


# what each kind of setting reads into, as the field of its record must be declared
KIND_TYPES = {"int": int, "number": float, "fraction": float, "bool": bool, "text": str, "choice": str, "url": str,
              "env-name": str, "list": tuple[str, ...]}
# RunSettings fields that no one setting fills: the endpoints (built per role) and what is derived
DERIVED = {"forward", "backward", "judge", "server", "server_set"}


def test_the_table_is_the_one_source_of_every_setting_field() -> None:
    """Adding a setting is one Setting(...) and one field: every setting fills exactly one field of its
    record, of the type its kind reads, and every field of those records is filled by exactly one setting."""
    records = {schema.RUN: RunSettings, schema.ENDPOINT: EndpointSettings,
               **{role: EndpointSettings for role in schema.ROLES}}
    filled: dict[type, list[str]] = {}
    for setting in schema.SETTINGS:
        record = records[setting.record]
        hints = typing.get_type_hints(record)
        assert setting.attribute in hints, f"{setting.key}: {record.__name__} has no field {setting.attribute}"
        assert hints[setting.attribute] == KIND_TYPES[setting.kind], setting.key
        if setting.record not in schema.ROLES:
            filled.setdefault(record, []).append(setting.attribute)
    run_fields = [f.name for f in dataclasses.fields(RunSettings) if f.name not in DERIVED]
    assert sorted(filled[RunSettings]) == sorted(run_fields)
    per_role = {s.attribute for s in schema.SETTINGS if s.record == "llm"}
    assert sorted(filled[EndpointSettings] + sorted(per_role)) == sorted(f.name for f in dataclasses.fields(EndpointSettings))
    for role in schema.ROLES:  # each role names the same fields (the server kind only where it has one)
        assert {s.attribute for s in schema.SETTINGS if s.record == role} - {"server_kind"} == per_role - {"server_kind"}


def test_unknown_run_config_keys_are_refused() -> None:
    message = rejected({"local-step": 2}, "local-step", 2)
    assert "a known setting; 'local-step' is not one" in message
