"""LoRA with FedProx (the paper's LoRAProx): FedAvg plus mu/2 * ||theta - theta_global||^2 locally."""

from fedlrm.adapters import adapter_parameters
from fedlrm.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def regularizer(self, model, received):
        params = adapter_parameters(model)
        squared = sum(((params[k] - v.to(params[k].device)) ** 2).sum() for k, v in received.items())
        return 0.5 * self.cfg.train.prox_mu * squared
