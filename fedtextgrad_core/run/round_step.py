"""Where prompts are merged: one round's uploads in, the merged prompt and what happened out.

``merge_round`` is the server's decision for a round, with no files and no printing:
check every upload, leave out outliers (robust merge), merge what is left, and say
which prompt the clients should score next. What it decided comes back as a
``RoundOutcome``; the recorder writes it and the loop sends the evaluation.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import TypeVar

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.llm.engine import ChatEngine, Usage
from fedtextgrad_core.method.merging import MergeResult, merge_prompts
from fedtextgrad_core.method.robust_merge import RobustDecision, check_merged, select_uploads
from fedtextgrad_core.method.upload_checks import ALLOWED_CONTROLS, upload_problem
from fedtextgrad_core.run.messages import TrainReply
from fedtextgrad_core.run.records import ClientId, Failure, MergeRecord
from fedtextgrad_core.run.settings import RunSettings

NO_MERGE = "none (centralized)"
T = TypeVar("T")


class RoundFailed(FedTextGradError):
    """Too few clients answered a round; the message carries their errors."""


def require_enough(stage: str, server_round: int, ok: int, failures: Sequence[Failure], required: int) -> None:
    """Fail the round loudly, with every client's error, when fewer than ``required`` answered."""
    if ok >= required:
        return
    by_reason: dict[str, list[str]] = {}
    for failure in sorted(failures, key=lambda f: (len(f.label), f.label)):
        by_reason.setdefault(failure.reason, []).append(failure.label)
    reasons = "; ".join(f"client{'s' if len(labels) > 1 else ''} {', '.join(labels)}: {reason}"
                        for reason, labels in by_reason.items()) or "no replies arrived"
    raise RoundFailed(
        f"round {server_round} {stage}: only {ok} client(s) succeeded, at least {required} required "
        f"(min-train-clients). Errors: {reasons}"
    )


def required_clients(settings: RunSettings, answered: int) -> int:
    """How many successes a stage needs: min-train-clients, or fewer when fewer were asked."""
    return min(settings.clients_needed, max(1, answered))


@dataclass(frozen=True)
class Upload:
    """One successful training reply, and who sent it (labelled for people)."""

    label: str
    client: ClientId
    reply: TrainReply


@dataclass(frozen=True)
class RoundOutcome:
    """What the server decided in a round, before the merged prompt is evaluated."""

    round: int
    accepted: tuple[Upload, ...]  # passed the upload checks (robust-merge may still have left some out)
    failures: tuple[Failure, ...]  # training failures and rejected uploads, each with its stage
    robust: RobustDecision | None
    robust_usage: Usage | None  # what the held-out scoring cost the server's LLM
    merge: MergeResult
    server_usage: Usage  # everything the server's LLM spent this round: merging and scoring

    @property
    def merged_prompt(self) -> str:
        """The evaluation plan: this prompt is scored on every sampled client's validation split next."""
        return self.merge.prompt

    @property
    def merge_record(self) -> MergeRecord:
        m = self.merge
        return MergeRecord(method=m.method, fallback_reason=m.fallback_reason, format_repaired=m.format_repaired,
                           token_budget=m.token_budget, dropped_sentences=m.dropped_sentences,
                           duplicates_removed=m.duplicates_removed, summariser_calls=m.summariser_calls,
                           levels=m.merge_levels, largest_summariser_input_tokens=m.largest_summariser_input_tokens,
                           tokenizer=m.tokenizer)

    def left_out(self, upload: Upload) -> bool:
        return self.robust is not None and upload.client.key in self.robust.left_out


@cache
def _refused() -> re.Pattern[str]:
    """Every character ``hidden_text_problem`` refuses, as one character class: a prompt without any of
    them, non-blank and within the length limit, passes ``upload_problem``, and the regex finds that
    at C speed, where upload_problem looks at the characters one by one (10,000 uploads took ~1 s a
    round). Built once, from the Unicode database Python has: Cc, Cs and Cf characters stand in the
    first two planes and the tags' plane 14 only."""
    planes = itertools.chain(range(0x20000), range(0xE0000, 0xE1000))
    refused = [chr(c) for c in planes
               if unicodedata.category(chr(c)) in ("Cc", "Cs", "Cf") and chr(c) not in ALLOWED_CONTROLS]
    return re.compile("[" + "".join(re.escape(c) if c not in "\ud800\udfff" else c for c in refused) + "]")


