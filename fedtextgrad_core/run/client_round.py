"""What a client does when the server asks: train the prompt locally, or score it.

The ClientApp only unpacks Flower messages and calls these two functions with plain
dicts, so the same code serves simulation, a real SuperNode and the tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.errors import ConfigError, LeakageError
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.method.leakage import LeakReport, guard_prompt
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.local_training import LocalSettings, train_prompt
from fedtextgrad_core.data.partitioning import ClientData, client_data
from fedtextgrad_core.run.settings import RunSettings, client_endpoints, text_setting
from fedtextgrad_core.data.tasks import get_task

SPLITS = ("val", "test")
# A site decides for itself what leaves it: its node config may override these run settings.
NODE_LEAKAGE_KEYS = ("leakage-guard", "leakage-ngram")


@dataclass(frozen=True)
class NodeIdentity:
    partition_id: int
    num_partitions: int
    data_source: str


def node_identity(settings: RunSettings, node_config: Mapping[str, object]) -> NodeIdentity:
    """Which share of the data this node holds: simulation injects partition-id and
    num-partitions; a real SuperNode sets them (and optionally its own data-source)."""
    partition_id, num_partitions = (_node_int(node_config, key) for key in ("partition-id", "num-partitions"))
    # The node's own data-source is checked like the run's: quoted text, no control characters.
    source = text_setting(node_config, "data-source", "") or settings.data_source
    return NodeIdentity(partition_id, num_partitions, source)


_WHOLE_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def _node_int(node_config: Mapping[str, object], key: str) -> int:
    """A whole number from the node config: an int, a whole float (1.0) or its digits as text.

    Nothing is rounded: partition-id 1.7 is refused, not silently read as client 1.
    The range (0 <= partition-id < num-partitions) is checked with the data.
    """
    value = node_config.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _WHOLE_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise ConfigError(
        key, value,
        "an integer in the node config: simulation sets 'partition-id' and 'num-partitions'; "
        "a SuperNode needs e.g. flower-supernode --node-config \"partition-id=0 num-partitions=2\"",
    )


def load_client_data(settings: RunSettings, node: NodeIdentity) -> ClientData:
    return client_data(settings.partitioning, settings.tasks, node.partition_id, node.num_partitions,
                       node.data_source, settings.seed, settings.synthetic_size)


def local_round(run_config: Mapping[str, object], node_config: Mapping[str, object], prompt: str,
                server_round: int, round_config: Mapping[str, object]) -> tuple[str, dict[str, float], int]:
    """Improve ``prompt`` on this node's training data; returns (prompt, metrics, examples)."""
    site_choice = {key: node_config[key] for key in NODE_LEAKAGE_KEYS if key in node_config}
    settings = RunSettings.from_config({**run_config, **round_config, **site_choice})
    node = node_identity(settings, node_config)
    data = load_client_data(settings, node)
    task = get_task(data.task)
    forward_settings, backward_settings = client_endpoints(run_config, node_config)
    forward = make_engine(forward_settings, "llm-api-key-env")
    backward = forward if backward_settings == forward_settings else make_engine(backward_settings, "backward-api-key-env")
    local = LocalSettings(settings.local.steps, settings.local.batch_size, settings.local.proximal, settings.seed)
    result = train_prompt(prompt, task, data.train, forward, backward, local,
                          stream=f"round{server_round}:client{node.partition_id}",
                          format_instruction=settings.format_instruction)
    leaks = check_leakage(result.prompt, data.train, settings)
    metrics: dict[str, float] = {k: float(v) for k, v in result.metrics.as_dict().items()}
    metrics.update(leaks.as_metrics())
    metrics["partition_id"] = float(node.partition_id)
    if settings.client_val_eval and data.val:
        scores = evaluate_prompt(forward, task, leaks.prompt, data.val)
        metrics["val_accuracy"] = scores.accuracy
        metrics["val_examples"] = float(scores.total)
        spent = forward.take_usage()
        metrics["eval_llm_calls"] = float(spent.calls)
        metrics["eval_tokens"] = float(spent.prompt_tokens + spent.completion_tokens)
        metrics["eval_llm_retries"] = float(spent.retries)
        metrics["eval_cache_hits"] = float(spent.cache_hits)
    return leaks.prompt, metrics, len(data.train)


def check_leakage(prompt: str, train: Sequence[Example], settings: RunSettings) -> LeakReport:
    """The leakage guard on a prompt about to be uploaded (see leakage.py).

    Refusing raises, so the ClientApp answers with an error and the prompt never leaves
    the node. The message gives counts only: it travels to the server, and quoting the
    passage in it would leak the very text the guard caught.
    """
    report = guard_prompt(prompt, train, settings.leakage_ngram, settings.leakage_guard)
    if settings.leakage_guard == "refuse" and report.passages:
        raise LeakageError(
            f"upload refused by the leakage guard: the trained prompt repeats {report.passages} passage(s) of this "
            f"client's training examples verbatim (longest {report.longest} tokens; {settings.leakage_ngram} or more "
            "tokens in a row shared with a training question or answer count); nothing was uploaded. To upload the "
            "prompt with those passages removed, set leakage-guard='redact' (run config, or this node's own "
            "--node-config, which takes precedence)."
        )
    return report


def evaluate_split(run_config: Mapping[str, object], node_config: Mapping[str, object], prompt: str,
                   split: str) -> dict[str, float]:
    """Score ``prompt`` on this node's validation or test split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    settings = RunSettings.from_config(run_config)
    node = node_identity(settings, node_config)
    data = load_client_data(settings, node)
    task = get_task(data.task)
    forward_settings, _ = client_endpoints(run_config, node_config)
    engine = make_engine(forward_settings, "llm-api-key-env")
    scores = evaluate_prompt(engine, task, prompt, getattr(data, split))
    spent = engine.take_usage()
    return {
        "correct": float(scores.correct),
        "total": float(scores.total),
        "accuracy": scores.accuracy,
        "malformed": float(scores.malformed),
        "partition_id": float(node.partition_id),
        "llm_calls": float(spent.calls),
        "tokens": float(spent.prompt_tokens + spent.completion_tokens),
        "llm_retries": float(spent.retries),
        "cache_hits": float(spent.cache_hits),
        "seconds": scores.seconds,
    }
