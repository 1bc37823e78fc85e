"""Hostile configuration: every run-config key and the node-config keys, fed values of every
type Flower can deliver (and some it should not), must give either checked settings or one
``ConfigError`` that names the key. Never a KeyError, TypeError, OverflowError or a
traceback from deep inside, and never a value silently rounded or clamped into something
the user did not write.

The keys come from ``[tool.flwr.app.config]`` in pyproject.toml (through
``default_run_config``), which declares every setting of run/schema.py, so a key added
later is attacked here without editing this file. A node config may set the schema's
node keys (and Flower's partition keys); any other key in it is refused by name.
Hypothesis draws the values; a fixed table adds the classic edge cases to every key, and
Flower's own ``--run-config`` parser turns typed strings into the values a user can send.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from dataclasses import fields, is_dataclass

import pytest
from flwr.common.config import parse_config_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtextgrad_core.data.partitioning import ClientData
from fedtextgrad_core.errors import ConfigError, DataError
from fedtextgrad_core.llm.endpoint import EndpointSettings
from fedtextgrad_core.run import schema
from fedtextgrad_core.run.client_round import (
    NodeIdentity,
    answer,
    load_client_data,
    node_identity,
)
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest
from fedtextgrad_core.run.settings import RunSettings, client_settings
from tests.support.flower_loopback import default_run_config

pytestmark = pytest.mark.slow  # thousands of generated inputs (~15 s a module): the full suite, not the quick loop

RUN_CONFIG = default_run_config()
RUN_KEYS = sorted(RUN_CONFIG)
# Keys a node config may override: the schema's node keys, every one of them declared in pyproject.
NODE_OVERRIDE_KEYS = sorted(k for k in RUN_KEYS if schema.BY_KEY[k].node)
# Keys only the run may set: in a node config each is refused, naming itself.
RUN_ONLY_KEYS = sorted(k for k in RUN_KEYS if not schema.BY_KEY[k].node)
NODE_ID_KEYS = ("partition-id", "num-partitions")

# A valid value of one key can make another key's value wrong: the error then names the
# other key, and that is correct. (A backend 'openai' needs a base URL; a heterogeneous
# federation reads heterogeneous-tasks.)
CONSEQUENCES = {
    "llm-backend": {"llm-base-url", "backward-base-url"},
    "backward-backend": {"backward-base-url"},
    "server-backend": {"server-base-url"},
    "partitioning": {"heterogeneous-tasks"},
}

INT64 = (-(2**63), 2**63 - 1)
# What `flwr run --run-config` and `--node-config` can deliver: TOML's bool, int (64-bit),
# float (with nan and inf) and str, plus lists and huge ints that a hand-made Context may hold.
HOSTILE = st.one_of(
    st.booleans(),
    st.integers(*INT64),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e308, 5e-324, float("nan"), float("inf"), -float("inf")]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\n", "\t", "\x1b[31m", "\u202e", "\ud800", "ünïcødé ✓ 漢字",
                     "x" * 100_000, "-1", "0", "nan", "inf", "true", "1e400", "None", "${HOME}", "../../etc/passwd",
                     "http://", "ftp://127.0.0.1/", "http://[::1", "http://127.0.0.1:99999/v1", "sk-abc123",
                     "object_counting,", ",,,", "concat;rm -rf /"]),
    st.lists(st.integers(), max_size=3),
    st.none(),
)

# The same classic edge cases for every key, so each of them is tried even when hypothesis
# happens not to draw it.
EDGE_VALUES = [True, False, 0, -1, 1, 2**63 - 1, -(2**63), 10**400, 0.5, -0.5, 1e308, float("nan"), float("inf"),
               -float("inf"), "", " ", "\x00", "line\nbreak", "x" * 100_000, "ünïcødé", "-1", "3", [1, 2], None]

# Literals as a user types them after --run-config, parsed by Flower itself.
TOML_LITERALS = ["0", "-1", "1e400", "-1e400", "inf", "-inf", "nan", "9223372036854775807", "0x7fffffffffffffff",
                 "1_000", "1" + "0" * 400, "1.5", "true", "'\\u0000'", "''", "'  '", "\"\\t\"", "\"\\u202e\""]

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=12, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _leaves(value: object) -> Iterator[object]:
    """Every plain value inside nested settings dataclasses (and tuples of them)."""
    if is_dataclass(value):
        for f in fields(value):
            yield from _leaves(getattr(value, f.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def assert_sane(checked: object) -> None:
    """What 'valid settings' means: typed, finite, non-negative, no control characters."""
    for leaf in _leaves(checked):
        assert leaf is None or isinstance(leaf, (bool, int, float, str)), leaf
        if isinstance(leaf, float):
            assert math.isfinite(leaf) and leaf >= 0, leaf
        elif isinstance(leaf, int) and not isinstance(leaf, bool):
            assert leaf >= 0, leaf
        elif isinstance(leaf, str):
            assert leaf == leaf.strip()
            assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in leaf), repr(leaf)


def assert_clear(error: BaseException, key: str, allowed: set[str] | None = None) -> None:
    """A ConfigError naming ``key`` (or a key that ``key``'s valid value makes wrong), on one line."""
    assert isinstance(error, ConfigError), f"{type(error).__name__}: {error}"
    names = {key} | (allowed if allowed is not None else CONSEQUENCES.get(key, set()))
    assert error.setting in names, f"error names {error.setting!r}, the hostile key was {key!r}: {error}"
    message = str(error)
    assert f"'{error.setting}'" in message and "expected" in message
    assert "\n" not in message and "Traceback" not in message


def check_run_value(key: str, value: object) -> None:
    try:
        checked = RunSettings.from_config({**RUN_CONFIG, key: value})
    except Exception as error:
        assert_clear(error, key)
        return
    assert_sane(checked)


# --- the run config: every key ------------------------------------------------------------


def test_the_run_config_is_read_from_pyproject() -> None:
    """The key list is the real one (so the tests below cover every key), and its defaults are valid."""
    assert {"num-server-rounds", "seed", "llm-timeout", "leakage-guard", "merge-token-budget"} <= set(RUN_KEYS)
    assert len(RUN_KEYS) >= 40
    assert set(RUN_KEYS) == set(schema.BY_KEY)  # every setting of the schema is attacked below
    assert set(NODE_OVERRIDE_KEYS) == schema.NODE_KEYS
    assert {"data-source", "leakage-guard", "llm-base-url", "backward-model"} <= set(NODE_OVERRIDE_KEYS)
    assert {"merge", "task", "num-server-rounds", "server-base-url"} <= set(RUN_ONLY_KEYS)
    assert_sane(RunSettings.from_config(RUN_CONFIG))


@pytest.mark.parametrize("key", RUN_KEYS)
@FAST
@given(value=HOSTILE)
def test_every_run_key_takes_any_value_or_names_itself(key: str, value: object) -> None:
    check_run_value(key, value)


@pytest.mark.parametrize("key", RUN_KEYS)
def test_every_run_key_against_the_edge_table(key: str) -> None:
    for value in EDGE_VALUES:
        check_run_value(key, value)


@pytest.mark.parametrize("key", RUN_KEYS)
def test_values_typed_after_run_config_through_flowers_parser(key: str) -> None:
    for literal in TOML_LITERALS:
        parsed = parse_config_args([f"{key}={literal}"])
        assert list(parsed) == [key]
        check_run_value(key, parsed[key])


@FAST
@given(hostile=st.dictionaries(st.sampled_from(RUN_KEYS), HOSTILE, min_size=2, max_size=8))
def test_several_hostile_keys_at_once_name_one_of_them(hostile: dict[str, object]) -> None:
    allowed = set(hostile).union(*(CONSEQUENCES.get(k, set()) for k in hostile))
    try:
        checked = RunSettings.from_config({**RUN_CONFIG, **hostile})
    except Exception as error:
        assert_clear(error, next(iter(hostile)), allowed)
        return
    assert_sane(checked)


@pytest.mark.parametrize("key, value", [
    ("seed", 2.5), ("partition-id", 1.7), ("num-server-rounds", 2.000001), ("synthetic-size", 10**12),
    ("llm-timeout", 1e300), ("sim-latency-ms", 1e300), ("llm-max-retries", 10**9),
])
def test_nothing_is_rounded_or_left_to_stall(key: str, value: object) -> None:
    """Values that used to be truncated (seed 2.5 -> 2) or accepted and then overflow or hang
    later (a 1e300 s socket timeout, 10**12 synthetic examples, 10**9 retries) are refused."""
    with pytest.raises(ConfigError) as info:
        if key == "partition-id":
            node_identity({"partition-id": value, "num-partitions": 3})
        else:
            RunSettings.from_config({key: value})
    assert info.value.setting == key


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.org/v1", "http://[::1]:9/v1"])
def test_good_urls_pass_the_url_check(url: str) -> None:
    checked = RunSettings.from_config({"llm-backend": "openai", "llm-base-url": url, "llm-model": "m"})
    assert checked.forward.base_url == url and checked.backward.base_url == url


def test_a_pasted_key_is_never_repeated_even_when_it_is_not_text() -> None:
    for value in ("sk-live-\x00abc", 12345678901234, "sk live key"):
        with pytest.raises(ConfigError) as info:
            RunSettings.from_config({"llm-api-key-env": value})
        assert info.value.setting == "llm-api-key-env" and str(value) not in str(info.value)


# --- the node config ------------------------------------------------------------------------

SETTINGS = RunSettings.from_config({**RUN_CONFIG, "synthetic-size": 20})


@FAST
@given(partition_id=HOSTILE, num_partitions=HOSTILE, data_source=HOSTILE)
def test_node_identity_is_checked_or_named(partition_id: object, num_partitions: object, data_source: object) -> None:
    """A node's partition (node_identity) and its own data-source (through its client settings)."""
    node = {"partition-id": partition_id, "num-partitions": num_partitions, "data-source": data_source}
    try:
        identity = node_identity(node)
        checked = client_settings(RUN_CONFIG, node)
    except Exception as error:
        assert_clear(error, "partition-id", {"partition-id", "num-partitions", "data-source"})
        given_value = node[error.setting]
        assert error.value is given_value or error.value == (
            given_value.strip() if isinstance(given_value, str) else given_value) or _is_nan(given_value)
        return
    assert isinstance(identity, NodeIdentity)
    assert type(identity.partition_id) is int and type(identity.num_partitions) is int
    assert_sane(checked.data_source)
    assert checked.data_source == data_source.strip()  # the node's own, as written


@FAST
@given(partition_id=st.one_of(st.integers(-5, 40), st.sampled_from(["0", " 1 ", "+2", "-0", 1.0, 3.0])),
       num_partitions=st.one_of(st.integers(-5, 40), st.sampled_from(["3", 2.0, 0.0])))
def test_a_node_gets_its_share_or_a_named_range_error(partition_id: object, num_partitions: object) -> None:
    """Whole numbers pass the type check; the range is then checked against the data (4 train examples)."""
    identity = node_identity({"partition-id": partition_id, "num-partitions": num_partitions})
    try:
        data = load_client_data(SETTINGS, identity)
    except ConfigError as error:
        assert error.setting in ("partition-id", "num-partitions")
        assert not 0 <= identity.partition_id < identity.num_partitions <= 4
        return
    assert isinstance(data, ClientData) and data.train
    assert 0 <= identity.partition_id < identity.num_partitions <= 4


@pytest.mark.parametrize("key", NODE_OVERRIDE_KEYS)
@FAST
@given(value=HOSTILE)
def test_node_overrides_are_checked_or_named(key: str, value: object) -> None:
    try:
        checked = client_settings(RUN_CONFIG, {key: value})
    except Exception as error:
        assert_clear(error, key)
        return
    assert isinstance(checked.forward, EndpointSettings) and isinstance(checked.backward, EndpointSettings)
    assert_sane(checked)


@pytest.mark.parametrize("key", RUN_ONLY_KEYS)
def test_run_only_keys_in_a_node_config_are_refused_by_name(key: str) -> None:
    """Whatever the value (even the run's own default), a node may not set a run setting."""
    for value in [RUN_CONFIG[key], *EDGE_VALUES[:6], "", "x" * 100_000, None]:
        with pytest.raises(ConfigError) as info:
            client_settings(RUN_CONFIG, {"partition-id": 0, "num-partitions": 2, key: value})
        assert_clear(info.value, key, set())
        assert info.value.value is value


@FAST
@given(key=st.text(max_size=30).filter(lambda k: k not in schema.BY_KEY and k not in NODE_ID_KEYS), value=HOSTILE)
def test_unknown_keys_in_a_node_config_are_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        client_settings(RUN_CONFIG, {"partition-id": 0, "num-partitions": 2, key: value})
    assert info.value.setting == key and "expected" in str(info.value)


# Keys whose accepted values would make this end-to-end test slow or write files are left
# out here (a 59 s sim latency, a cache file named by hypothesis); the tests above cover them.
CLIENT_PATH_KEYS = [*NODE_ID_KEYS, *(k for k in NODE_OVERRIDE_KEYS if k not in ("sim-latency-ms", "llm-cache-path"))]


@SLOW
@given(node=st.dictionaries(st.sampled_from(CLIENT_PATH_KEYS), HOSTILE, max_size=4))
def test_the_whole_client_path_stops_with_a_plain_error(node: dict[str, object]) -> None:
    """A real evaluate call (sim backend, synthetic data) on a hostile node config: it scores,
    or stops with a ConfigError/DataError naming what to fix, before any LLM call is wasted."""
    node = {"partition-id": 0, "num-partitions": 2, **node}
    node.pop("llm-backend", None)  # an accepted 'openai' would need a server: covered above
    node.pop("backward-backend", None)
    run = {**RUN_CONFIG, "synthetic-size": 20}
    request = RoundRequest(phase=Phase.EVALUATE.value, server_round=1, prompt=SETTINGS.start_prompt)
    try:
        reply = answer(run, node, request)
    except (ConfigError, DataError) as error:
        message = str(error)
        assert "\n" not in message and "Traceback" not in message
        if isinstance(error, ConfigError):
            assert error.setting in node
        return
    assert isinstance(reply, EvalReply)
    assert reply.scores.total >= 1 and 0.0 <= reply.scores.accuracy <= 1.0


@pytest.mark.parametrize("key, accepted, refused", [
    ("leakage-ngram", 1, True), ("llm-concurrency", 1, True), ("llm-max-retries", 0, False),
])
def test_a_refused_node_value_stays_refused_after_an_equal_one_was_accepted(key: str, accepted: object,
                                                                             refused: object) -> None:
    node = {"partition-id": 0, "num-partitions": 2}
    with pytest.raises(ConfigError):
        RunSettings.from_config({**RUN_CONFIG, key: refused})  # refused on its own
    client_settings(RUN_CONFIG, {**node, key: accepted})
    with pytest.raises(ConfigError) as info:
        client_settings(RUN_CONFIG, {**node, key: refused})
    assert info.value.setting == key