def _problem(prompt: object, max_chars: int) -> str | None:
    if isinstance(prompt, str) and len(prompt) <= max_chars and prompt.strip() and not _refused().search(prompt):
        return None
    return upload_problem(prompt, max_chars)


def check_uploads(uploads: Sequence[Upload], max_chars: int, sent: str = "") -> tuple[list[Upload], list[Failure]]:
    """Uploads fit to merge, and the rejected ones as failures with their reason (upload_checks.py). The
    prompt the server ``sent`` is the server's own: a client that kept it sends it back, whatever its length."""
    accepted, rejected = [], []
    for upload in uploads:
        problem = None if sent and upload.reply.prompt == sent else _problem(upload.reply.prompt, max_chars)
        if problem is None:
            accepted.append(upload)
        else:
            rejected.append(Failure(upload.label, "upload", problem, upload.client.node_id))
    return accepted, rejected


def _apart(engine: ChatEngine, work: Callable[[], T]) -> tuple[T, Usage]:
    """``work()`` and what it spent on ``engine``, kept apart from the engine's running count."""
    earlier = engine.take_usage()
    result = work()
    spent = engine.take_usage()
    engine.usage.add(earlier)
    return result, spent


def merge_round(server_round: int, uploads: Sequence[Upload], failures: Sequence[Failure], settings: RunSettings,
                merger: ChatEngine | None, scorer: Callable[[], ChatEngine] | None = None, previous_prompt: str = "",
                secret: str = "") -> RoundOutcome:
    """Upload checks, then the robust filter, then the merge and its check; raises RoundFailed when too few
    are left.

    ``uploads`` come in a fixed order (the loop sorts them), so a seed gives the same prompt.
    ``scorer`` gives the server's engine for robust scoring when there is no merger (concat).
    ``previous_prompt`` is the global prompt the clients trained on (an upload of it back is never
    refused for its length, and robust-merge keeps it when the merged prompt scores too low);
    ``secret`` is the server's own (robust_merge, merging: what no client may predict).
    """
    accepted, rejected = check_uploads(uploads, settings.max_prompt_chars, previous_prompt)
    if rejected:  # the transport counted these clients as successes; they are not
        answered = len(accepted) + len(failures) + len(rejected)
        require_enough("upload check", server_round, len(accepted), [*failures, *rejected],
                       required_clients(settings, answered))
    robust, robust_usage, engine = None, Usage(), None
    if settings.robust_merge and accepted:
        engine = merger or (scorer() if scorer else None)
        if engine is None:
            raise ValueError("robust-merge needs the server's LLM engine")
        prompts = {u.client.key: u.reply.prompt for u in accepted}
        robust, spent = _apart(engine, lambda: select_uploads(engine, settings.robust, prompts, secret))
        robust_usage.add(spent)
    kept = [u for u in accepted if robust is None or u.client.key not in robust.left_out]
    if settings.partitioning == "centralized":
        # one client holds all the data: its prompt is the global prompt, with no merge call (as in
        # the reference's centralised baseline)
        merged = MergeResult(prompt=kept[0].reply.prompt, method=NO_MERGE)
    else:
        merged = merge_prompts([u.reply.prompt for u in kept], settings.merge, settings.format_instruction, merger,
                               settings.merge_token_budget, secret=secret, salt=f"round-{server_round}")
        if robust is not None and engine is not None and previous_prompt:
            decision = robust
            checked, spent = _apart(engine, lambda: check_merged(engine, settings.robust, decision, secret,
                                                                 merged.prompt, previous_prompt))
            robust_usage.add(spent)
            robust = checked
            if checked.merged_refused:
                merged = replace(merged, prompt=previous_prompt, fallback_reason=checked.merged_refused)
    server_usage = Usage()
    for usage in (merger.take_usage() if merger else None, robust_usage if robust is not None else None):
        if usage is not None:
            server_usage.add(usage)
    return RoundOutcome(round=server_round, accepted=tuple(accepted), failures=(*failures, *rejected),
                        robust=robust, robust_usage=robust_usage if robust is not None else None, merge=merged,
                        server_usage=server_usage)
