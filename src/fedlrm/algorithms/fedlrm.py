"""FedLRM (the paper's method): a global and a local LoRA expert mixed by a learned gate.

Per adapted layer  y = W x + g(x) * B_g A_g x + (1 - g(x)) * B_l A_l x  with
(g, 1 - g) = softmax(Linear(d_in, 2, bias=False)(x)). The global expert is trained
locally, uploaded and averaged (FedAvg); the local expert and the gate stay on the client.
"""

from fedlrm.adapters import AdaptedLinear, SoftmaxGate, only_expert
from fedlrm.algorithms.base import Algorithm


class FedLRM(Algorithm):
    name = "fedlrm"

    def make_layer(self, linear):
        a = self.cfg.adapter
        experts = {"global": self.expert(linear, a.rank), "local": self.expert(linear, a.local_rank)}
        return AdaptedLinear(linear, experts, SoftmaxGate(linear.in_features, 2, a.gate))

    def global_view(self, model):
        return only_expert(model, "global")
