"""The server's state between rounds: the global and best prompts, the scores, the sampling generator.

It is small on purpose: everything a resumed run needs to continue exactly where an
uninterrupted one would be, and nothing else. It writes itself to ``checkpoint.json``
(checkpoint.py) after every finished round and reads itself back for ``resume-from``.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedtextgrad_core.llm.engine import Usage
from fedtextgrad_core.run.checkpoint import CHECKPOINT_VERSION, Checkpoint, rng_state, save_checkpoint
from fedtextgrad_core.run.records import RoundRecord
from fedtextgrad_core.stats import BETTER, PairedComparison, paired


@dataclass
class FederationState:
    global_prompt: str
    best_prompt: str
    rng: random.Random  # samples the clients of every round: a resumed run asks the same clients
    run_config: dict[str, object]  # as given, so a resumed run can be checked to be the same run
    best_accuracy: float | None = None
    best_round: int = 0
    initial_accuracy: float | None = None
    initial_usage: Usage = field(default_factory=Usage)  # what the start prompt's evaluation cost
    finished_round: int = 0  # 0 = the initial evaluation is done (or not yet)
    resumed_after: list[int] = field(default_factory=list)
    # the server's own secret, never sent to a client: it draws the robust-merge held-out set and the
    # merge request's block markers, so no client can predict either (saved with the checkpoint)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    # the best prompt's validation outcomes (example id -> right), for best-rule = paired
    best_outcomes: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def start(cls, start_prompt: str, seed: int, run_config: Mapping[str, object]) -> FederationState:
        return cls(global_prompt=start_prompt, best_prompt=start_prompt, rng=random.Random(seed),
                   run_config=dict(run_config))

    def record_initial(self, accuracy: float | None, usage: Usage, outcomes: Mapping[str, bool]) -> None:
        self.initial_accuracy = self.best_accuracy = accuracy
        self.initial_usage = usage
        self.best_outcomes = dict(outcomes)

    def adopt(self, merged_prompt: str, accuracy: float | None, server_round: int, outcomes: Mapping[str, bool],
              best_rule: str = "reference") -> PairedComparison:
        """The round's merged prompt becomes the global prompt, and the best one when it beat the best so
        far: by any increase (``reference``, as the reference code), or (``paired``) by a paired difference
        on the validation examples both were scored on whose 95% interval excludes zero. Returns that
        paired comparison either way."""
        self.global_prompt = merged_prompt
        comparison = paired(outcomes, self.best_outcomes)
        if best_rule == "paired":
            better = accuracy is not None and comparison.verdict == BETTER
        else:
            better = accuracy is not None and (self.best_accuracy is None or accuracy > self.best_accuracy)
        if better:
            self.best_accuracy, self.best_prompt, self.best_round = accuracy, merged_prompt, server_round
            self.best_outcomes = dict(outcomes)
        self.finished_round = server_round
        return comparison

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, Checkpoint(
            round=self.finished_round, global_prompt=self.global_prompt, best_prompt=self.best_prompt,
            best_accuracy=self.best_accuracy, best_round=self.best_round, initial_accuracy=self.initial_accuracy,
            rng_state=rng_state(self.rng), run_config=dict(self.run_config), resumed_after=list(self.resumed_after),
            initial_usage=asdict(self.initial_usage), secret=self.secret, best_outcomes=dict(self.best_outcomes),
            version=CHECKPOINT_VERSION,
        ))

    @classmethod
    def resume(cls, checkpoint: Checkpoint) -> FederationState:
        """Continue from a checkpoint: its rounds are the run's history, not redone."""
        usage = Usage()
        for name, value in checkpoint.initial_usage.items():
            if name in Usage.__dataclass_fields__:
                setattr(usage, name, value)
        return cls(global_prompt=checkpoint.global_prompt, best_prompt=checkpoint.best_prompt, rng=checkpoint.random(),
                   run_config=dict(checkpoint.run_config), best_accuracy=checkpoint.best_accuracy,
                   best_round=checkpoint.best_round, initial_accuracy=checkpoint.initial_accuracy,
                   initial_usage=usage, finished_round=checkpoint.round,
                   resumed_after=[*checkpoint.resumed_after, checkpoint.round], best_outcomes=dict(checkpoint.best_outcomes),
                   **({"secret": checkpoint.secret} if checkpoint.secret else {}))

    def check_history(self, history: list[RoundRecord]) -> list[RoundRecord]:
        """The rounds on disk that the checkpoint covers (a round written after it is redone)."""
        return [record for record in history if record.round <= self.finished_round]
