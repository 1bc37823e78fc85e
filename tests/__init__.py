"""FedTextGrad tests. Everything stays on this machine: loopback only, Flower telemetry off."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
