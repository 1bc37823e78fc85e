"""FedTextGrad tests. Everything stays on this machine: loopback only, Flower telemetry and update checks off."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Flower's command-line tools ask Flower's servers for a newer version unless told not to
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
