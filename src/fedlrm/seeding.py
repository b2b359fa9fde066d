"""Seeds derived from the run seed, so any round of any client can be replayed on its own."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients `sample_clients` draws in a round."""
    return num_clients if fraction >= 1.0 else max(1, int(round(fraction * num_clients)))


def sample_clients(seed: int, round_index: int, num_clients: int, fraction: float,
                   purpose: str = "sample") -> list[int]:
    """The clients taking part in a round: at least one, chosen by a per-round seed
    (`purpose` keeps the draws of training and of evaluation apart)."""
    if fraction >= 1.0:
        return list(range(num_clients))
    count = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, purpose, round_index))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))
