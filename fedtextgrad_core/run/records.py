"""What a run keeps on disk, as typed records: one line of ``rounds.jsonl`` per round, ``summary.json``.

``RoundRecord`` and ``RunSummary`` are written with ``to_json`` and read back with
``from_json``; ``from_json`` also reads the folders of runs recorded before these records
existed (version 1: client metrics as one flat dict, validation per client keyed by
label), so old runs still resume and compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run.codec import from_plain, to_plain
from fedtextgrad_core.run.messages import EvalReply, TrainReply
from fedtextgrad_core.stats import Interval, PairedComparison

ROUND_RECORD_VERSION = 2


@dataclass(frozen=True)
class ClientId:
    """Who a client is, as the server knows it: the Flower node id, and the name its key was registered
    under in a deployment with node authentication. The partition id the client reports is shown beside
    it, but never identifies it: two nodes may claim the same partition, and a node may claim any."""

    node_id: int
    name: str = ""  # the SuperNode's registered name, or its public key's fingerprint; empty in simulation
    partition_id: int | None = None  # as the client reported it

    @property
    def key(self) -> str:
        """Unique within a run: what files and records are keyed by."""
        return str(self.node_id)


@dataclass(frozen=True)
class Failure:
    """A client that did not deliver: the stage (train, upload, evaluate, test) and its own error line."""

    label: str
    stage: str
    reason: str
    node_id: int | None = None


@dataclass(frozen=True)
class ClientUpload:
    """One client's upload in a round, as merged (or left out)."""

    label: str
    client: ClientId
    reply: TrainReply
    prompt_metrics: dict[str, Any] | None = None
    holdout_accuracy: float | None = None  # robust merge: the upload's accuracy on the server's held-out set
    left_out: bool = False  # robust merge: not merged


@dataclass(frozen=True)
class ClientEvaluation:
    label: str
    client: ClientId
    reply: EvalReply


