"""What crosses between the round loop and the clients, whatever carries it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedlrm.algorithms import Schema, State
from fedlrm.federation.wire import decode


@dataclass
class TrainReply:
    """A client's answer to a training message."""

    client: int
    upload: bytes
    num_examples: int
    train_loss: float | None = None
    train_seconds: float = 0.0
    compute_seconds: float = 0.0  # of train_seconds, in forward, backward and optimiser steps


@dataclass
class EvalReply:
    client: int
    accuracy: float
    loss: float
    n_test: int
    n_train: int
    seconds: float = 0.0
    forward_seconds: float = 0.0  # of seconds, in forward passes


@dataclass
class Message:
    """One transfer between server and a client, as it crossed."""

    round: int
    client: int
    direction: str  # "down" (server to client) or "up"
    payload: bytes

    @property
    def keys(self) -> list[str]:
        return list(decode(self.payload))


class Transport(Protocol):
    """Carries the server's messages to clients and brings back their answers.

    A client that fails or does not answer in time is simply absent from the result."""

    def train(self, round_index: int, messages: dict[int, bytes]) -> dict[int, TrainReply]: ...

    def evaluate(self, round_index: int, messages: dict[int, bytes]) -> dict[int, EvalReply]: ...

    def private_states(self) -> dict[int, State]:
        """Client-held state to put in the server's checkpoint ({} where clients keep their own)."""
        ...

    def restore(self, private: dict[int, State]) -> None: ...

    def secure_train(self, round_index: int, messages: dict[int, bytes], schema: Schema) -> tuple[State | None, int]:
        """Train with secure aggregation: the weighted mean of the uploads and how many contributed."""
        ...
