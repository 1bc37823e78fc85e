"""What a client does when the server asks: train the prompt locally, or score it.

The ClientApp only unpacks Flower messages and calls these two functions with plain
dicts, so the same code serves simulation, a real SuperNode and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError
from .evaluation import evaluate_prompt
from .llm import make_engine
from .local_training import LocalSettings, train_prompt
from .partitioning import ClientData, client_data
from .settings import RunSettings, client_endpoints
from .tasks import get_task

SPLITS = ("val", "test")


@dataclass(frozen=True)
class NodeIdentity:
    partition_id: int
    num_partitions: int
    data_source: str


def node_identity(settings: RunSettings, node_config: Mapping[str, object]) -> NodeIdentity:
    """Which share of the data this node holds: simulation injects partition-id and
    num-partitions; a real SuperNode sets them (and optionally its own data-source)."""
    ids = []
    for key in ("partition-id", "num-partitions"):
        value = node_config.get(key)
        try:
            if isinstance(value, bool):
                raise TypeError(key)
            ids.append(int(value))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(
                key, value,
                "an integer in the node config: simulation sets 'partition-id' and 'num-partitions'; "
                "a SuperNode needs e.g. flower-supernode --node-config \"partition-id=0 num-partitions=2\"",
            ) from None
    partition_id, num_partitions = ids
    source = str(node_config.get("data-source") or settings.data_source)
    return NodeIdentity(partition_id, num_partitions, source)


def load_client_data(settings: RunSettings, node: NodeIdentity) -> ClientData:
    return client_data(settings.partitioning, settings.tasks, node.partition_id, node.num_partitions,
                       node.data_source, settings.seed, settings.synthetic_size)


def local_round(run_config: Mapping[str, object], node_config: Mapping[str, object], prompt: str,
                server_round: int, round_config: Mapping[str, object]) -> tuple[str, dict[str, float], int]:
    """Improve ``prompt`` on this node's training data; returns (prompt, metrics, examples)."""
    settings = RunSettings.from_config({**run_config, **round_config})
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
    metrics: dict[str, float] = {k: float(v) for k, v in result.metrics.as_dict().items()}
    metrics["partition_id"] = float(node.partition_id)
    if settings.client_val_eval and data.val:
        scores = evaluate_prompt(forward, task, result.prompt, data.val)
        metrics["val_accuracy"] = scores.accuracy
        metrics["val_examples"] = float(scores.total)
        spent = forward.take_usage()
        metrics["eval_llm_calls"] = float(spent.calls)
        metrics["eval_tokens"] = float(spent.prompt_tokens + spent.completion_tokens)
        metrics["eval_llm_retries"] = float(spent.retries)
        metrics["eval_cache_hits"] = float(spent.cache_hits)
    return result.prompt, metrics, len(data.train)


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
