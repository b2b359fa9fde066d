"""Attacking clients, for measuring what the server's defences hold (benchmarks/attacks.py, tests).

An `AttackingTransport` wraps the in-process transport: honest clients answer as they are,
the attackers' answers are rewritten after their honest local training, as a client that
runs its own code could. The attacks are those tried on the landed server, plus two of
the literature's usual ones:

* `inflate`: honest weights, claims 10^12 training examples (its weight in the mean);
* `takeover`: `inflate` with its change sign-flipped and scaled just under the outlier bound;
* `signflip`: its change sign-flipped and scaled just under the outlier bound;
* `zero`: sends back exactly what it received (colluders drag a median reference to zero);
* `noise`: Gaussian noise instead of its change, of the same norm as `signflip`'s;
* `labelflip`: trains honestly on its data with every label y replaced by C - 1 - y
  (`flip_labels`, applied to the clients before the run).

"Just under the outlier bound" is `scale` times the attacker's own honest change (default
0.99 x 10, the default `federation.max_norm_ratio`): attackers know their own update, not
the others'.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from fedlrm.federation.client import Client
from fedlrm.federation.messages import TrainReply
from fedlrm.federation.simulation import InProcessTransport
from fedlrm.federation.updates import change, norm
from fedlrm.federation.wire import decode, encode
from fedlrm.seeding import derive_seed

ATTACKS = ("inflate", "takeover", "signflip", "zero", "noise", "labelflip")
INFLATED_EXAMPLES = 10 ** 12


def flip_labels(clients: list[Client], attackers: list[int], num_classes: int) -> None:
    """Give each attacker a copy of its training set whose every label y is C - 1 - y."""
    for c in attackers:
        flipped = copy.copy(clients[c].split.train)
        classes = clients[c].split.classes  # a client with classes of its own flips within them
        flipped.labels = (len(classes) if classes is not None else num_classes) - 1 - flipped.labels
        clients[c].split = replace(clients[c].split, train=flipped)


class AttackingTransport:
    """The in-process transport with `attackers` rewriting their training answers by `kind`."""

    def __init__(self, inner: InProcessTransport, attackers: list[int], kind: str, scale: float = 9.9,
                 seed: int = 0):
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
        self.inner, self.attackers, self.kind, self.scale, self.seed = inner, set(attackers), kind, scale, seed

    def train(self, round_index: int, messages: dict[int, bytes]) -> dict[int, TrainReply]:
        replies = self.inner.train(round_index, messages)
        if self.kind == "labelflip":
            return replies  # the poison is in the attackers' data
        for c in sorted(self.attackers & set(replies)):
            reply, sent = replies[c], decode(messages[c])
            honest = decode(reply.upload)
            replies[c] = replace(reply, upload=encode(self.rewrite(honest, sent, round_index, c)),
                                 num_examples=INFLATED_EXAMPLES if self.kind in ("inflate", "takeover")
                                 else reply.num_examples)
        return replies

    def rewrite(self, honest: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], round_index: int,
                client: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "attack", round_index, client))
        keys = [k for k, v in honest.items() if k in sent and v.is_floating_point() and sent[k].shape == v.shape]
        deltas = change(honest, sent, keys)
        if self.kind == "noise":
            noise = {k: torch.randn(d.shape, generator=generator, dtype=torch.float64) for k, d in deltas.items()}
            deltas = {k: n * (self.scale * norm(deltas) / (norm(noise) or 1.0)) for k, n in noise.items()}
        elif self.kind in ("signflip", "takeover"):
            deltas = {k: -self.scale * d for k, d in deltas.items()}
        elif self.kind == "zero":
            deltas = {k: torch.zeros_like(d) for k, d in deltas.items()}
        else:  # inflate: its own weights
            return dict(honest)
        return {**honest, **{k: (sent[k].double() + d).to(honest[k].dtype) for k, d in deltas.items()}}

    def evaluate(self, round_index, messages):
        return self.inner.evaluate(round_index, messages)

    def private_states(self):
        return self.inner.private_states()

    def restore(self, private) -> None:
        self.inner.restore(private)

    def secure_train(self, round_index, messages, schema):
        return self.inner.secure_train(round_index, messages, schema)
