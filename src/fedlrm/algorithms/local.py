"""Local-only: each client fine-tunes its own LoRA and never communicates."""

from fedlrm.adapters import AdaptedLinear
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register


@register
class Local(Algorithm):
    name = "local"
    has_global_model = False

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"local": self.expert(linear, self.cfg.adapter.rank)})
