"""PromptFL (Guo et al., 2023): federated prompt learning. Every client trains CoOp's learnable
context, n_ctx vectors in place of the template words before the class name, with both CLIP
encoders frozen; the server averages the contexts by sample count (FedAvg) and sends the mean
back. Nothing on the image side is adapted, and nothing stays private.

Deviations from the paper and CoOp's code, listed in the README: the context is one for every
class (CoOp's unified context, PromptFL's default) and starts from N(0, 0.02) (CoOp's random
initialisation, not "a photo of a"); its length is `promptfl.n_ctx` (4 by default, not 16: the
built-in model's text encoder reads at most 32 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlrm.adapters import PromptContext
from fedlrm.algorithms.base import Algorithm
from fedlrm.algorithms.registry import register
from fedlrm.config import at_least_one


@dataclass
class PromptFLSettings:
    n_ctx: int = 4  # learnable context vectors before the class name (CoOp, PromptFL: 16)


@register
class PromptFL(Algorithm):
    name = "promptfl"
    Settings = PromptFLSettings

    @classmethod
    def check(cls, settings, cfg):
        at_least_one("promptfl.n_ctx", settings.n_ctx)

    def make_layer(self, linear, layout):
        return None  # no LoRA: the prompt is all a client trains

    def make_prompt(self, width, layout, feature_dim):
        return PromptContext(self.settings.n_ctx, width, ("global",))
