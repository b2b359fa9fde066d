"""FedOTP (Li et al., CVPR 2024): global and local prompts that cooperate through optimal transport.

Every client trains two CoOp contexts with both CLIP encoders frozen: a global one, which the server
averages by sample count (FedAvg), and a local one, which never leaves the client. An image is not
scored by its pooled feature: each class is a set of two text features (the class name under either
context), the image is the set of its patch tokens' features, and the class score is the similarity
the entropic optimal transport plan between the two sets carries,

    score_k(x) = sum_{m, r} T*_{m r} cos(f_m(x), g_{k r}),   T* = argmin <T, 1 - cos> - eps H(T),

with the plan computed without gradient (the prompts train through the cosines). Marginals:
patches 1/M each; `transport=balanced` gives each prompt 1/2 (Sinkhorn, POT's batched solver);
`transport=unbalanced` (FedOTP's default, its "COT") moves only `mass` of the patches' weight, each
patch sending at most 1/M and each prompt receiving mass/2, so that a prompt may ignore the patches
it does not describe. The global model is the global context alone, scored by the same transport
with one prompt.

Deviations from the paper and its code (HongxiaLee/FedOTP), listed in the README: contexts start
from N(0, 0.02) as there, but the optimiser, learning rate and schedule are the run's (`train.*`),
not Dassl's SGD; the Sinkhorn loop stops on the largest relative change of the prompt-side scaling
(below `tol`), not the mean absolute one, which depends on the scale of the kernel; the patch
features come from the backbone's final layer norm and projection applied to every token, as in the
authors' modified CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlrm.adapters import PromptContext, only_expert
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one
from fedlrm.errors import ConfigError

TRANSPORTS = ("unbalanced", "balanced")


@dataclass
class FedOTPSettings:
    n_ctx: int = 4  # context vectors of each prompt (FedOTP's scripts: 16 on its datasets, 4 on CIFAR)
    transport: str = "unbalanced"  # FedOTP's COT; or balanced (plain Sinkhorn)
    mass: float = 0.8  # unbalanced: the share of the patches' weight the prompts take (top_percent)
    eps: float = 0.1  # entropic regularisation of the transport
    max_iter: int = 100  # Sinkhorn iterations at most
    tol: float = 1e-3  # stop when the scalings change by less than this (relative)


def transport_plans(cost: torch.Tensor, settings: FedOTPSettings) -> torch.Tensor:
    """Entropic transport plans (batch, patches, prompts) for a batch of costs of the same shape."""
    batch, patches, prompts = cost.shape
    if settings.transport == "balanced":
        import ot.batch

        a = cost.new_full((batch, patches), 1.0 / patches)
        b = cost.new_full((batch, prompts), 1.0 / prompts)
        return ot.batch.solve_batch(cost, reg=settings.eps, a=a, b=b, max_iter=settings.max_iter,
                                    tol=settings.tol, method="sinkhorn", grad="detach").plan
    return partial_plans(cost, settings.mass, settings.eps, settings.max_iter, settings.tol)


def partial_plans(cost: torch.Tensor, mass: float, eps: float, max_iter: int, tol: float) -> torch.Tensor:
    """Entropic partial transport, batched: each of the M rows sends at most 1/M, each of the R columns
    receives exactly mass/R. Block-coordinate ascent on the dual (POT's `ot.partial` solves one
    problem at a time): the row scaling is capped at 1, which is the row inequality's multiplier."""
    _, rows, columns = cost.shape
    kernel = torch.exp(-cost / eps)
    a, b = 1.0 / rows, mass / columns
    u = cost.new_ones(cost.shape[:2])
    v = cost.new_ones((cost.shape[0], columns))
    for _ in range(max_iter):
        previous = v
        u = (a / (kernel @ v.unsqueeze(-1)).squeeze(-1)).clamp(max=1.0)
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        if float(((v - previous).abs() / previous).max()) < tol:
            break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(1)


class TransportPrompts(PromptContext):
    """A global and a local context; a class's score is the transported similarity of both prompts'
    features to the image's patch features."""

    scores_by_role = "patches"

    def __init__(self, n_ctx: int, width: int, settings: FedOTPSettings):
        super().__init__(n_ctx, width, ("global", "local"))
        self.settings = settings

    def score(self, patches, text):
        sim = torch.einsum("bmd,rkd->bkmr", patches, text)  # (batch, classes, patches, roles)
        batch, classes, m, r = sim.shape
        with torch.no_grad():
            cost = (1.0 - sim.detach().float()).reshape(batch * classes, m, r)
            plan = transport_plans(cost, self.settings).view(batch, classes, m, r)
        return (plan.to(sim.dtype) * sim).sum(dim=(2, 3))


@register
class FedOTP(Algorithm):
    name = "fedotp"
    Settings = FedOTPSettings
    quick_settings = {"max_iter": 20}
    compare_variants = ("transport=balanced",)

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("fedotp.n_ctx", settings.n_ctx)
        at_least_one("fedotp.max_iter", settings.max_iter)
        if settings.transport not in TRANSPORTS:
            raise ConfigError(f"fedotp.transport must be one of {', '.join(TRANSPORTS)}, got {settings.transport!r}")
        if not 0 < settings.mass <= 1:
            raise ConfigError(f"fedotp.mass must be in (0, 1] (the share of the patches' weight the prompts "
                              f"take), got {settings.mass}")
        if not settings.eps > 0:
            raise ConfigError(f"fedotp.eps must be positive (the transport's entropic regularisation), got {settings.eps}")
        if not settings.tol > 0:
            raise ConfigError(f"fedotp.tol must be positive, got {settings.tol}")
        if cfg.model.backend != "hf":
            raise ConfigError(f"fedotp scores images by their patch tokens, which model.backend={cfg.model.backend} "
                              "does not give here; use model.backend=hf")

    def make_layer(self, linear, layout):
        return None  # no LoRA: the two prompts are all a client trains

    def make_prompt(self, width, layout, feature_dim):
        return TransportPrompts(self.settings.n_ctx, width, self.settings)

    def global_view(self, model):
        return only_expert(model, "global")
