"""The ClientApp: unpack the server's message, run the core, pack the reply.

``train`` improves the received prompt on this node's private training examples with
its own LLM endpoints; ``evaluate`` scores a prompt on this node's validation or test
split. Only prompt text and numbers leave the node.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtextgrad_core.run.client_round import evaluate_split, local_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    prompt, metrics, num_examples = local_round(
        dict(context.run_config), dict(context.node_config), str(config["prompt"]),
        int(config.get("server-round", 0)), dict(config),
    )
    metrics["num-examples"] = num_examples
    content = RecordDict({"prompt": ConfigRecord({"text": prompt}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    metrics = evaluate_split(
        dict(context.run_config), dict(context.node_config), str(config["prompt"]), str(config.get("split", "val")),
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
