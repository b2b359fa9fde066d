"""Hello-world Flower 1.41 app (Message API) used to test a local deployment.

ServerApp: waits for ``expected-nodes`` SuperNodes, then for ``num-rounds`` rounds sends
every node a ``train`` message holding an ArrayRecord and a ConfigRecord, collects the
replies and writes what it saw as JSON to run-config ``out-path``.

ClientApp: replies with its ``node_config["partition-id"]``, a counter kept in
``context.state`` across rounds, and the received array plus its partition id.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlrm.federation.flower.protocol import push_and_pull

server_app = ServerApp()
client_app = ClientApp()


# --------------------------------------------------------------------------- ServerApp
@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-rounds"])
    expected = int(cfg["expected-nodes"])
    round_timeout = float(cfg["round-timeout"])
    comm = str(cfg["comm"])
    out_path = str(cfg["out-path"])

    t0 = time.time()
    node_ids: list[int] = []
    while time.time() - t0 < float(cfg["node-wait-timeout"]):
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            break
        time.sleep(0.5)
    obs: dict = {
        "run_id": context.run_id,
        "node_ids": node_ids,
        "wait_nodes_s": round(time.time() - t0, 3),
        "comm": comm,
        "rounds": [],
    }
    print(f"[hello-server] nodes={node_ids}", flush=True)

    for rnd in range(1, num_rounds + 1):
        arrays = ArrayRecord([np.full((3,), float(rnd), dtype=np.float32)])
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({"round": rnd})}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )
            for nid in node_ids
        ]
        t_round = time.time()
        if comm == "send_and_receive":
            replies = list(grid.send_and_receive(messages, timeout=round_timeout))
        else:
            replies = push_and_pull(grid, messages, round_timeout)
        seen = []
        for rep in replies:
            entry: dict = {"src_node_id": rep.metadata.src_node_id}
            if rep.has_error():
                entry["error_code"] = rep.error.code
                entry["error_reason"] = rep.error.reason
            else:
                m = rep.content["metrics"]
                entry.update(
                    node_id=int(m["node-id"]),
                    partition_id=int(m["partition-id"]),
                    count=int(m["count"]),
                    round=int(m["round"]),
                    array=rep.content["arrays"].to_numpy_ndarrays()[0].tolist(),
                )
            seen.append(entry)
        obs["rounds"].append({"round": rnd, "elapsed_s": round(time.time() - t_round, 3), "replies": seen})
        print(f"[hello-server] round {rnd}: {seen}", flush=True)

    obs["total_s"] = round(time.time() - t0, 3)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(obs, f, indent=1)


# --------------------------------------------------------------------------- ClientApp
@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config.get("partition-id", -1))
    # context.state is a RecordDict that the SuperNode keeps between messages of a run.
    if "hello" not in context.state:
        context.state["hello"] = ConfigRecord({"count": 0})
    state = context.state["hello"]
    state["count"] = int(state["count"]) + 1

    rnd = int(msg.content["config"]["round"])
    arr = msg.content["arrays"].to_numpy_ndarrays()[0] + pid
    content = RecordDict(
        {
            "arrays": ArrayRecord([arr]),
            "metrics": MetricRecord(
                {"partition-id": pid, "count": int(state["count"]), "round": rnd, "node-id": context.node_id}
            ),
        }
    )
    return Message(content, reply_to=msg)
