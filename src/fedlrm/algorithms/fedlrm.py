"""FedLRM (the paper's method): a global and a local LoRA expert mixed by a learned gate.

Per adapted layer  y = W x + g(x) * B_g A_g x + (1 - g(x)) * B_l A_l x  with
(g, 1 - g) = softmax(Linear(d_in, 2, bias=False)(x)). The global expert is trained
locally, uploaded and averaged (FedAvg); the local expert and the gate stay on the client.
"""

from dataclasses import dataclass

from fedlrm.adapters import AdaptedLinear, SoftmaxGate, only_expert
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one, one_of


@dataclass
class FedLRMSettings:
    local_rank: int = 4  # the local expert's rank; the paper fixes 4
    gate: str = "sample"  # granularity: `sample` (one weight pair per image) or `token` (one per token)


@register
class FedLRM(Algorithm):
    name = "fedlrm"
    Settings = FedLRMSettings
    moved_keys = {"adapter.local_rank": "local_rank", "adapter.gate": "gate"}

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("fedlrm.local_rank", settings.local_rank)
        one_of("fedlrm.gate", settings.gate, ("sample", "token"))

    def make_layer(self, linear, layout):
        s = self.settings
        experts = {"global": self.expert(linear, self.cfg.adapter.rank), "local": self.expert(linear, s.local_rank)}
        return AdaptedLinear(linear, experts, SoftmaxGate(linear.in_features, 2, s.gate))

    def global_view(self, model):
        return only_expert(model, "global")
