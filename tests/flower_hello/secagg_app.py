"""SecAgg+ from a custom ``@app.main`` loop (Flower 1.41): securely aggregated SUM.

In Flower 1.41 SecAgg+ still lives in the *legacy* API: the server side is
``flwr.server.workflow.SecAggPlusWorkflow`` (needs a ``LegacyContext`` with a legacy
``Strategy`` and ``ClientManager``) and the client side is
``flwr.client.mod.secaggplus_mod`` (reads/writes the legacy ``fitins.*``/``fitres.*``
records). :func:`secure_sum` wraps both so a Message-API ServerApp can get
``sum_i v_i`` of one list of float arrays per node without seeing any single ``v_i``.

How the numbers flow: each client uploads ``[w, w*v]`` quantised and masked, with
``w = num_examples / max_weight``; the workflow unmasks the sums and hands the
*weighted average* ``sum(w*v)/sum(w)`` to ``Strategy.aggregate_fit``. With
``num_examples = 1`` and ``max_weight = 1`` every ``w = 1``, so ``SUM = average * n``
where ``n`` = number of surviving contributors. Values are clipped to
``[-clipping_range, clipping_range]`` and stochastically quantised to
``quantization_range`` levels (step ``2*clipping_range/quantization_range`` per client).

Run through ``hello_app`` with run config ``mode="secagg"`` (``hello_app``'s ClientApp
forwards SecAgg+ messages to :data:`client_app` here).
"""

from __future__ import annotations

import json
import time
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

SECAGG_RECORD = RECORD_KEY_CONFIGS  # "secaggplus_configs": present in every SecAgg+ message


# ----------------------------------------------------------------------------- server
class FastPollGrid(Grid):
    """Wrap a Grid so ``send_and_receive`` polls every ``poll`` s instead of 3 s.

    ``HttpGrid.send_and_receive`` sleeps 3 s between pulls, which dominates the four
    SecAgg+ round trips; everything else is delegated unchanged.
    """

    def __init__(self, grid: Grid, poll: float = 0.2) -> None:
        self._grid = grid
        self._poll = poll

    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        pending = {mid for mid in self._grid.push_messages(list(messages)) if mid}
        replies: list[Message] = []
        end = None if timeout is None else time.time() + timeout
        while pending and (end is None or time.time() < end):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return replies


class _SumStrategy(Strategy):
    """Minimal legacy strategy: send ``config`` to the given nodes, keep the result."""

    def __init__(self, node_ids: list[int], config: dict[str, Any]) -> None:
        self.node_ids = set(node_ids)
        self.config = config
        self.mean: list[np.ndarray] | None = None
        self.num_results = 0
        self.num_failures = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        proxies = [p for p in client_manager.all().values() if p.node_id in self.node_ids]
        return [(p, FitIns(parameters, dict(self.config))) for p in proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.num_results, self.num_failures = len(results), len(failures)
        if not results:
            return None, {}
        # All results carry the same (unmasked, aggregated) parameters.
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(
    grid: Grid,
    context: Context,
    node_ids: list[int],
    server_round: int,
    config: dict[str, Any] | None = None,
    *,
    num_shares: float = 1.0,
    reconstruction_threshold: float = 1.0,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    timeout: float | None = None,
    fast_poll: bool = True,
) -> tuple[list[np.ndarray] | None, int]:
    """Run one SecAgg+ round over ``node_ids``; return ``(sum of arrays, n contributors)``.

    ``config`` reaches the ClientApp as ``FitIns.config``. ``fast_poll`` wraps the grid
    in :class:`FastPollGrid` (4 round trips per aggregation, 3 s poll each otherwise). Returns ``(None, 0)`` if the
    protocol halted (e.g. too many dropouts for the reconstruction threshold).
    """
    strategy = _SumStrategy(node_ids, config or {})
    client_manager = SimpleClientManager()
    for nid in node_ids:
        client_manager.register(GridClientProxy(nid, grid, context.run_id))
    legacy = LegacyContext(context, strategy=strategy, client_manager=client_manager)
    # NB: LegacyContext shares `state` with `context`; the workflow reads these records.
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # nothing to broadcast
    workflow = SecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=1.0,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
        timeout=timeout,
    )
    try:
        workflow(FastPollGrid(grid) if fast_poll else grid, legacy)
    finally:
        del legacy.state.config_records[MAIN_CONFIGS_RECORD]
        del legacy.state.array_records[MAIN_PARAMS_RECORD]
    if strategy.mean is None:
        return None, 0
    n = strategy.num_results
    return [m * n for m in strategy.mean], n


def client_vector(partition_id: int, server_round: int) -> list[np.ndarray]:
    """The private vector a client contributes (deterministic, so the test can check)."""
    base = np.array([1.0, -2.0, 0.5, 3.25], dtype=np.float64)
    return [base * (partition_id + 1) * server_round, np.array([partition_id + 0.125])]


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    expected = int(cfg["expected-nodes"])
    t0 = time.time()
    node_ids: list[int] = []
    while time.time() - t0 < float(cfg["node-wait-timeout"]):
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            break
        time.sleep(0.5)
    obs: dict[str, Any] = {"node_ids": node_ids, "rounds": []}
    for rnd in range(1, int(cfg["num-rounds"]) + 1):
        t = time.time()
        total, n = secure_sum(grid, context, node_ids, rnd, {"round": rnd},
                              clipping_range=float(cfg["secagg-clipping-range"]),
                              timeout=float(cfg["round-timeout"]),
                              fast_poll=str(cfg["comm"]) != "send_and_receive")
        expected_sum = [sum(v) for v in zip(*(client_vector(p, rnd) for p in range(len(node_ids))))]
        obs["rounds"].append({
            "round": rnd,
            "elapsed_s": round(time.time() - t, 3),
            "num_contributors": n,
            "sum": None if total is None else [a.tolist() for a in total],
            "expected_sum": [a.tolist() for a in expected_sum],
        })
        print(f"[secagg-server] round {rnd}: n={n} sum={obs['rounds'][-1]['sum']}", flush=True)
    out_path = str(cfg["out-path"])
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(obs, f, indent=1)


# ----------------------------------------------------------------------------- client
client_app = ClientApp(mods=[secaggplus_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    # Only called by secaggplus_mod in the "collect masked vectors" stage.
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    pid = int(context.node_config.get("partition-id", 0))
    vec = client_vector(pid, int(fitins.config["round"]))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vec), num_examples=1, metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def is_secagg_message(msg: Message) -> bool:
    return SECAGG_RECORD in msg.content.config_records if msg.has_content() else False


__all__ = ["client_app", "is_secagg_message", "secure_sum", "server_app"]
