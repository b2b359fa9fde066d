"""What crosses between clients and server: tensors serialised with safetensors.

Both runtimes send these bytes, so communication is counted from what actually
crosses (payload length), not from a formula.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save


def encode(state: dict[str, torch.Tensor]) -> bytes:
    if not state:
        return b""
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    return load(payload) if payload else {}
