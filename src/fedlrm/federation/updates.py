"""What a client changed: the measure every check, clip and attack on uploads shares."""

from __future__ import annotations

import math

from fedlrm.algorithms import State


def change(upload: State, sent: State, keys) -> State:
    """The upload minus what it was sent, in float64 (the upload itself for tensors it was not sent)."""
    return {k: upload[k].double() - sent[k].double() if k in sent and sent[k].shape == upload[k].shape
            else upload[k].double() for k in keys}


def norm(state: State) -> float:
    """L2 norm of all tensors of `state` together."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))
