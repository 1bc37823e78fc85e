"""A ClientPool of plain data for the server's loop without Flower, and the replies it hands out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedtextgrad_core.llm.engine import Usage, make_engine
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run.federation import Federation, Replies
from fedtextgrad_core.run.messages import EvalReply, Phase, RoundRequest, TrainReply
from fedtextgrad_core.run.recorder import Recorder
from fedtextgrad_core.run.records import ClientId
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.sim import CATALOGUE, insert_instruction
from tests.support.flower_loopback import default_run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEARNED = CATALOGUE["object_counting"]

Answer = TrainReply | EvalReply | str  # a reply, or the reason the client failed
# by node; a function of the request: built when asked (the test phase may score several prompts)
Answers = Mapping[int, Answer] | Callable[[RoundRequest], Mapping[int, Answer]]


class ScriptedPool:
    """A ClientPool of plain data: what each node answers, per (phase, round).

    Node ``100 + i`` holds partition ``i``. Answers come back in reverse node order, so a
    test can see that the loop orders them itself. ``watch`` is called before each request
    is answered (to look at the run folder as the run goes).
    """

    def __init__(self, partitions: int, script: Mapping[tuple[Phase, int], Answers],
                 watch: Callable[[RoundRequest], None] | None = None):
        self.nodes = [100 + i for i in range(partitions)]
        self.script = script
        self.watch = watch
        self.asked: list[tuple[RoundRequest, list[int]]] = []

    def connected(self, wanted: int, deadline: float = 0.0) -> list[int]:
        assert len(self.nodes) >= wanted
        return list(self.nodes)

    def ask(self, request: RoundRequest, node_ids: Sequence[int]) -> Replies:
        self.asked.append((request, list(node_ids)))
        if self.watch is not None:
            self.watch(request)
        answers = self.script[(request.kind, request.server_round)]
        if callable(answers):
            answers = answers(request)
        replies = Replies()
        for node in sorted(node_ids, reverse=True):
            answer = answers[node]
            if isinstance(answer, str):
                replies.failures.append((ClientId(node), answer))
            else:
                replies.answers.append((ClientId(node, "", answer.partition_id), answer))
        return replies


def train_reply(partition: int, prompt: str, calls: int) -> TrainReply:
    return TrainReply(prompt=prompt, partition_id=partition, num_examples=5, llm="sim (test)", simulated=True,
                      local=LocalMetrics(steps=3, steps_accepted=1, llm_calls=calls, prompt_tokens=100,
                                         completion_tokens=20),
                      leaks=LeakCounts(), val=Scores(correct=5, total=10, malformed=0, seconds=0.0),
                      val_usage=Usage(calls=10, prompt_tokens=40, completion_tokens=2))


def eval_reply(partition: int, correct: int, total: int) -> EvalReply:
    """``total`` examples, one LLM call each of 10 + 1 tokens."""
    return EvalReply(partition_id=partition, llm="sim (test)", simulated=True,
                     scores=Scores(correct=correct, total=total, malformed=0, seconds=0.0),
                     usage=Usage(calls=total, prompt_tokens=10 * total, completion_tokens=total))


def uploads(start: str, learned=LEARNED[:2], first_partition: int = 0) -> dict[int, TrainReply]:
    return {100 + first_partition + i: train_reply(first_partition + i, insert_instruction(start, ins.sentence), 10 + i)
            for i, ins in enumerate(learned)}


def evals(*scores: tuple[int, int]) -> dict[int, EvalReply]:
    return {100 + i: eval_reply(i, correct, total) for i, (correct, total) in enumerate(scores)}


def start_prompt() -> str:
    return RunSettings.from_config({}).start_prompt


def make_federation(tmp_path: Path, pool: ScriptedPool, merge: str = "concat", rounds: int = 2,
                    lines: list[str] | None = None, **overrides) -> Federation:
    run_config = default_run_config(**{"merge": merge, "num-server-rounds": rounds, "min-train-clients": 1,
                                       "results-dir": str(tmp_path), "run-name": "run", "test-prompts": "best",
                                       **overrides})
    settings = RunSettings.from_config(run_config)
    echo = (lines if lines is not None else []).append
    recorder, state = Recorder.open(settings, run_config, echo=echo)
    merger = make_engine(settings.server, "server-api-key-env") if merge != "concat" else None
    return Federation(settings, pool, recorder, state, merger)


def eval_outcomes(partition: int, right: Sequence[bool], split: str = "val") -> EvalReply:
    """An evaluation reply with per-example outcomes: example i of this partition right or not."""
    ids = tuple(f"object_counting/{split}/{10 * partition + i}" for i in range(len(right)))
    scores = Scores(correct=sum(right), total=len(right), malformed=0, seconds=0.0, example_ids=ids,
                    example_correct=tuple(right), example_malformed=(False,) * len(right))
    return EvalReply(partition_id=partition, llm="sim (test)", simulated=True, scores=scores,
                     usage=Usage(calls=len(right), prompt_tokens=10 * len(right), completion_tokens=len(right)))
