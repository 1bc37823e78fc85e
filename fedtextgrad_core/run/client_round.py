"""What a client does when the server asks: train the prompt locally, or score it.

The ClientApp hands the requests of a message to ``answer_each`` with its run and node config and
sends back the replies, so the same code serves simulation, a real SuperNode and the tests.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from fedtextgrad_core.data.examples import Example
from fedtextgrad_core.data.partitioning import ClientData, client_data
from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError, FedTextGradError, LeakageError, RefusedInput
from fedtextgrad_core.fingerprint import code_fingerprint
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.evaluation import evaluate_prompt
from fedtextgrad_core.method.judge import Judge
from fedtextgrad_core.method.leakage import LeakReport, guard_prompt
from fedtextgrad_core.method.local_training import train_prompt
from fedtextgrad_core.method.upload_checks import hidden_text_problem, visible_only
from fedtextgrad_core.run import schema, site_steps
from fedtextgrad_core.run.messages import ErrorReply, EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.settings import RunSettings, client_settings, real_clients_need_a_server_llm

Config = Mapping[str, object]


@dataclass(frozen=True)
class NodeIdentity:
    partition_id: int
    num_partitions: int


def node_identity(node_config: Config) -> NodeIdentity:
    """Which share of the data this node holds: simulation injects partition-id and
    num-partitions; a real SuperNode sets them in its node config."""
    return NodeIdentity(*(_node_int(node_config, key) for key in ("partition-id", "num-partitions")))


_WHOLE_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def _node_int(node_config: Config, key: str) -> int:
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
    """This node's examples: ``client_data``, with the dealing done once per process.

    A homogeneous partition shuffles every split of the task with the seed and gives client
    ``i`` of ``n`` the i-th of ``n`` contiguous runs. The shuffle depends only on the seed and the
    split sizes, so it is done once, for all clients (``client_data`` with one partition, which
    keeps the whole shuffled splits), and each client's share is cut from it with the same run
    boundaries. A simulated client process answers messages for many nodes, and with many
    synthetic examples dealing afresh per message costs several times the message's own work
    (docs/performance.md). Only for synthetic data: a data file is looked at again for every
    message (a site may replace or remove it mid-run), and real splits are small. Anything else
    goes to ``client_data`` itself (and its errors).
    """
    pid, n = node.partition_id, node.num_partitions
    if (settings.partitioning == "homogeneous" and settings.data_source == "synthetic" and _whole_number(pid)
            and _whole_number(n) and 0 <= pid < n):
        whole = _dealt(settings.partitioning, tuple(settings.tasks), settings.data_source, settings.seed,
                       settings.synthetic_size, settings.max_val_examples, settings.max_test_examples,
                       settings.gsm8k_split)
        if whole is not None and n <= len(whole.train):
            return ClientData(task=whole.task, train=_run_of(whole.train, pid, n), val=_run_of(whole.val, pid, n),
                              test=_run_of(whole.test, pid, n))
    return client_data(settings.partitioning, settings.tasks, pid, n, settings.data_source, settings.seed,
                       settings.synthetic_size, settings.max_val_examples, settings.max_test_examples,
                       settings.gsm8k_split)


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@lru_cache(maxsize=4)
def _dealt(partitioning: str, tasks: tuple[str, ...], source: str, seed: int, size: int, val_limit: int,
           test_limit: int, gsm8k_split: str) -> ClientData | None:
    """Every split of the task in the order the partition deals it out (one partition holds all)."""
    try:
        return client_data(partitioning, list(tasks), 0, 1, source, seed, size, val_limit, test_limit, gsm8k_split)
    except FedTextGradError:  # said again, in full, by client_data for the node that asked
        return None


def _run_of(items: Sequence[Example], partition_id: int, num_partitions: int) -> list[Example]:
    """Client ``partition_id``'s contiguous run of ``items``: sizes differ by at most one, the
    longer runs first (as ``data.partitioning`` cuts them)."""
    base, extra = divmod(len(items), num_partitions)
    start = partition_id * base + min(partition_id, extra)
    return list(items[start:start + base + (1 if partition_id < extra else 0)])


def forward_engine(settings: RunSettings) -> ChatEngine:
    return make_engine(settings.forward, "llm-api-key-env")


def backward_engine(settings: RunSettings, forward: ChatEngine) -> ChatEngine:
    if settings.backward == settings.forward:
        return forward
    return make_engine(settings.backward, "backward-api-key-env")


def failed(error: BaseException, node_config: Config, site: bool = True) -> ErrorReply:
    """The reply of a client that could not answer: its error in one line, with the partition it holds
    when the node config says (the server has no other name for a node that never answered). At a
    ``site`` of a deployment the line is the one that may leave it (``FedTextGradError.shareable``: no
    quoted data, no server's answer) and the whole message goes to the site's own log; in a
    simulation every client is the submitter's own and its terminal the only log, so the whole
    message is the reply."""
    line = str(error)
    if site:
        print(f"fedtextgrad: this client could not answer a request of the server: {error}", file=sys.stderr,
              flush=True)
        line = error.shareable() if isinstance(error, FedTextGradError) else line
    partition = node_config.get("partition-id")
    known = partition if isinstance(partition, int) and not isinstance(partition, bool) else None
    return ErrorReply(error=" ".join(line.split()), partition_id=known)


def answer_each(run_config: Config, node_config: Config, requests: Sequence[object], pinned: bool = True
                ) -> list[TrainReply | EvalReply | ErrorReply]:
    """This node's replies to the requests of one message, in order. A request this project's code
    cannot answer (a setting, a data file, an unreachable LLM server) gets an ``ErrorReply`` with the
    one line saying why; the others are still answered. ``pinned``: this node is a site of a deployment,
    whose site settings the run config may not move (``settings.client_config``) and whose errors
    leave it only as ``shareable`` lines."""
    replies: list[TrainReply | EvalReply | ErrorReply] = []
    for raw in requests:
        try:
            replies.append(answer(run_config, node_config, RoundRequest.decode(raw), pinned))
        except FedTextGradError as exc:
            replies.append(failed(exc, node_config, site=pinned))
    return replies


def answer(run_config: Config, node_config: Config, request: RoundRequest, pinned: bool = True
           ) -> TrainReply | EvalReply:
    """This node's reply to ``request``: train in the training phase, else score."""
    # parsed once per process: only the keys a node may set matter, not its partition id
    settings = client_settings(run_config, schema.node_overrides(node_config), pinned)
    node = node_identity(node_config)
    hidden = hidden_text_problem(request.prompt, "the prompt the server sent")
    if hidden:  # text this site's optimizer would read beside its private data, unseen by any person
        raise RefusedInput(f"{hidden}; this site did not use it")
    if request.kind is Phase.TRAIN:
        if request.simulated_only and not settings.forward.simulated:
            # the server stops the run on this client's evaluation sent with this request; not trained
            raise real_clients_need_a_server_llm(f"this client uses {settings.forward.describe()}, so it did not train")
        # in Flower's simulation (not pinned) the client is the submitter's own: it keeps its steps in the run folder
        return local_round(settings, node, request, log_steps_of=None if pinned else run_config)
    if request.uncached:
        settings = replace(settings, forward=replace(settings.forward, cache_path=""))
    return evaluate_split(settings, node, request.prompt, request.kind.data_split)


def local_round(settings: RunSettings, node: NodeIdentity, request: RoundRequest,
                log_steps_of: Config | None = None) -> TrainReply:
    """Improve the request's prompt on this node's training data; ``log_steps_of``: the run config of a
    simulation, whose run folder gets this client's steps with their feedback (site_steps.py)."""
    data = load_client_data(settings, node)
    task = get_task(data.task)
    if settings.local.batch_size > len(data.train):
        raise ConfigError("batch-size", settings.local.batch_size,
                          f"at most {len(data.train)}, the training examples this client holds")
    forward = forward_engine(settings)
    backward = backward_engine(settings, forward)
    judge = Judge(make_engine(settings.judge, "judge-api-key-env")) if settings.loss == "judge" else None
    result = train_prompt(request.prompt, task, data.train, forward, backward, settings.local,
                          stream=f"round{request.server_round}:client{node.partition_id}",
                          format_instruction=settings.format_instruction, judge=judge)
    if log_steps_of is not None:
        site_steps.record(log_steps_of, node.partition_id, request.server_round, result.steps)
    leaks = check_leakage(visible_only(result.prompt), data.train, settings)
    val = val_usage = None
    if settings.client_val_eval and data.val:
        val = evaluate_prompt(forward, task, leaks.prompt, data.val, settings.local.parser)
        val_usage = forward.take_usage()
    return TrainReply(prompt=leaks.prompt, partition_id=node.partition_id, num_examples=len(data.train),
                      llm=settings.forward.describe(), simulated=settings.forward.simulated, local=result.metrics,
                      leaks=leaks.counts, code=code_fingerprint(),
                      val=val, val_usage=val_usage)


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


def evaluate_split(settings: RunSettings, node: NodeIdentity, prompt: str, split: str) -> EvalReply:
    """Score ``prompt`` on this node's validation or test split."""
    data = load_client_data(settings, node)
    task = get_task(data.task)
    engine = forward_engine(settings)
    scores = evaluate_prompt(engine, task, prompt, getattr(data, split), settings.local.parser)
    return EvalReply(partition_id=node.partition_id, llm=settings.forward.describe(),
                     simulated=settings.forward.simulated, scores=scores, usage=engine.take_usage(),
                     code=code_fingerprint())
