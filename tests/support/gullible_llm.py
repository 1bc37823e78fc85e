"""A summariser that can be steered, for the hostile-participant tests: a scripted stand-in, not a model.

Real LLMs asked to merge prompts can follow instructions that hostile uploads slip into the request.
This test double makes that behaviour certain and visible: it answers like the simulated LLM, except
that a merge request containing "reply with exactly '...'" is answered with exactly that text when the
instruction stands outside the listed prompts (the upload broke out of its block) or, anywhere, when it
addresses whoever merges ("to the merging assistant"). It reads the listing as a reader would: blocks
between the request's first ``<PROMPT-id>`` marker and its closing twin, or, in a request without such
markers, between ``<PROMPT>`` and ``</PROMPT>``. Numbers from runs that use it say nothing about models.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedtextgrad_core.sim.model import SimLLM, split_messages
from fedtextgrad_core.sim.server import make_server

MERGE_REQUEST_START = "Merge the following list of prompts"
_OBEY = re.compile(r"reply with exactly ['\"](.+?)['\"]", re.IGNORECASE | re.DOTALL)
_ADDRESSED = re.compile(r"(to|for) (the )?(merging assistant|summari[sz]er|merger)", re.IGNORECASE)


def outside_the_listing(request: str) -> str:
    """The request without the blocks it lists, as a reader would cut them out."""
    marked = re.search(r"<(PROMPT-[0-9a-fA-F]+)>", request)
    pattern = rf"<{re.escape(marked.group(1))}>.*?</{re.escape(marked.group(1))}>" if marked else r"<PROMPT>.*?</PROMPT>"
    return re.sub(pattern, " ", request, flags=re.DOTALL)


class GullibleSummariser(SimLLM):
    """The simulated LLM, with the one weakness above; ``obeyed`` lists what it was made to reply."""

    def __init__(self) -> None:
        super().__init__()
        self.obeyed: list[str] = []
        self.merge_requests: list[str] = []

    def complete(self, messages: list[dict[str, str]]) -> str:
        _, user = split_messages(messages)
        if user.lstrip().startswith(MERGE_REQUEST_START):
            self.merge_requests.append(user)
            outside = _OBEY.search(outside_the_listing(user))
            addressed = next((m for m in _OBEY.finditer(user) if _ADDRESSED.search(user[max(0, m.start() - 200):m.start()])),
                             None)
            steered = outside or addressed
            if steered:
                self.obeyed.append(steered.group(1))
                return steered.group(1)
        return super().complete(messages)


@contextmanager
def serving_gullible() -> Iterator[tuple[str, GullibleSummariser]]:
    """(base URL, the model) of a gullible summariser served over HTTP on loopback, in a thread."""
    model = GullibleSummariser()
    server = make_server(model=model)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", model
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
