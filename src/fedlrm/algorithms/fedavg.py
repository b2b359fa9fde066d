"""LoRA with FedAvg (the paper's LoRAFL): one LoRA, uploaded and averaged by sample count."""

from fedlrm.adapters import AdaptedLinear
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"global": self.expert(linear, self.cfg.adapter.rank)})
