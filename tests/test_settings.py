"""Run settings from Flower's flat config: defaults, every rejected value, and endpoint resolution."""

from __future__ import annotations

import pytest

from fedtextgrad_core.run.client_round import evaluate_split, local_round, node_identity
from fedtextgrad_core.errors import ConfigError, DataError
from fedtextgrad_core.llm.engine import EndpointSettings, make_engine
from fedtextgrad_core.run.settings import RunSettings, client_endpoints, endpoint_settings
from fedtextgrad_core.data.tasks import GENERIC_FORMAT, get_task


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
    assert settings.local.proximal is True
    assert settings.merge == "summarize-uid" and settings.partitioning == "homogeneous"
    assert settings.forward == EndpointSettings() and settings.backward == settings.forward
    assert settings.start_prompt == get_task("object_counting").start_prompt


def test_values_are_read_and_typed() -> None:
    settings = RunSettings.from_config({
        "num-server-rounds": 5, "local-steps": 2.0, "batch-size": 4, "proximal": False, "merge": "concat",
        "task": "word_sorting", "seed": 3, "fraction-train": 0.5, "run-name": "  mine ",
    })
    assert (settings.num_rounds, settings.local.steps, settings.local.batch_size) == (5, 2, 4)
    assert isinstance(settings.local.steps, int)
    assert settings.local.proximal is False and settings.merge == "concat"
    assert settings.tasks == ["word_sorting"] and settings.local.seed == 3 == settings.seed
    assert settings.fraction_train == 0.5 and settings.run_name == "mine"
    assert settings.as_dict()["local"]["batch_size"] == 4


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
    assert "sim or openai" in rejected({"llm-backend": "vllm"}, "llm-backend", "vllm")
    assert "openai" in rejected({"backward-backend": "ollama"}, "backward-backend", "ollama")
    assert "openai" in rejected({"server-backend": "gpt"}, "server-backend", "gpt")
    assert "word_sorting" in rejected({"partitioning": "heterogeneous", "heterogeneous-tasks": "object_counting,sorting"},
                                      "heterogeneous-tasks", "sorting")


@pytest.mark.parametrize("setting", ["num-server-rounds", "local-steps", "batch-size"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None, float("nan"), float("inf")],
                         ids=["zero", "negative", "fraction", "text", "bool", "none", "nan", "inf"])
def test_counts_must_be_positive_whole_numbers(setting: str, value: object) -> None:
    assert "whole number of at least 1" in rejected({setting: value}, setting, value)


def test_other_number_settings_are_checked() -> None:
    assert "(0, 1]" in rejected({"fraction-train": 0}, "fraction-train", 0)
    assert "at least 0" in rejected({"llm-temperature": -0.5}, "llm-temperature", -0.5)
    assert "at least 0" in rejected({"seed": float("nan")}, "seed", float("nan"))
    assert "true or false" in rejected({"proximal": "yes"}, "proximal", "yes")


def test_data_source_path_is_checked_where_the_data_lives(tmp_path) -> None:
    # the server may be another machine than the clients: it does not check data paths
    missing = str(tmp_path / "no-such-folder")
    assert RunSettings.from_config({"data-source": missing}).data_source == missing
    rejected({"data-source": ""}, "data-source", "")
    # the client that would read it stops with a line naming the path
    with pytest.raises(DataError, match="no-such-folder.*does not exist"):
        evaluate_split({"data-source": missing}, {"partition-id": 0, "num-partitions": 1}, "p", "val")


def test_openai_backend_needs_a_base_url_and_a_model() -> None:
    message = rejected({"llm-backend": "openai", "llm-model": "qwen"}, "llm-base-url", "")
    assert "OpenAI-compatible" in message
    rejected({"server-backend": "openai", "server-model": "qwen"}, "server-base-url", "")


def test_missing_api_key_variable_names_the_setting_but_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTG_TEST_UNSET_KEY", raising=False)
    settings = EndpointSettings(backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
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
            "llm-concurrency": 2, "task": "gsm8k", "partition-id": 0}
    forward, backward = client_endpoints(run, node)
    assert (forward.backend, forward.base_url, forward.model, forward.concurrency) == (
        "openai", "http://127.0.0.1:8000/v1", "qwen", 2)
    assert backward == forward  # nothing set for backward: the forward model does both


def test_backward_keys_override_only_the_backward_endpoint() -> None:
    run = {"llm-backend": "openai", "llm-base-url": "http://127.0.0.1:8000/v1", "llm-model": "small",
           "llm-api-key-env": "SMALL_KEY"}
    node = {"backward-model": "large", "backward-base-url": "http://127.0.0.1:8001/v1"}
    forward, backward = client_endpoints(run, node)
    assert (forward.model, forward.base_url) == ("small", "http://127.0.0.1:8000/v1")
    assert (backward.backend, backward.model, backward.base_url) == ("openai", "large", "http://127.0.0.1:8001/v1")
    assert backward.api_key_env == "SMALL_KEY"  # inherited


def test_client_endpoints_reject_bad_node_values() -> None:
    with pytest.raises(ConfigError) as info:
        client_endpoints({}, {"llm-backend": "openai", "llm-model": "qwen"})
    assert info.value.setting == "llm-base-url"
    with pytest.raises(ConfigError) as info:
        client_endpoints({}, {"backward-backend": "tgi"})
    assert (info.value.setting, info.value.value) == ("backward-backend", "tgi")


# --- a node's identity ---------------------------------------------------------------------


@pytest.mark.parametrize("node, setting, value", [
    ({}, "partition-id", None),
    ({"partition-id": 0}, "num-partitions", None),
    ({"partition-id": "first", "num-partitions": 2}, "partition-id", "first"),
], ids=["no-partition-id", "no-num-partitions", "not-a-number"])
def test_node_without_a_partition_is_a_clear_error(node: dict, setting: str, value: object) -> None:
    settings = RunSettings.from_config({})
    with pytest.raises(ConfigError) as info:
        node_identity(settings, node)
    assert (info.value.setting, info.value.value) == (setting, value)
    assert "--node-config" in str(info.value)
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        local_round({}, node, "prompt", 1, {})
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        evaluate_split({}, node, "prompt", "val")


def test_node_identity_reads_the_node_data_source() -> None:
    settings = RunSettings.from_config({})
    node = node_identity(settings, {"partition-id": "1", "num-partitions": 3, "data-source": "/data/site-b"})
    assert (node.partition_id, node.num_partitions, node.data_source) == (1, 3, "/data/site-b")
    assert node_identity(settings, {"partition-id": 0, "num-partitions": 1}).data_source == "synthetic"


def test_partition_id_out_of_range_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        evaluate_split({}, {"partition-id": 3, "num-partitions": 3}, "prompt", "val")
    assert (info.value.setting, info.value.value) == ("partition-id", 3)


def test_a_nodes_own_data_source_replaces_the_runs(tmp_path) -> None:
    prompt = get_task("object_counting").start_prompt
    run = {"data-source": str(tmp_path / "only-on-the-server"), "synthetic-size": 50}
    node = {"partition-id": 0, "num-partitions": 2, "data-source": "synthetic"}
    assert evaluate_split(run, node, prompt, "val")["total"] == 10  # half of the 20 validation examples
    missing = str(tmp_path / "not-on-this-node")
    with pytest.raises(DataError, match="not-on-this-node' does not exist"):
        evaluate_split({}, {**node, "data-source": missing}, prompt, "val")
