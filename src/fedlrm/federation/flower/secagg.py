"""Secure aggregation with Flower's SecAgg+: the server learns only the weighted mean.

In Flower 1.41 SecAgg+ exists in the legacy API only: `SecAggPlusWorkflow` on the server
(driven through a `LegacyContext` with a strategy and a client manager) and
`secaggplus_mod` on the client (`client_app`). Each client uploads `[w, w * v]` masked and quantised,
with `w = num_examples / max_weight`; the server unmasks only the sums and obtains the
sample-weighted mean of the uploads, which is exactly what an algorithm that aggregates
by weighted mean (fedavg, fedprox, apfl, fedlrm) needs. Algorithms that look at each
upload (fedlease, fedpia, f3ocus) cannot use it, and neither can the per-upload checks of
`validation`: only the mean can be checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedlrm.algorithms import State
from fedlrm.config import PrivacyConfig
from fedlrm.federation.flower.protocol import push_and_pull


def to_arrays(state: State) -> list[np.ndarray]:
    return [state[k].detach().cpu().numpy() for k in sorted(state)]


def from_arrays(arrays: list[np.ndarray], schema: dict) -> State:
    keys = sorted(schema)
    if len(arrays) != len(keys):
        raise ValueError(f"secure aggregate has {len(arrays)} arrays, expected {len(keys)}")
    return {k: torch.from_numpy(np.asarray(a)).to(schema[k][1]).reshape(schema[k][0]) for k, a in zip(keys, arrays)}


class QuickPollGrid:
    """The Grid with a 0.2 s poll in `send_and_receive` (Flower's waits 3 s per pull, and
    SecAgg+ makes four round trips)."""

    def __init__(self, grid: Grid, poll: float = 0.2):
        self._grid, self._poll = grid, poll

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        return push_and_pull(self._grid, messages, timeout, self._poll)


class _MeanStrategy(Strategy):
    """The smallest legacy strategy: each node gets its own config, the unmasked mean is kept."""

    def __init__(self, configs: dict[int, dict[str, Any]]):
        self.configs = configs
        self.mean: list[np.ndarray] | None = None
        self.contributors = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(parameters, dict(self.configs[p.node_id])))
                for p in client_manager.all().values() if p.node_id in self.configs]

    def aggregate_fit(self, server_round, results, failures):
        self.contributors = len(results)
        if results:  # every result carries the same unmasked aggregate
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_mean(grid: Grid, context: Context, configs: dict[int, dict[str, Any]], round_index: int,
                cfg: PrivacyConfig, timeout: float | None) -> tuple[list[np.ndarray] | None, int]:
    """One SecAgg+ round over the nodes in `configs` (node id -> FitIns config).

    Returns the sample-weighted mean of what the clients uploaded and how many contributed,
    or (None, 0) if too many dropped out to reconstruct."""
    strategy = _MeanStrategy(configs)
    clients = SimpleClientManager()
    for node in configs:
        clients.register(GridClientProxy(node, grid, context.run_id))
    legacy = LegacyContext(context, strategy=strategy, client_manager=clients)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the payloads travel in the configs
    workflow = SecAggPlusWorkflow(num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
                                  max_weight=cfg.secagg_max_weight, clipping_range=cfg.secagg_clip_range,
                                  quantization_range=cfg.secagg_quantization_range, timeout=timeout)
    try:
        workflow(QuickPollGrid(grid), legacy)
    finally:
        legacy.state.config_records.pop(MAIN_CONFIGS_RECORD, None)
        legacy.state.array_records.pop(MAIN_PARAMS_RECORD, None)
    return strategy.mean, strategy.contributors
