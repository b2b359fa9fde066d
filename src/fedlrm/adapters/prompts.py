"""Learnable prompt context (CoOp): vectors that take the place of the template words before a
class name in the text encoder's input, trained while the text encoder stays frozen.

    "X X X X {class}."  ->  [BOS] v_1 v_2 v_3 v_4 embed({class}) embed(".") [EOS]

Each role (`global`: what the server averages, `local`: what stays on the client) holds its own
n_ctx vectors; the weights are named `<module>.experts.<role>.ctx`, so they take part in a
method's shared and private state as LoRA experts do.
"""

from __future__ import annotations

import torch
from torch import nn

PLACEHOLDER = "X"  # the word each context vector replaces, as CoOp writes it


class ContextVectors(nn.Module):
    def __init__(self, n_ctx: int, width: int):
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, width))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():  # CoOp's random initialisation
            self.ctx.normal_(0.0, 0.02, generator=generator)


class PromptContext(nn.Module):
    """The context vectors of one or more roles; `active` is the role the text encoder reads now.

    A context that `scores_by_role` reads every role at once: the classifier embeds each class with
    each role's vectors and lets `score` weigh them against the image, by its patch tokens (FedOTP's
    transport) or its pooled feature (pFedMoAP's gate). `only` (set by `fedlrm.adapters.only_expert`)
    restricts it to one role, e.g. the global model."""

    #: None: the classifier scores the pooled image feature against the active role's class features;
    #: "patches" or "pooled": it calls `score` with those image features and every role's class features
    scores_by_role: str | None = None

    def __init__(self, n_ctx: int, width: int, roles: tuple[str, ...] = ("global",)):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"a prompt context needs at least one vector, got {n_ctx}")
        self.n_ctx, self.width = n_ctx, width
        self.experts = nn.ModuleDict({role: ContextVectors(n_ctx, width) for role in roles})
        self.active = roles[0]
        self.only: str | None = None

    def vectors(self, role: str | None = None) -> torch.Tensor:
        return self.experts[role or self.only or self.active].ctx

    def roles_in_use(self) -> tuple[str, ...]:
        return (self.only,) if self.only is not None else tuple(self.experts)

    def score(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine-scale scores (batch, classes) from normalised image features, (batch, patches, d) or
        (batch, d) as `scores_by_role` says, and the normalised class features of each role in use
        (roles, classes, d)."""
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for expert in self.experts.values():
            expert.reset_parameters(generator)

    def template(self, class_name: str) -> str:
        """The prompt whose placeholder words the context replaces."""
        return " ".join([PLACEHOLDER] * self.n_ctx) + f" {class_name}."


def prompt_contexts(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, PromptContext):
            yield name, module
