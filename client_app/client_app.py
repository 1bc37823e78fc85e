"""The ClientApp: decode the server's request, run the core, encode the reply.

``train`` improves the received prompt on this node's private training examples with
its own LLM endpoints; ``evaluate`` scores a prompt on this node's validation or test
split. Only prompt text and numbers leave the node.

A mistake this project can name (a setting, a data file, an unreachable LLM server) is
answered with a Flower error reply carrying that one line, instead of an exception whose
traceback Flower would print; the server reports it in its round table.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.run.client_round import answer, failure_reason
from fedtextgrad_core.run.messages import REPLY_RECORD, REQUEST_RECORD, RoundRequest

app = ClientApp()


def _reply(msg: Message, context: Context) -> Message:
    try:
        request = RoundRequest.decode(msg.content[REQUEST_RECORD])
        reply = answer(dict(context.run_config), dict(context.node_config), request)
    except FedTextGradError as exc:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=failure_reason(exc, dict(context.node_config))), reply_to=msg)
    return Message(content=RecordDict({REPLY_RECORD: ConfigRecord(reply.encode())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
