"""LoRA with APFL (the paper's LoRAAPFL): a global and a local LoRA mixed with fixed weights.

Both are trained on the client; only the global one is uploaded. The mix is
adapter.apfl_mix (0.5 in the paper) for the global LoRA and the rest for the local one.
The local LoRA has adapter.local_rank, as FedLRM's local expert, so that APFL is FedLRM
with its gate replaced by the fixed mix.
"""

from fedlrm.adapters import AdaptedLinear, FixedMix, only_expert
from fedlrm.algorithms.base import Algorithm


class APFL(Algorithm):
    name = "apfl"

    def make_layer(self, linear):
        a = self.cfg.adapter
        experts = {"global": self.expert(linear, a.rank), "local": self.expert(linear, a.local_rank)}
        return AdaptedLinear(linear, experts, FixedMix([a.apfl_mix, 1.0 - a.apfl_mix]))

    def global_view(self, model):
        return only_expert(model, "global")
