"""The contract every algorithm implements, and the pieces most of them share.

An algorithm answers four questions (docs/DESIGN.md section 2): what a client trains (the
adapters it puts on each target layer, and its loss), what it uploads, what the server
does with the uploads, and what each client evaluates with. The runtimes (in-process,
Flower) only call these hooks; they never ask which algorithm runs.

- Its own settings are a dataclass, `Settings`, read from the config section named after
  the algorithm (`fedprox.mu=0.1`) and checked by `check`; the instance gets them as
  `self.settings`.
- The server holds a `ServerState`: adapter weights (what messages are drawn from) and,
  for methods that keep more, a typed `Record` (FedLEASE's clusters, F3OCUS's selections)
  that the checkpoint serialises.
- Hooks are told the round they work in, as Flower strategies are told `server_round`; a
  client-side hook gets a `ClientRound` (the client, the round, the message it received).
  The algorithm object is shared by every client of a process, so it keeps no client's
  state: whatever a client must remember is in its model or its private weights.

Adapter weights are named by role: keys containing `.experts.global.` form the shared state
by default (`is_shared`); everything else (local experts, gates) is private to a client and
is kept by the runtime between rounds on that client. An algorithm whose adapters change
shape during a run (FedLEASE after clustering) says so through `layout_of`: the runtime
rebuilds a client's adapters when the layout a message implies differs from its model's.

A client held out of training (`data.new_clients`) joins once the run is over: it receives
`newcomer_message` from the final server state, trains the weights `newcomer_trains` names for a
few local epochs, and is evaluated; it sends nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Hashable

import torch
from torch import nn

from fedlrm.adapters import AdaptedLinear, LoRAExpert, get_state, set_state
from fedlrm.config import RunConfig

State = dict[str, torch.Tensor]
Schema = dict[str, tuple[tuple[int, ...], torch.dtype]]
SHARED_MARK = ".experts.global."


@dataclass
class Upload:
    """What one client sent back in a round, and the weight the server gives it in averages."""

    client_id: int
    state: State
    #: the training examples the client claimed, as the server bounded them (federation.max_weight_share
    #: may make it fractional)
    num_examples: float


@dataclass
class ServerState:
    """What the server holds between rounds."""

    #: adapter weights the server keeps and draws messages from (the global LoRA, cluster experts)
    weights: State
    #: the method's own bookkeeping, an instance of its `Record` (None for methods without one)
    record: Any = None


@dataclass(frozen=True)
class ClientRound:
    """What a client-side hook knows of the round it works in."""

    client_id: int
    server_round: int
    #: the server's message for this round (weights and any entries the method adds)
    received: State


@dataclass
class NoSettings:
    """The settings of a method that has none of its own."""


class Algorithm:
    name: ClassVar[str]
    #: the method's own settings: a dataclass whose fields are the keys of its config section
    Settings: ClassVar[type] = NoSettings
    #: the server's typed bookkeeping (a dataclass of ints, floats, strings, lists, dicts and
    #: tensors, which the checkpoint serialises), or None if the weights are all the server keeps
    Record: ClassVar[type | None] = None
    #: own settings of a seconds-long test run (e.g. one warm-up round); tests take them from here
    quick_settings: ClassVar[dict[str, Any]] = {}
    #: keys that used to be shared before they moved into this method's section: old -> own key
    moved_keys: ClassVar[dict[str, str]] = {}
    #: False for methods that never train (zero-shot)
    trains: ClassVar[bool] = True
    #: whether a server-side model exists that can be evaluated on the whole test split
    has_global_model: ClassVar[bool] = True
    #: whether `aggregate` needs only the sample-weighted mean of the uploads (secure aggregation works)
    aggregates_by_mean: ClassVar[bool] = True
    #: other settings of its own that `fedlrm compare` runs by default beside the defaults, each as
    #: `key=value[+key=value]` (its entry is then `<name>+key=value`), e.g. a variant worth comparing
    compare_variants: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.settings = cfg.methods[self.name]

    @classmethod
    def check(cls, settings: Any, cfg: RunConfig) -> None:
        """Refuse bad values of the method's own settings (a ConfigError naming `<name>.<key>`)."""

    def check_model(self, adapted_modules: list[str]) -> None:
        """Refuse settings that do not fit the model built for the run (a ConfigError), e.g. more
        blocks than carry adapters; called once the adapters are placed, before anything is written.
        `adapted_modules` are the adapted layers' names in the image encoder."""

    # ----- model: what a client trains -------------------------------------------------
    def make_layer(self, linear: nn.Linear, layout: Hashable) -> AdaptedLinear | None:
        """The adapted replacement of one target layer in `layout`, or None to leave it as it is."""
        raise NotImplementedError

    def make_prompt(self, width: int, layout: Hashable, feature_dim: int) -> nn.Module | None:
        """The learnable prompt context (`fedlrm.adapters.PromptContext`) the client trains on the text
        side, for token embeddings of `width` and image and text features of `feature_dim` (the joint
        space); None (the default): the configured prompt, fixed."""
        return None

    def layout_of(self, message: State) -> Hashable:
        """The adapter layout a client needs for a message from the server (constant by default)."""
        return None

    def private_init_key(self, client_id: int) -> object:
        """Clients with the same key start with the same private weights (default: each its own)."""
        return client_id

    def is_shared(self, key: str) -> bool:
        """Whether an adapter weight belongs to the state the server holds and sends out."""
        return SHARED_MARK in key

    def expert(self, linear: nn.Linear, rank: int) -> LoRAExpert:
        a = self.cfg.adapter
        return LoRAExpert(linear.in_features, linear.out_features, rank, a.alpha, a.dropout)

    # ----- server side ------------------------------------------------------------------
    def init_server(self, weights: State) -> ServerState:
        """The server's state before round 1 from the initial shared weights (e.g. with a first
        selection); the weights alone by default."""
        return ServerState(weights)

    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        """What the server sends one client for `server_round`: its weights by default."""
        return dict(state.weights)

    def aggregate(self, state: ServerState, uploads: list[Upload], server_round: int) -> ServerState:
        """The new server state from this round's uploads (paper eq. 6 by default)."""
        return ServerState({**state.weights, **weighted_mean(uploads)}, state.record)

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """What a client that joins after `server_round`, the run's last, receives from the final
        server state. By default what any client receives (`message_for`, which does not depend on
        the client unless a method overrides it); methods whose messages are drawn per client
        (FedLEASE's cluster, F3OCUS's blocks) place the newcomer by a rule of their own."""
        return self.message_for(state, 0, server_round)

    def newcomer_trains(self, keys: list[str]) -> list[str]:
        """Of the model's adapter weights `keys`, those a newcomer trains, within what `receive` left
        trainable: by default its private ones (FedLRM's local expert and gate, APFL's local LoRA,
        Local's and FedPIA's own LoRA; FedLEASE names its router itself), the shared weights staying as the server
        sent them; where there are none (FedAvg, FedProx, F3OCUS), the shared ones: a plain local
        fine-tune of the global LoRA. Nothing for a method that does not train."""
        if not self.trains:
            return []
        private = [k for k in keys if not self.is_shared(k)]
        return private or list(keys)

    def example_message(self, state: ServerState, private: State, client_id: int) -> State:
        """A message as a client receives it in a typical training round, for benchmarks that
        time a step (the round-1 message by default; FedLEASE's after clustering)."""
        return self.message_for(state, client_id, 1)

    # ----- client side ------------------------------------------------------------------
    def receive(self, model: nn.Module, ctx: ClientRound) -> None:
        """Install the server's message into the client's model before local training."""
        set_state(model, ctx.received)

    def regularizer(self, model: nn.Module, ctx: ClientRound) -> torch.Tensor | None:
        """A term added to the cross-entropy loss during local training."""
        return None

    def upload(self, model: nn.Module, shared_keys: list[str], ctx: ClientRound) -> State:
        """What the client sends to the server after local training."""
        return get_state(model, shared_keys)

    def client_report(self, model: nn.Module, train_set, ctx: ClientRound) -> State:
        """Statistics of its own data a client adds to its upload (e.g. layer scores); none by default."""
        return {}

    def report_schema(self, model: nn.Module) -> Schema:
        """Shape and dtype of each tensor `client_report` adds, so the server can check uploads."""
        return {}

    # ----- evaluation and records -------------------------------------------------------
    def global_view(self, model: nn.Module) -> ContextManager:
        """Within this context `model` (holding the server state) acts as the global model."""
        return nullcontext(model)

    def write_report(self, run_dir: Path, state: ServerState) -> None:
        """Write what the algorithm decided during the run (e.g. clusters) into the run directory."""

    def client_groups(self, state: ServerState) -> dict[int, int] | None:
        """The groups the method put clients in (e.g. FedLEASE's clusters): client id -> group, for
        comparing them with a federation's true domains; None for methods that group nobody."""
        return None


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
