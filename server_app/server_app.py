"""The ServerApp: read the run config, open the run folder, and let the strategy run.

Runs in simulation (``flwr run . local``) and in a deployment (SuperLink) alike.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.federation import PromptFederation
from fedtextgrad_core.llm import make_engine
from fedtextgrad_core.results import RunRecorder, default_run_name
from fedtextgrad_core.settings import RunSettings

from .strategy import PromptStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    try:
        settings = RunSettings.from_config(run_config)
        merger = make_engine(settings.server, "server-api-key-env") if settings.merge != "concat" else None
    except ConfigError as exc:
        print(f"fedtextgrad: the run cannot start: {exc}", flush=True)
        raise
    name = settings.run_name or default_run_name("+".join(settings.tasks), settings.partitioning, settings.merge)
    recorder = RunRecorder(Path(settings.results_dir), name, {"run_config": run_config, "settings": settings.as_dict()})
    print(f"results folder: {recorder.path}", flush=True)
    federation = PromptFederation(settings, recorder, merger, echo=lambda line: print(line, flush=True))
    try:
        PromptStrategy(settings, federation).start(grid, num_rounds=settings.num_rounds)
    except Exception as exc:
        federation.record_error(exc)
        raise
