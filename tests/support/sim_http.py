"""The simulated LLM served over real HTTP in a thread, for tests of the openai backend path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedtextgrad_core.sim.server import make_server


@contextmanager
def serving_sim(latency_ms: float = 0.0) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>/v1``) of a sim server serving in a thread."""
    server = make_server(host="127.0.0.1", port=0, latency_ms=latency_ms)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
