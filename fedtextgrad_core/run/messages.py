"""The wire format: what the server and a client say to each other, and where it sits in a message.

The server sends ``RoundRequest`` records; a client answers each with a ``TrainReply``, an
``EvalReply``, or an ``ErrorReply`` (the one line saying why it could not). Each record turns into
the flat ``key -> value`` map a Flower ``ConfigRecord`` holds (``encode``) and back (``decode``),
and both Flower apps use exactly these functions and keys, so the two sides cannot disagree.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.method.evaluation import Scores
from fedtextgrad_core.method.leakage import LeakCounts
from fedtextgrad_core.method.local_training import LocalMetrics
from fedtextgrad_core.run.codec import MalformedRecord, flatten, from_plain, to_plain, unflatten

# A message carries one or more requests, answered in order: the first under REQUEST_RECORD, the
# others under "request-1", "request-2", ...; their replies come back under REPLY_RECORD, "reply-1", ...
REQUEST_RECORD = "request"
REPLY_RECORD = "reply"

R = TypeVar("R", bound="_Codec")


def request_key(position: int) -> str:
    return REQUEST_RECORD if position == 0 else f"{REQUEST_RECORD}-{position}"


def reply_key(position: int) -> str:
    return REPLY_RECORD if position == 0 else f"{REPLY_RECORD}-{position}"


def request_keys(content: Container[str]) -> list[str]:
    """The keys of the requests a message holds, in the order they are to be answered."""
    keys: list[str] = []
    while request_key(len(keys)) in content:
        keys.append(request_key(len(keys)))
    return keys


class Phase(StrEnum):
    """What a message asks of a client. A round has a training and an evaluation phase; the run
    begins with an evaluation of the start prompt (round 0) and ends with the test phase."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    TEST = "test"

    @property
    def data_split(self) -> str:
        """The data split the phase scores on (training uses the training split)."""
        return {"train": "train", "evaluate": "val", "test": "test"}[self.value]


class _Codec:
    """``encode``/``decode`` between a record and a flat map (a Flower ConfigRecord's content)."""

    def encode(self) -> dict[str, Any]:
        return flatten(to_plain(self))

    @classmethod
    def decode(cls: type[R], flat: object) -> R:
        if not isinstance(flat, Mapping):
            raise MalformedRecord(f"the message holds no {cls.__name__} record")
        return from_plain(cls, unflatten(flat))


@dataclass(frozen=True)
class RoundRequest(_Codec):
    """Server -> client: the phase, the round it belongs to, and the prompt to train or score."""

    phase: str  # a Phase value
    server_round: int  # 0: the start prompt's evaluation; the test phase carries the last finished round
    prompt: str
    # a training request only for a client whose LLM is the simulated one: the server would merge with
    # the simulator (server-backend left unset) and stops the run when a client's LLM is real, so such
    # a client must not spend its LLM on training (RunSettings.server_sim_by_default)
    simulated_only: bool = False
    # score without the client's reply cache: a repeat of an evaluation, to measure the LLM server's own
    # noise (start-eval-repeats), which cached replies would hide
    uncached: bool = False

    @property
    def kind(self) -> Phase:
        try:
            return Phase(self.phase)
        except ValueError:
            raise MalformedRecord(f"phase {self.phase!r} is not one of {', '.join(p.value for p in Phase)}") from None


@dataclass(frozen=True)
class TrainReply(_Codec):
    """Client -> server after local training: the improved prompt and what it took."""

    prompt: str
    partition_id: int  # the share of the data the client says it holds: for display only
    num_examples: int  # training examples
    llm: str  # the client's forward model, as the client describes it
    simulated: bool  # that model is the simulated LLM
    local: LocalMetrics
    leaks: LeakCounts
    val: Scores | None = None  # the client's own new prompt on its validation split (client-val-eval)
    val_usage: Usage | None = None  # what that validation cost
    code: str = ""  # the fingerprint of the code the client runs (fingerprint.py)


@dataclass(frozen=True)
class EvalReply(_Codec):
    """Client -> server after scoring a prompt on its validation or test split."""

    partition_id: int
    llm: str
    simulated: bool
    scores: Scores
    usage: Usage
    code: str = ""


@dataclass(frozen=True)
class ErrorReply(_Codec):
    """Client -> server: a request this client could not answer, and why, in one line."""

    error: str
    partition_id: int | None = None  # the share of the data the client says it holds, when it knows

    @staticmethod
    def within(record: Mapping[str, object]) -> bool:
        """Whether a reply record is an error reply (its ``error`` field is what tells them apart)."""
        return "error" in record
