"""FedTextGrad tests. Everything stays on this machine: loopback only, Flower telemetry and update checks off."""

import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Flower's command-line tools ask Flower's servers for a newer version unless told not to
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# the repository, whatever folder a test module sits in
ROOT = Path(__file__).resolve().parents[1]
# the project's test data, beside the repository (read in place, never copied into it)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
