"""LoRA experts, the layer that mixes them beside a frozen linear, and injection helpers."""

from fedlrm.adapters.inject import (adapted_weight_count, adapter_parameters, block_index, get_state,
                                    inject_adapters, reset_adapters, set_state, strip_adapters)
from fedlrm.adapters.layers import (AdaptedLinear, FixedMix, LoRAExpert, Mixer, SoftmaxGate, TopMRouter,
                                    adapted_layers, only_expert)
from fedlrm.adapters.prompts import PromptContext, prompt_contexts

__all__ = [
    "AdaptedLinear", "FixedMix", "PromptContext", "prompt_contexts", "LoRAExpert", "Mixer", "SoftmaxGate", "TopMRouter", "adapted_layers", "only_expert",
    "adapted_weight_count", "adapter_parameters", "block_index", "get_state", "inject_adapters", "reset_adapters", "set_state",
    "strip_adapters",
]
