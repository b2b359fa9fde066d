"""The contract every algorithm implements, and the pieces most of them share.

An algorithm answers four questions (DESIGN.md section 2): what a client trains (the
adapters it puts on each target layer, and its loss), what it uploads, what the server
does with the uploads, and what each client evaluates with. The runtimes (in-process
simulation, Flower) only call these methods; they never ask which algorithm runs.

Adapter weights are named by role: keys containing `.experts.global.` form the shared
state that the server holds and the clients receive; everything else (local experts,
gates) is private to a client and is kept by the runtime between rounds on that client.
Server-state keys starting with `server.` are the server's own bookkeeping and are never
sent. An algorithm whose adapters change shape during a run (FedLEASE after clustering)
says so through `layout`: the runtime rebuilds a client's adapters when the layout that
a message implies differs from the one the client's model has.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, ContextManager

import torch
from torch import nn

from fedlrm.adapters import AdaptedLinear, LoRAExpert, get_state, set_state
from fedlrm.config import RunConfig

State = dict[str, torch.Tensor]
SHARED_MARK = ".experts.global."
SERVER_ONLY = "server."


@dataclass
class Upload:
    """What one client sent back in a round, and how many training examples stand behind it."""

    client_id: int
    state: State
    num_examples: int


class Algorithm:
    name: ClassVar[str]
    #: False for methods that never train (zero-shot)
    trains: ClassVar[bool] = True
    #: whether a server-side model exists that can be evaluated on the whole test split
    has_global_model: ClassVar[bool] = True
    #: whether `aggregate` needs only the sample-weighted mean of the uploads (secure aggregation works)
    aggregates_by_mean: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # ----- model: what a client trains -------------------------------------------------
    def make_layer(self, linear: nn.Linear) -> AdaptedLinear | None:
        """The adapted replacement of one target layer, or None to leave the model as it is."""
        raise NotImplementedError

    def layout(self, message: State) -> object:
        """The adapter layout a client needs for a message from the server (constant by default)."""
        return None

    def use_layout(self, layout: object) -> None:
        """Make `make_layer` build the given layout."""

    def private_init_key(self, client_id: int) -> object:
        """Clients with the same key start with the same private weights (default: each its own)."""
        return client_id

    def is_shared(self, key: str) -> bool:
        """Whether an adapter weight belongs to the state the server holds and sends out."""
        return SHARED_MARK in key

    def expert(self, linear: nn.Linear, rank: int) -> LoRAExpert:
        a = self.cfg.adapter
        return LoRAExpert(linear.in_features, linear.out_features, rank, a.alpha, a.dropout)

    # ----- messages -----------------------------------------------------------------------
    def message_for(self, client_id: int, server_state: State) -> State:
        """What the server sends one client: its state less the server-only bookkeeping."""
        return {k: v for k, v in server_state.items() if not k.startswith(SERVER_ONLY)}

    def init_server(self, server_state: State) -> State:
        """The server's state before round 1 (e.g. a first selection); as it is by default."""
        return server_state

    # ----- client side ------------------------------------------------------------------
    def receive(self, model: nn.Module, received: State) -> None:
        """Install the server's state into the client's model before local training."""
        set_state(model, received)

    def regularizer(self, model: nn.Module, received: State) -> torch.Tensor | None:
        """A term added to the cross-entropy loss during local training."""
        return None

    def upload(self, model: nn.Module, shared_keys: list[str]) -> State:
        """What the client sends to the server after local training."""
        return get_state(model, shared_keys)

    def client_report(self, model: nn.Module, train_set) -> State:
        """Statistics of its own data a client adds to its upload (e.g. layer scores); none by default."""
        return {}

    def report_schema(self, model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each tensor `client_report` adds, so the server can check uploads."""
        return {}

    # ----- server side ------------------------------------------------------------------
    def aggregate(self, global_state: State, uploads: list[Upload]) -> State:
        """The new server state from this round's uploads (paper eq. 6 by default)."""
        return {**global_state, **weighted_mean(uploads)} if uploads else global_state

    # ----- evaluation and records -------------------------------------------------------
    def global_view(self, model: nn.Module) -> ContextManager:
        """Within this context `model` (holding the server state) acts as the global model."""
        return nullcontext(model)

    def write_report(self, run_dir: Path, server_state: State) -> None:
        """Write what the algorithm decided during the run (e.g. clusters) into the run directory."""


def weighted_mean(uploads: list[Upload]) -> State:
    """Sample-weighted average of the uploaded tensors (FedAvg, paper eq. 6).

    Each key is averaged over the uploads that contain it, weighted by their examples, so
    clients that send different parts (one cluster's expert, some layers) are averaged
    part by part."""
    out = {}
    for key in dict.fromkeys(k for u in uploads for k in u.state):
        holders = [u for u in uploads if key in u.state]
        total = float(sum(u.num_examples for u in holders))
        if total <= 0:
            raise ValueError("cannot average uploads that stand for no training examples")
        acc = torch.zeros_like(holders[0].state[key], dtype=torch.float64)
        for u in holders:
            acc += u.state[key].double() * (u.num_examples / total)
        out[key] = acc.to(holders[0].state[key].dtype)
    return out
