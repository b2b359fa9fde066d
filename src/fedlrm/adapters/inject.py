"""Putting adapters on a model's linear layers, and reading or writing their weights."""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from fedlrm.adapters.layers import AdaptedLinear, adapted_layers
from fedlrm.adapters.prompts import prompt_contexts
from fedlrm.errors import ModelError

BLOCK_INDEX = re.compile(r"(?:layers|resblocks|blocks|layer|h)\.(\d+)\.")


def inject_adapters(
    root: nn.Module,
    target_modules: list[str],
    make: Callable[[nn.Linear], AdaptedLinear],
    target_layers: list[int] | None = None,
) -> list[str]:
    """Replace every `nn.Linear` under `root` whose name ends with a target by `make(linear)`.

    `target_layers` restricts this to blocks with those indices; negative ones count from
    the top (-1 is the last block), so [-4, -3, -2, -1] is the top third of a 12-block
    encoder. Returns the adapted module names (relative to `root`), in model order.
    """
    chosen = target_linears(root, target_modules, target_layers)
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _ in _linears(root)})
        raise ModelError(
            f"no linear layer of the image encoder matches model.target_modules={list(target_modules)}"
            + (f" in blocks {block_indices(target_layers, encoder_depth(root))}" if target_layers else "")
            + f"; its linear layers end with: {', '.join(suffixes) or '(none)'}"
        )
    adapted = []
    for name, module in chosen:
        layer = make(module)
        if layer is None:  # the method leaves this layer as it is (e.g. prompt learning adapts no linear)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer)
        adapted.append(name)
    return adapted


def _linears(root: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear) and n]


def _depth(linears: list[tuple[str, nn.Linear]]) -> int:
    return 1 + max((b for n, _ in linears if (b := block_index(n)) is not None), default=-1)


def encoder_depth(root: nn.Module) -> int:
    """The number of transformer blocks under `root`, by its layer names (0: none found)."""
    return _depth(_linears(root))


def target_linears(root: nn.Module, target_modules: list[str],
                   target_layers: list[int] | None = None) -> list[tuple[str, nn.Linear]]:
    """The linear layers `inject_adapters` adapts, with their names, in model order."""
    linears = _linears(root)
    layers = block_indices(target_layers, _depth(linears)) if target_layers else None
    return [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in target_modules
            and (layers is None or block_index(n) in layers)]


def block_index(name: str) -> int | None:
    """The index of the transformer block a module or adapter weight belongs to (None: no block)."""
    found = BLOCK_INDEX.search(name + ".")
    return None if found is None else int(found.group(1))


def block_indices(target_layers: list[int], depth: int) -> list[int]:
    """`model.target_layers` of an encoder with `depth` blocks, negative ones counted from the top."""
    return [i + depth if i < 0 else i for i in target_layers]


def strip_adapters(root: nn.Module) -> int:
    """Put every adapted layer's frozen linear back in its place; returns how many."""
    layers = list(adapted_layers(root))
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.base)
    return len(layers)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All adapter parameters (experts and gates, prompt context vectors) by their name in `model`."""
    params = {}
    for layer_name, layer in adapted_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base."):
                params[f"{layer_name}.{pname}"] = p
    for context_name, context in prompt_contexts(model):
        for pname, p in context.named_parameters():
            params[f"{context_name}.{pname}"] = p
    return params


def get_state(model: nn.Module, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of adapter weights (all of them, or the given keys)."""
    params = adapter_parameters(model)
    keys = list(params) if keys is None else keys
    return {k: params[k].detach().clone() for k in keys}


def set_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy weights into adapter parameters; unknown keys or shapes are an error."""
    params = adapter_parameters(model)
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"adapter state has keys this model does not: {unknown[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(f"adapter weight {k} has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
            params[k].copy_(v)


def reset_adapters(model: nn.Module, seed: int) -> None:
    """Re-initialise every adapter from a seed (same seed, same weights)."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        layer.reset_parameters(generator)
    for _, context in prompt_contexts(model):  # after the layers: their draws stay what they were
        context.reset_parameters(generator)


def adapted_weight_count(model: nn.Module) -> int:
    """Parameters that full fine-tuning of the adapted matrices would train (weights only)."""
    return sum(layer.base.weight.numel() for _, layer in adapted_layers(model))
