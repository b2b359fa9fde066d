"""LoRA with APFL (the paper's LoRAAPFL): a global and a local LoRA mixed with fixed weights.

Both are trained on the client; only the global one is uploaded. The mix is `apfl.mix`
(0.5 in the paper) for the global LoRA and the rest for the local one. The local LoRA has
rank `apfl.local_rank` (4, as FedLRM's local expert), so that APFL is FedLRM with its gate
replaced by the fixed mix.
"""

from dataclasses import dataclass

from fedlrm.adapters import AdaptedLinear, FixedMix, only_expert
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one
from fedlrm.errors import ConfigError


@dataclass
class APFLSettings:
    local_rank: int = 4  # rank of the local LoRA
    mix: float = 0.5  # fixed weight of the global LoRA; the local one gets 1 - mix


@register
class APFL(Algorithm):
    name = "apfl"
    Settings = APFLSettings
    moved_keys = {"adapter.local_rank": "local_rank", "adapter.apfl_mix": "mix"}

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("apfl.local_rank", settings.local_rank)
        if not 0 <= settings.mix <= 1:
            raise ConfigError(f"apfl.mix must be in [0, 1], got {settings.mix}")

    def make_layer(self, linear, layout):
        s = self.settings
        experts = {"global": self.expert(linear, self.cfg.adapter.rank), "local": self.expert(linear, s.local_rank)}
        return AdaptedLinear(linear, experts, FixedMix([s.mix, 1.0 - s.mix]))

    def global_view(self, model):
        return only_expert(model, "global")
