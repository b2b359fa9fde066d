"""LoRA with FedProx (the paper's LoRAProx): FedAvg plus mu/2 * ||theta - theta_global||^2 locally."""

from dataclasses import dataclass

from fedlrm.adapters import adapter_parameters
from fedlrm.algorithms.fedavg import FedAvg
from fedlrm.algorithms.registry import register
from fedlrm.config import finite_nonnegative


@dataclass
class FedProxSettings:
    mu: float = 0.01  # weight of the proximal term


@register
class FedProx(FedAvg):
    name = "fedprox"
    Settings = FedProxSettings
    moved_keys = {"train.prox_mu": "mu"}

    @classmethod
    def check(cls, settings, cfg):
        finite_nonnegative("fedprox.mu", settings.mu)

    def regularizer(self, model, ctx):
        params = adapter_parameters(model)
        squared = sum(((params[k] - v.to(params[k].device)) ** 2).sum() for k, v in ctx.received.items())
        return 0.5 * self.settings.mu * squared
