"""The ServerApp: read the run config, open the run folder, and let the strategy run the core's loop.

Runs in simulation (``flwr run . local``) and in a deployment (SuperLink) alike. A run this
project stops on purpose (a refused setting, too few clients) ends with one line saying why;
Flower then reports the failed run in its own words (docs/troubleshooting.md, "What Flower prints
that this project cannot change").
"""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from fedtextgrad_core.errors import ConfigError
from fedtextgrad_core.run.quiet import quiet_own_errors
from fedtextgrad_core.run.server_setup import open_run

from .strategy import PromptStrategy

# Ray (the simulation engine) warns about a default of its own on every start; nothing to act on here
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    quiet_own_errors(FLOWER_LOGGER, enabled=run_config.get("debug") is not True)
    try:
        run = open_run(run_config, echo=lambda line: print(line, flush=True),
                       simulation=type(grid).__name__ == "InMemoryGrid")
    except ConfigError as exc:
        print(f"fedtextgrad: the run cannot start: {exc}", flush=True)
        raise
    PromptStrategy(run.federation).start(grid)  # a run that stops says why and where its results are
