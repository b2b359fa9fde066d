"""Frozen-prefix caching: run the frozen blocks below the lowest adapted one once per image.

When only the top blocks of the image encoder train, everything below them is a fixed
function of the image during local training. Without augmentation, its output for a
training image is the same in every local epoch (and, if those blocks carry no adapters,
in every round), so it is computed once and kept; training then runs only the top blocks.
The cached path calls the same modules in the same order as the full forward pass, so its
results equal the full pass (tests/test_frozen_prefix.py).
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, ContextManager

import torch
from torch import nn

from fedlrm.adapters import AdaptedLinear
from fedlrm.models.backbone import ClipClassifier

log = logging.getLogger("fedlrm.prefix")

# image set -> backbone -> {(start block, precision): hidden states of its images}; entries go
# when the image set or the backbone is garbage-collected
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def first_trained_block(model: ClipClassifier) -> int | None:
    """Index of the lowest image-encoder block with a trainable weight; None if the backend
    cannot run its encoder in two parts or nothing in it trains."""
    blocks = model.backbone.blocks()
    if blocks is None:
        return None
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return None


def has_adapters(model: ClipClassifier, start: int) -> bool:
    """Whether blocks below `start` carry adapters (frozen now, but they may change between
    rounds, as F3OCUS's unselected blocks do)."""
    return any(isinstance(m, AdaptedLinear) for block in model.backbone.blocks()[:start] for m in block.modules())


def _stochastic(modules: list[nn.Module]) -> bool:
    """Whether any module would draw random numbers in training mode (dropout)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return True
            rate = getattr(m, "dropout", 0.0)
            if isinstance(rate, float) and rate > 0:  # e.g. CLIPAttention's attention dropout
                return True
    return False


def cacheable_start(model: ClipClassifier, augment: bool) -> int:
    """The block whose input can be cached for training, or 0 when caching does not apply:
    augmentation changes the images every epoch, and random frozen blocks (dropout) would
    be drawn once instead of per step."""
    start = first_trained_block(model)
    blocks = model.backbone.blocks()
    if start is None and blocks is not None and getattr(model, "text_trains", False):
        start = len(blocks)  # only the text side trains (a prompt context): every image block is frozen
    if augment or not start:
        return 0
    if _stochastic(model.backbone.stem() + model.backbone.blocks()[:start]):
        log.info("not caching the frozen blocks: they contain dropout, which must be drawn per step")
        return 0
    return start


@torch.no_grad()
def prefix_hidden(model: ClipClassifier, image_set, start: int, batch_size: int, precision: str,
                  autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """Hidden states entering block `start` for every image of `image_set`, in its order.

    If the blocks below carry no adapters they are the pretrained ones for good, and the
    result is kept per (image set, backbone, block, precision) while both live; otherwise
    it holds for this local training only and is computed afresh."""
    persistent = not has_adapters(model, start)
    per_backbone = {}
    if persistent:
        per_backbone = _CACHE.setdefault(image_set, weakref.WeakKeyDictionary()).setdefault(model.backbone, {})
    key = (start, precision)
    if key not in per_backbone:
        device = model.text_features.device
        parts = []
        for images, _ in image_set.batches(batch_size):
            with autocast():
                parts.append(model.backbone.hidden_before(images.to(device), start))
        per_backbone[key] = torch.cat(parts)
    return per_backbone[key]
