"""The ClientApp: the requests of a message in, the core's replies out.

``train`` improves the received prompt on this node's private training examples with its own LLM
endpoints; ``evaluate`` scores a prompt on this node's validation or test split. A message may carry
several requests (the server sends an evaluation and the next round's training together): they are
answered in order in this one process, which in a deployment saves a process start per request.
A mistake this project can name is answered with an error reply holding that one line, never a
traceback. Only prompt text and numbers leave the node.
"""

from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtextgrad_core.run.client_round import answer_each
from fedtextgrad_core.run.messages import reply_key, request_keys

app = ClientApp()

# Flower 1.42 runs every simulated ClientApp in a Ray actor defined in this module; a SuperNode's
# ClientApp process never imports it. Nothing a run submitter sends can load it there.
SIMULATION_ACTOR_MODULE = "flwr.simulation.ray_transport.ray_actor"


def in_flower_simulation() -> bool:
    """Whether this ClientApp runs in Flower's simulation, where every client is the submitter's own."""
    return SIMULATION_ACTOR_MODULE in sys.modules


def reply(msg: Message, context: Context, pinned: bool) -> Message:
    """The replies to every request of ``msg``; ``pinned``: a deployed site, whose site settings the
    run config may not move (settings.client_config)."""
    requests = [msg.content[key] for key in request_keys(msg.content)]
    replies = answer_each(dict(context.run_config), dict(context.node_config), requests, pinned)
    return Message(content=RecordDict({reply_key(position): ConfigRecord(answer.encode())
                                       for position, answer in enumerate(replies)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return reply(msg, context, pinned=not in_flower_simulation())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return reply(msg, context, pinned=not in_flower_simulation())