@dataclass(frozen=True)
class MergeRecord:
    """How the round's prompts were merged (method/merging.py ``MergeResult`` without the prompt)."""

    method: str
    fallback_reason: str = ""
    format_repaired: bool = False
    token_budget: int | None = None
    dropped_sentences: tuple[str, ...] = ()
    duplicates_removed: int = 0
    summariser_calls: int = 0
    levels: int = 0
    largest_summariser_input_tokens: int = 0
    tokenizer: str = ""


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round did: uploads, failures, the merge, the merged prompt's evaluation."""

    round: int
    uploads: tuple[ClientUpload, ...]
    failures: tuple[Failure, ...]
    merge: MergeRecord
    merged_prompt: str
    merged_prompt_metrics: dict[str, Any] | None
    evaluations: tuple[ClientEvaluation, ...]
    val_accuracy: float | None
    val_examples: int
    best_val_accuracy: float | None
    best_round: int
    server_llm: Usage | None = None  # what the server's own LLM spent: merging and robust scoring
    val_interval: Interval | None = None  # the validation accuracy with its n and 95% interval
    # the merged prompt against the best prompt before this round, on the validation examples both were
    # scored on (under best-rule = paired, what decided whether it became the best)
    best_comparison: PairedComparison | None = None
    robust_merge: dict[str, Any] | None = None  # scores, median, margin, left out, and what scoring cost
    seconds: float = 0.0  # training, merging and evaluation
    started_at: float = 0.0
    ended_at: float = 0.0
    version: int = ROUND_RECORD_VERSION

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = to_plain(self)
        return plain

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        if int(data.get("version", 1)) < 2:
            data = _round_v1(data)
        return from_plain(cls, data)


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: where a run stands, rewritten after every round and at the end."""

    finished: bool
    error: str
    rounds: int
    rounds_planned: int
    task: tuple[str, ...]
    partitioning: str
    merge: str
    initial_prompt: str
    initial_val_accuracy: float | None
    best_val_accuracy: float | None
    best_round: int
    best_prompt: str
    final_prompt: str
    results_dir: str
    initial_prompt_metrics: dict[str, Any] | None = None
    test_accuracy: float | None = None  # the best prompt (by validation) on the clients' test splits
    last_test_accuracy: float | None = None  # the last merged prompt on the test splits
    initial_test_accuracy: float | None = None  # the start prompt on the test splits
    test_examples: int = 0
    test_failures: tuple[Failure, ...] = ()
    resumed_after_rounds: tuple[int, ...] = ()
    cost: dict[str, dict[str, int]] = field(default_factory=dict)  # LLM calls and tokens by where they were spent
    client_llms: dict[str, str] = field(default_factory=dict)  # client label -> its LLM, as the client reported it
    server_llm: str = ""  # the ServerApp's own LLM, or why it has none
    simulated: bool = False  # some number of this run comes from the simulated LLM
    seconds: float = 0.0  # wall time of the run so far, across resumes
    best_rule: str = "reference"
    initial_val_interval: Interval | None = None
    # the start prompt's validation scored again (start-eval-repeats), and how many of its examples changed
    initial_val_repeats: tuple[Interval, ...] = ()
    initial_val_changed: int | None = None
    best_val_interval: Interval | None = None
    test_intervals: dict[str, Interval] = field(default_factory=dict)  # tested prompt -> its test accuracy
    test_by_task: dict[str, dict[str, Interval]] = field(default_factory=dict)  # tested prompt -> task -> ...
    # "best vs initial", "last vs initial": paired on the test examples both were scored on
    comparisons: dict[str, PairedComparison] = field(default_factory=dict)
    test_outcomes: dict[str, dict[str, bool]] = field(default_factory=dict)  # tested prompt -> example id -> right

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = to_plain(self)
        return plain

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        data = dict(data)
        if isinstance(data.get("task"), str):
            data["task"] = [data["task"]]
        data["test_failures"] = [_failure_v1(f, "test") for f in data.get("test_failures") or []]
        return from_plain(cls, data)

    def with_changes(self, **changes: Any) -> RunSummary:
        return replace(self, **changes)


# --- version 1 (before typed records) -----------------------------------------------------------------


def _num(metrics: Mapping[str, Any], key: str, default: float = 0) -> Any:
    value = metrics.get(key, default)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _failure_v1(failure: Mapping[str, Any], stage: str) -> dict[str, Any]:
    return {"label": str(failure.get("label", "?")), "stage": str(failure.get("stage", stage)),
            "reason": str(failure.get("reason", "")), "node_id": failure.get("node_id")}


def _client_id_v1(label: str, partition: Any) -> dict[str, Any]:
    partition_id = int(partition) if isinstance(partition, (int, float)) else (int(label) if label.isdigit() else None)
    return {"node_id": -1, "name": "", "partition_id": partition_id}


def _round_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 round line as a version-2 record: flat client metrics become the typed reply."""
    uploads = []
    for client in data.get("clients") or []:
        metrics = client.get("metrics") or {}
        label = str(client.get("label", "?"))
        local = {name: _num(metrics, name) for name in LocalMetrics.__dataclass_fields__}
        val = None
        if "val_accuracy" in metrics:
            total = int(_num(metrics, "val_examples"))
            val = to_plain(Scores(correct=round(_num(metrics, "val_accuracy") * total), total=total, malformed=0,
                                  seconds=0.0))
        reply = {
            "prompt": client.get("prompt", ""), "partition_id": _client_id_v1(label, metrics.get("partition_id"))
            ["partition_id"] or 0, "num_examples": int(client.get("num_examples", _num(metrics, "num-examples"))),
            "llm": "", "simulated": True, "local": local,
            "leaks": to_plain(LeakCounts(int(_num(metrics, "leak_passages")), int(_num(metrics, "leaked_ngrams")),
                                         int(_num(metrics, "leak_redactions")),
                                         int(_num(metrics, "leak_longest_tokens")))),
            "val": val,
            "val_usage": to_plain(Usage(calls=int(_num(metrics, "eval_llm_calls")),
                                        prompt_tokens=int(_num(metrics, "eval_tokens")),
                                        retries=int(_num(metrics, "eval_llm_retries")),
                                        cache_hits=int(_num(metrics, "eval_cache_hits")))) if val else None,
        }
        uploads.append({"label": label, "client": _client_id_v1(label, metrics.get("partition_id")), "reply": reply,
                        "prompt_metrics": client.get("prompt_metrics"),
                        "holdout_accuracy": client.get("holdout_accuracy"), "left_out": bool(client.get("left_out"))})
    evaluations = []
    for label, metrics in (data.get("val_per_client") or {}).items():
        client = _client_id_v1(str(label), metrics.get("partition_id"))
        scores = Scores(correct=int(_num(metrics, "correct")), total=int(_num(metrics, "total")),
                        malformed=int(_num(metrics, "malformed")), seconds=float(_num(metrics, "seconds")))
        usage = Usage(calls=int(_num(metrics, "llm_calls")), prompt_tokens=int(_num(metrics, "tokens")),
                      retries=int(_num(metrics, "llm_retries")), cache_hits=int(_num(metrics, "cache_hits")))
        evaluations.append({"label": str(label), "client": client,
                            "reply": {"partition_id": client["partition_id"] or 0, "llm": "", "simulated": True,
                                      "scores": to_plain(scores), "usage": to_plain(usage)}})
    merge = {"method": data.get("merge_method", ""), "fallback_reason": data.get("merge_fallback_reason", ""),
             "format_repaired": bool(data.get("merge_format_repaired", False)),
             "token_budget": data.get("merge_token_budget"),
             "dropped_sentences": data.get("merge_dropped_sentences") or [],
             "duplicates_removed": int(data.get("merge_duplicates_removed", 0)),
             "summariser_calls": int(data.get("merge_summariser_calls", 0)),
             "levels": int(data.get("merge_levels", 0)),
             "largest_summariser_input_tokens": int(data.get("merge_largest_summariser_input_tokens", 0)),
             "tokenizer": data.get("merge_tokenizer", "")}
    server = data.get("server_llm") or None
    return {
        "round": int(data["round"]), "uploads": uploads,
        "failures": [_failure_v1(f, "train") for f in data.get("failures") or []],
        "merge": merge, "merged_prompt": data.get("merged_prompt", ""),
        "merged_prompt_metrics": data.get("merged_prompt_metrics"), "evaluations": evaluations,
        "val_accuracy": data.get("val_accuracy"), "val_examples": int(data.get("val_examples", 0)),
        "best_val_accuracy": data.get("best_val_accuracy"), "best_round": int(data.get("best_round", 0)),
        "server_llm": server, "robust_merge": data.get("robust_merge"),
        "seconds": float(data.get("seconds", 0.0)), "started_at": float(data.get("started_at", 0.0)),
        "ended_at": float(data.get("ended_at", 0.0)), "version": ROUND_RECORD_VERSION,
    }


def uploads_of(records: Sequence[RoundRecord]) -> list[tuple[int, ClientUpload]]:
    return [(record.round, upload) for record in records for upload in record.uploads]
