"""Backbones: CLIP-style models whose image encoder can carry adapters."""

from fedlrm.models.backbone import Backbone, ClipClassifier, HFClipBackbone, OpenClipBackbone, load_backbone

__all__ = ["Backbone", "ClipClassifier", "HFClipBackbone", "OpenClipBackbone", "load_backbone"]
