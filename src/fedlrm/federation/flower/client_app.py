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
client a SuperNode serves) answers at once. Messages that train or evaluate go to the
SuperNode's worker (`worker`), a process that keeps the model and the client's images between
messages, since Flower starts a new ClientApp process for every message; with node config
`worker=false`, or on the Simulation Runtime, this process does the client's work (`node`).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlrm.federation.flower import worker
from fedlrm.federation.flower.protocol import client_id_of, reply, state_dir_of


def is_secagg(message: Message) -> bool:
    return message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records


def secagg_when_asked(message: Message, context: Context, call_next):
    """Client mod: run SecAgg+ for training messages that carry its protocol, pass others on."""
    if message.metadata.message_type == MessageType.TRAIN and is_secagg(message):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


app = ClientApp(mods=[secagg_when_asked])


def work(kind: str, message: Message, context: Context) -> Message:
    """The reply to a message that trains or evaluates: from this SuperNode's worker (`worker`),
    or done here (on the Simulation Runtime, or with node config worker=false)."""
    if worker.enabled(context.node_config):
        content = worker.call(kind, message.content, context, state_dir_of(context))
    else:
        from fedlrm.federation.flower import node

        content = {"train": node.train, "evaluate": node.evaluate,
                   "secure-train": node.train_for_secure_aggregation}[kind](message.content, context)
    return Message(content, reply_to=message)


# ----------------------------------------------------------------------------- handlers
@app.train()
def train(message: Message, context: Context) -> Message:
    return work("secure-train" if is_secagg(message) else "train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return work("evaluate", message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which client (partition) this SuperNode is: asked by the server before it sends work. With
    federation.client_keys the server believes it only if the SuperLink holds that client's key for
    this node (identity.py), so the answer needs no proof of its own."""
    return reply(message, client=client_id_of(context.node_config))
