"""The ServerApp: read the run config, open the run folder, and let the strategy run the core's loop.

Runs in simulation (``flwr run . local``) and in a deployment (SuperLink) alike.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.server_setup import open_run

from .strategy import PromptStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run = open_run(dict(context.run_config), echo=lambda line: print(line, flush=True))
    except ConfigError as exc:
        print(f"fedtextgrad: the run cannot start: {exc}", flush=True)
        raise
    PromptStrategy(run.federation).start(grid)
