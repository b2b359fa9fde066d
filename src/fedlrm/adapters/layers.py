"""LoRA experts and the layer that carries them beside a frozen `nn.Linear`.

    y = W x + sum_e  w_e(x) * gamma_e * B_e A_e x

One expert with weight 1 is plain LoRA (paper eq. 5). Two experts mixed by a learned
gate are FedLRM (eq. 10); mixed with fixed weights they are APFL.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from fedlrm.adapters.prompts import prompt_contexts


class LoRAExpert(nn.Module):
    """Low-rank update B A (A: rank x d_in, B: d_out x rank), scaled by alpha / rank."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.empty(d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Kaiming-uniform A (as nn.Linear and peft do) and zero B: training starts from the
        # frozen model's function.
        bound = 1.0 / math.sqrt(self.A.shape[1])  # kaiming_uniform_ with a=sqrt(5)
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
            self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t()) @ self.B.t() * self.scaling


class Mixer(nn.Module):
    """Per-expert weights for an input: shape (..., n_experts), broadcastable over x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        pass


class FixedMix(Mixer):
    """Constant weights (APFL's 0.5 / 0.5)."""

    def __init__(self, weights: list[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return self.weights.to(x.dtype)


class SoftmaxGate(Mixer):
    """FedLRM's gate: one bias-free Linear(d_in, n_experts), softmax over experts.

    granularity `sample` gates on the mean over tokens of the layer input, so every token
    of an image gets the same weights; `token` gates each token on its own.
    """

    def __init__(self, d_in: int, n_experts: int, granularity: str = "sample"):
        super().__init__()
        if granularity not in ("sample", "token"):
            raise ValueError(f"gate granularity must be 'sample' or 'token', got {granularity!r}")
        self.granularity = granularity
        self.proj = nn.Linear(d_in, n_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Zero weights start the mixture at an even split; the gate learns to depart from it.
        with torch.no_grad():
            self.proj.weight.zero_()

    def forward(self, x):
        if self.granularity == "sample" and x.dim() >= 3:
            return torch.softmax(self.proj(x.mean(dim=-2, keepdim=True)), dim=-1)
        return torch.softmax(self.proj(x), dim=-1)


class TopMRouter(Mixer):
    """FedLEASE's adaptive router over M experts, per token.

    `Linear(d_in, 2M-1)`, softmax, keep the top M, renormalise. Slots 0..M-1 are the M
    experts; slots M..2M-2 all stand for the client's own expert (`own`). As only M-1
    slots name other experts, every top-M choice contains an own slot: a token always
    gives the own expert positive weight and uses between 1 and M distinct experts.
    """

    def __init__(self, d_in: int, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.proj = nn.Linear(d_in, 2 * n_experts - 1, bias=False)
        self.register_buffer("own", torch.tensor(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.proj.in_features)  # kaiming_uniform_ with a=sqrt(5), as the official code
        with torch.no_grad():
            self.proj.weight.uniform_(-bound, bound, generator=generator)

    def slot_experts(self) -> torch.Tensor:
        mapping = torch.arange(2 * self.n_experts - 1, device=self.own.device)
        mapping[self.n_experts:] = self.own
        return mapping

    def forward(self, x):
        probs = torch.softmax(self.proj(x).float(), dim=-1)
        top, slots = probs.topk(self.n_experts, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        experts = self.slot_experts()[slots]
        weights = torch.zeros(*top.shape[:-1], self.n_experts, dtype=top.dtype, device=top.device)
        return weights.scatter_add(-1, experts, top).to(x.dtype)


class AdaptedLinear(nn.Module):
    """A frozen `nn.Linear` plus named LoRA experts and, for more than one, a mixer."""

    def __init__(self, base: nn.Linear, experts: dict[str, LoRAExpert], mixer: Mixer | None = None):
        super().__init__()
        if len(experts) > 1 and mixer is None:
            raise ValueError("several experts need a mixer")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.experts = nn.ModuleDict(experts)
        self.mixer = mixer
        self.only: str | None = None  # set by `only_expert` to evaluate one expert alone

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some backbones read .weight of their projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.only is not None:
            return y + self.experts[self.only](x)
        if len(self.experts) == 1:
            return y + next(iter(self.experts.values()))(x)
        if not self.experts:
            return y
        weights = self.mixer(x)
        experts = list(self.experts.values())
        if any(not isinstance(e.dropout, nn.Identity) for e in experts):
            for i, expert in enumerate(experts):  # each expert draws its own dropout mask
                y = y + weights[..., i : i + 1] * expert(x)
            return y
        # sum_e w_e s_e B_e A_e x as one low-rank product of the stacked experts: two matrix
        # products for all experts instead of two per expert, and the mixing weights scale the
        # rank-sized hidden vector rather than each expert's full-width output.
        down = torch.cat([e.A for e in experts])  # (sum of ranks, d_in)
        up = torch.cat([e.B for e in experts], dim=1)  # (d_out, sum of ranks)
        hidden = (x @ down.t()) * (weights @ self._rank_spread(experts, weights))
        return y + hidden @ up.t()

    def _rank_spread(self, experts: list[LoRAExpert], like: torch.Tensor) -> torch.Tensor:
        """(n_experts, sum of ranks): row e holds expert e's scaling on its rank's columns."""
        key = tuple((e.rank, e.scaling) for e in experts)
        spread = getattr(self, "_spread", None)
        if spread is None or self._spread_key != key:
            spread = torch.block_diag(*[torch.full((1, e.rank), e.scaling) for e in experts])
            self._spread, self._spread_key = spread, key
        if spread.device != like.device or spread.dtype != like.dtype:
            spread = self._spread = spread.to(like.device, like.dtype)
        return spread

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for expert in self.experts.values():
            expert.reset_parameters(generator)
        if self.mixer is not None:
            self.mixer.reset_parameters(generator)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


@contextmanager
def only_expert(model: nn.Module, name: str):
    """Evaluate with one expert alone in every adapted layer and one role of every prompt context
    (e.g. the global model)."""
    layers = [m for _, m in adapted_layers(model)] + [c for _, c in prompt_contexts(model)]
    for m in layers:
        m.only = name
    try:
        yield model
    finally:
        for m in layers:
            m.only = None
