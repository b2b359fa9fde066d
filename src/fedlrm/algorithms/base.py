"""The contract every algorithm implements, and the pieces most of them share.

An algorithm answers four questions (DESIGN.md section 2): what a client trains (the
adapters it puts on each target layer, and its loss), what it uploads, what the server
does with the uploads, and what each client evaluates with. The runtimes (in-process
simulation, Flower) only call these methods; they never ask which algorithm runs.

Adapter weights are named by role: keys containing `.experts.global.` form the shared
state that the server holds and the clients receive; everything else (local experts,
gates) is private to a client and is kept by the runtime between rounds on that client.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, ContextManager

import torch
from torch import nn

from fedlrm.adapters import AdaptedLinear, LoRAExpert, get_state, set_state
from fedlrm.config import RunConfig

State = dict[str, torch.Tensor]
SHARED_MARK = ".experts.global."


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

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # ----- model: what a client trains -------------------------------------------------
    def make_layer(self, linear: nn.Linear) -> AdaptedLinear | None:
        """The adapted replacement of one target layer, or None to leave the model as it is."""
        raise NotImplementedError

    def is_shared(self, key: str) -> bool:
        """Whether an adapter weight belongs to the state the server holds and sends out."""
        return SHARED_MARK in key

    def expert(self, linear: nn.Linear, rank: int) -> LoRAExpert:
        a = self.cfg.adapter
        return LoRAExpert(linear.in_features, linear.out_features, rank, a.alpha, a.dropout)

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

    # ----- server side ------------------------------------------------------------------
    def aggregate(self, global_state: State, uploads: list[Upload]) -> State:
        """The new server state from this round's uploads (paper eq. 6 by default)."""
        return weighted_mean(uploads) if uploads else global_state

    # ----- evaluation -------------------------------------------------------------------
    def global_view(self, model: nn.Module) -> ContextManager:
        """Within this context `model` (holding the server state) acts as the global model."""
        return nullcontext(model)


def weighted_mean(uploads: list[Upload]) -> State:
    """Sample-weighted average of the uploaded tensors (FedAvg, paper eq. 6)."""
    total = float(sum(u.num_examples for u in uploads))
    if total <= 0:
        raise ValueError("cannot average uploads that stand for no training examples")
    keys = uploads[0].state.keys()
    out = {}
    for key in keys:
        acc = torch.zeros_like(uploads[0].state[key], dtype=torch.float64)
        for u in uploads:
            acc += u.state[key].double() * (u.num_examples / total)
        out[key] = acc.to(uploads[0].state[key].dtype)
    return out
