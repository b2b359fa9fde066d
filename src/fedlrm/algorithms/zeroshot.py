"""Zero-shot CLIP: the frozen model and the class prompts, nothing trained or sent."""

from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register


@register
class ZeroShot(Algorithm):
    name = "zeroshot"
    trains = False

    def make_layer(self, linear, layout):
        return None
