"""The Flower ClientApp: one SuperNode is one fedlrm client.

The SuperNode's node config says where its data is:
  * `partition-id` and `num-partitions`: its part of the run's dataset, split exactly as the
    in-process runtime splits it (num-partitions must equal data.num_clients);
  * `data-dir`: its own data, the real deployment case: a folder with `train.parquet` and
    `test.parquet` (Hugging Face image layout) or `train/` and `test/` image folders,
    whose classes are those of the run;
and optionally `state-dir` (default ~/.cache/fedlrm/supernode/<partition or folder name>),
where the client keeps its private weights (local expert, gate) between rounds, its
preprocessed images and, after the last round, its personalised adapters. Private
weights are kept on disk rather than in Flower's `context.state` so that they survive a
SuperNode restart and a server that resumes a run as a new Flower run.

This module is what Flower loads for every message, so it imports no torch: a query (which
client a SuperNode serves) answers at once, and messages that train or evaluate import the
client's work (`node`) when they arrive.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedlrm.federation.flower.protocol import client_id_of, reply


def secagg_when_asked(message: Message, context: Context, call_next):
    """Client mod: run SecAgg+ for training messages that carry its protocol, pass others on."""
    if message.metadata.message_type == MessageType.TRAIN:
        from fedlrm.federation.flower.secagg import secagg_when_asked as secure

        return secure(message, context, call_next)
    return call_next(message, context)


app = ClientApp(mods=[secagg_when_asked])


# ----------------------------------------------------------------------------- handlers
@app.train()
def train(message: Message, context: Context) -> Message:
    from fedlrm.federation.flower import node
    from fedlrm.federation.flower.secagg import is_secagg

    if is_secagg(message):
        return node.train_for_secure_aggregation(message, context)
    return node.train(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    from fedlrm.federation.flower import node

    return node.evaluate(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which client (partition) this SuperNode is: asked by the server before it sends work. With
    federation.client_keys the server believes it only if the SuperLink holds that client's key for
    this node (identity.py), so the answer needs no proof of its own."""
    return reply(message, client=client_id_of(context.node_config))
