"""The ClientApp: decode the server's request, run the core, encode the reply.

``train`` improves the received prompt on this node's private training examples with
its own LLM endpoints; ``evaluate`` scores a prompt on this node's validation or test
split. Only prompt text and numbers leave the node.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtextgrad_core.run.client_round import answer
from fedtextgrad_core.run.messages import REPLY_RECORD, REQUEST_RECORD, RoundRequest

app = ClientApp()


def _reply(msg: Message, context: Context) -> Message:
    request = RoundRequest.decode(msg.content[REQUEST_RECORD])
    reply = answer(dict(context.run_config), dict(context.node_config), request)
    return Message(content=RecordDict({REPLY_RECORD: ConfigRecord(reply.encode())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
