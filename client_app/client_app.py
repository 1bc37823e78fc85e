"""The ClientApp: decode the server's request, run the core, encode the reply.

``train`` improves the received prompt on this node's private training examples with
its own LLM endpoints; ``evaluate`` scores a prompt on this node's validation or test
split. Only prompt text and numbers leave the node.

A mistake this project can name (a setting, a data file, an unreachable LLM server) is
answered with a Flower error reply carrying that one line, instead of an exception whose
traceback Flower would print; the server reports it in its round table.

A message may carry several requests (the server sends an evaluation and the next round's
training together, and the final tests together): they are answered in order, in this one
process, each reply in its own record, a failed request as a record holding its error line.
In a deployment every message starts a new ClientApp process, so this saves a process start
(1.5-2 s of imports on a small machine) per request it bundles.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedtextgrad_core.errors import FedTextGradError
from fedtextgrad_core.run.client_round import ERROR_FIELD, answer, failure_reason, reply_key, request_key
from fedtextgrad_core.run.messages import REPLY_RECORD, REQUEST_RECORD, RoundRequest

app = ClientApp()


def _reply(msg: Message, context: Context) -> Message:
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    keys = [request_key(0)]
    while request_key(len(keys)) in msg.content:  # requests the server sent together: answered in order
        keys.append(request_key(len(keys)))
    if len(keys) == 1:
        try:
            request = RoundRequest.decode(msg.content[REQUEST_RECORD])
            reply = answer(run_config, node_config, request)
        except FedTextGradError as exc:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=failure_reason(exc, node_config)), reply_to=msg)
        return Message(content=RecordDict({REPLY_RECORD: ConfigRecord(reply.encode())}), reply_to=msg)
    records = RecordDict()
    for position, key in enumerate(keys):
        try:
            reply = answer(run_config, node_config, RoundRequest.decode(msg.content[key]))
            records[reply_key(position)] = ConfigRecord(reply.encode())
        except FedTextGradError as exc:  # this request failed; the others are still answered
            records[reply_key(position)] = ConfigRecord({ERROR_FIELD: failure_reason(exc, node_config)})
    return Message(content=records, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
