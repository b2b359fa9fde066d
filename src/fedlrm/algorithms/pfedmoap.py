"""pFedMoAP (Luo et al., ICLR 2025): a client's prompt mixed with other clients' prompts by an attention gate.

Prompts are small, so clients may share them: every client trains its own CoOp context (local, with
both encoders frozen) and uploads it; the server keeps each client's latest one and does not average
them. Each round it sends a client the contexts of the `pfedmoap.experts` other clients nearest to
that client's own (L2 distance between contexts; for a client it has none of, a seeded draw): the
non-local experts, which the client keeps fixed. The client scores an image x with

    logits = (1 - mix) * cos(x, t_local) + mix * cos(x, sum_e a_e(x, c) t_e),

where t_e is class c's text feature under expert e (its own context among them) and a(x, c) is a
softmax over the experts of the dot product between a projection of x and projections of the t_e (an
attention gate of width `pfedmoap.gate_width`, trained on the client, never sent). In the first round,
before the server holds any prompt, a client trains its own context alone.

Deviations, listed in the README: the authors' code (ljaiverson/pFedMoAP) could not be read here
(its public repository holds a README only), so this follows the paper's description: one attention
head whose output mixes the experts' text features (weights from the gate, values the features
themselves), `mix` 0.5, contexts from N(0, 0.02), the optimiser and schedule the run's; there is no
global model (has_global_model: False).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fedlrm.adapters import PromptContext, get_state, set_state
from fedlrm.algorithms.base import Algorithm, ServerState, State
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one
from fedlrm.errors import ConfigError
from fedlrm.seeding import derive_seed

EXPERT = re.compile(r"\.experts\.e(\d+)\.ctx$")
OWN = "prompt_context.experts.local.ctx"
UPLOAD = "pfedmoap.prompt"  # the client's own context, as it travels (its model keeps it as OWN)


@dataclass
class PFedMoAPSettings:
    n_ctx: int = 4  # context vectors of each prompt
    experts: int = 3  # other clients' prompts a client receives each round (non-local experts)
    mix: float = 0.5  # weight of the gate's logits; the own prompt's plain logits get 1 - mix
    gate_width: int = 64  # width of the gate's query and key projections


@dataclass
class PromptPool:
    """The server's record: every client's latest own context."""

    prompts: dict[int, torch.Tensor] = field(default_factory=dict)


class AttentionGate(nn.Module):
    """Weights over the experts for each (image, class): softmax of <W_q x, W_k t_e> / sqrt(width)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.query = nn.Linear(dim, width, bias=False)
        self.key = nn.Linear(dim, width, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for linear in (self.query, self.key):
                bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's own initialisation range
                linear.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q = self.query(image)  # (batch, width)
        k = self.key(text)  # (experts, classes, width)
        return torch.softmax(torch.einsum("bw,ekw->bke", q, k) / math.sqrt(q.shape[-1]), dim=-1)


class MixturePrompts(PromptContext):
    """The client's own context (`local`, the first role) and the experts it received (`e0`, `e1`, ...),
    mixed per image and class by the gate."""

    scores_by_role = "pooled"

    def __init__(self, n_ctx: int, width: int, experts: int, dim: int, settings: PFedMoAPSettings):
        super().__init__(n_ctx, width, ("local", *(f"e{j}" for j in range(experts))))
        self.gate = AttentionGate(dim, settings.gate_width)
        self.mix = settings.mix

    def reset_parameters(self, generator=None):
        super().reset_parameters(generator)
        self.gate.reset_parameters(generator)

    def score(self, image, text):
        own = image @ text[0].t()
        if text.shape[0] == 1:  # no expert received (round 1), or only the own prompt in use
            return own
        weights = self.gate(image, text)  # (batch, classes, experts)
        mixed = torch.nn.functional.normalize(torch.einsum("bke,ekd->bkd", weights, text), dim=-1)
        return (1 - self.mix) * own + self.mix * torch.einsum("bd,bkd->bk", image, mixed)


@register
class PFedMoAP(Algorithm):
    name = "pfedmoap"
    Settings = PFedMoAPSettings
    Record = PromptPool
    aggregates_by_mean = False  # it keeps every upload apart
    has_global_model = False  # nothing is averaged: each client has its own mixture

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("pfedmoap.n_ctx", settings.n_ctx)
        at_least_one("pfedmoap.experts", settings.experts)
        at_least_one("pfedmoap.gate_width", settings.gate_width)
        if not 0 <= settings.mix <= 1:  # NaN fails this too
            raise ConfigError(f"pfedmoap.mix must be in [0, 1] (the gate's share of the logits), got {settings.mix}")

    def make_layer(self, linear, layout):
        return None  # no LoRA: the prompts and the gate are all a client trains

    def make_prompt(self, width, layout, feature_dim):
        return MixturePrompts(self.settings.n_ctx, width, layout, feature_dim, self.settings)

    def layout_of(self, message: State) -> int:
        """The number of experts received (0 in the first round)."""
        return sum(1 for k in message if EXPERT.search(k))

    def is_shared(self, key: str) -> bool:
        return EXPERT.search(key) is not None  # what arrives; the own context and the gate stay

    def init_server(self, weights: State) -> ServerState:
        return ServerState(weights, PromptPool())

    def experts_for(self, pool: dict[int, torch.Tensor], client: object, server_round: int) -> list[int]:
        """The clients whose contexts `client` receives: the nearest others to its own, or a seeded draw
        when the server has none of it (the nearer, then the lower id, first)."""
        others = sorted(c for c in pool if c != client)
        k = min(self.settings.experts, len(others))
        if client in pool:
            own = pool[client].double()
            return sorted(others, key=lambda c: (float((pool[c].double() - own).norm()), c))[:k]
        draw = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "pfedmoap", server_round, str(client)))
        return [others[i] for i in torch.randperm(len(others), generator=draw)[:k].tolist()]

    def message_for(self, state: ServerState, client_id: int, server_round: int) -> State:
        return self.experts_message(state, client_id, server_round)

    def newcomer_message(self, state: ServerState, server_round: int) -> State:
        """Experts drawn as for any client the server holds no prompt of; the newcomer then trains its
        own context and gate (`newcomer_trains`: its private weights)."""
        return self.experts_message(state, "newcomer", server_round)

    def experts_message(self, state: ServerState, client: object, server_round: int) -> State:
        pool = state.record.prompts
        chosen = self.experts_for(pool, client, server_round)
        return {**state.weights, **{f"prompt_context.experts.e{j}.ctx": pool[c].clone() for j, c in enumerate(chosen)}}

    def example_message(self, state: ServerState, private: State, client_id: int) -> State:
        """A round after the first: `pfedmoap.experts` contexts of other clients (fresh draws here)."""
        draw = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "pfedmoap", "example"))
        shape = private[OWN].shape
        return {f"prompt_context.experts.e{j}.ctx": torch.randn(shape, generator=draw) * 0.02
                for j in range(self.settings.experts)}

    def receive(self, model, ctx) -> None:
        set_state(model, ctx.received)
        context = model.prompt_context
        for role, vectors in context.experts.items():
            vectors.requires_grad_(role == "local")  # other clients' prompts stay as they came

    def upload(self, model, shared_keys, ctx) -> State:
        return {UPLOAD: get_state(model, [OWN])[OWN]}

    def aggregate(self, state: ServerState, uploads, server_round: int) -> ServerState:
        pool = dict(state.record.prompts)
        for u in uploads:
            pool[u.client_id] = u.state[UPLOAD].clone()
        return ServerState(state.weights, PromptPool(pool))
