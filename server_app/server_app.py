"""The ServerApp: read the run config, open the run folder, and let the strategy run.

Runs in simulation (``flwr run . local``) and in a deployment (SuperLink) alike.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtextgrad_core.run.checkpoint import checkpoint_to_resume
from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.federation import PromptFederation
from fedtextgrad_core.llm.engine import make_engine
from fedtextgrad_core.method.robust_merge import check_holdout_available
from fedtextgrad_core.run.settings import RunSettings

from server_app.strategy import PromptStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    try:
        settings = RunSettings.from_config(run_config)
        check_holdout_available(settings)  # robust-merge: refuse at start, not after round 1's training
        merger = make_engine(settings.server, "server-api-key-env") if settings.merge != "concat" else None
        resume = checkpoint_to_resume(settings.resume_from, run_config)
    except ConfigError as exc:
        print(f"fedtextgrad: the run cannot start: {exc}", flush=True)
        raise
    federation = PromptFederation.open(settings, run_config, merger, resume, echo=lambda line: print(line, flush=True))
    try:
        PromptStrategy(settings, federation).start(grid, num_rounds=settings.num_rounds)
    except Exception as exc:
        federation.record_error(exc)
        raise
