"""Everything the server checks and opens before the first message goes out.

A setting that can be checked on the server is checked here, so a bad run stops at once
with one line; the run folder is opened (or reopened for ``resume-from``) only after that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedtextgrad_core.data.tasks import get_task
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.llm.engine import ChatEngine, make_engine
from fedtextgrad_core.method.robust_merge import check_holdout_available
from fedtextgrad_core.run.checkpoint import checkpoint_to_resume
from fedtextgrad_core.run.codec import MalformedRecord
from fedtextgrad_core.run.federation import ClientPool, Federation
from fedtextgrad_core.run.recorder import Recorder
from fedtextgrad_core.run.settings import RunSettings
from fedtextgrad_core.run.state import FederationState

Echo = Callable[[str], None]


def header(settings: RunSettings) -> str:
    s = settings
    return (f"FedTextGrad: {s.num_rounds} round(s), task {', '.join(s.tasks)} ({s.partitioning}), merge {s.merge}, "
            f"{s.local.steps} local step(s) of batch {s.local.batch_size}, keep rule {s.local.keep_rule}, loss {s.loss}, "
            f"client LLM {s.forward.describe()} unless a node sets its own, server LLM {s.server_llm}")


@dataclass
class ServerRun:
    """A run ready to start: its settings, its folder and state, and the server's own LLM."""

    settings: RunSettings
    recorder: Recorder
    state: FederationState
    merger: ChatEngine | None

    def federation(self, pool: ClientPool) -> Federation:
        return Federation(self.settings, pool, self.recorder, self.state, self.merger, scorer=self.scorer)

    def scorer(self) -> ChatEngine:
        """The server's engine for robust-merge scoring when the merge itself needs none (concat)."""
        return self.merger or make_engine(self.settings.server, "server-api-key-env")


def open_run(run_config: Mapping[str, object], echo: Echo = print, simulation: bool = False) -> ServerRun:
    """Check the settings, print the header, open the run folder; raises ConfigError on a bad setting.

    ``simulation``: the clients are Flower's simulated ones, which have no node config of their own, so
    the run config's client settings are theirs and can be checked here."""
    settings = RunSettings.from_config(run_config)
    if simulation and settings.forward.simulated and any(not get_task(name).synthetic for name in settings.tasks):
        # refused here, before every client loads thousands of examples to find out
        raise ConfigError("llm-backend", "sim", "openai for " + ", ".join(
            name for name in settings.tasks if not get_task(name).synthetic) + ": the simulated LLM answers "
            "object counting, word sorting and multistep arithmetic only")
    if settings.robust_merge:  # refuse at start, not after round 1's training
        check_holdout_available(settings.tasks)
    merger = make_engine(settings.server, "server-api-key-env") if settings.server_llm_used \
        and settings.merge != "concat" else None
    resume = checkpoint_to_resume(settings.resume_from, run_config)
    echo(header(settings))
    try:
        recorder, state = Recorder.open(settings, run_config, resume, echo=echo)
    except MalformedRecord as exc:  # the folder to resume holds a damaged round line
        raise ConfigError("resume-from", settings.resume_from, f"a run folder whose files can be read; {exc}") from None
    return ServerRun(settings, recorder, state, merger)
