"""Bounded influence and robust aggregation: what one client, or a few, can do to a round.

Every defence here works on the uploads that passed `validation`'s checks and knows
nothing of the algorithm that runs:

* `capped_weights` bounds a client's share of the round's weight (claimed examples);
* `clip_update` scales an update (its change to what the client was sent) down to a norm
  bound, the standard norm-bounding defence;
* `combine` replaces the sample-weighted mean with a coordinate-wise median, a trimmed mean,
  Krum or multi-Krum, computed by Flower's own aggregation functions. It serves methods
  that need only the mean (`Algorithm.aggregates_by_mean`): the robust estimate then
  stands in for the uploads, as the SecAgg+ mean does.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedlrm.algorithms import State, Upload
from fedlrm.config import FederationConfig
from fedlrm.federation.updates import change, norm


def capped_weights(weights: dict[int, float], max_share: float | None) -> dict[int, float]:
    """Weights renormalised so that no client's share exceeds `max_share`, the others keeping
    their proportions (water-filling); the total stays the same. Equal shares where the cap
    cannot hold (fewer clients than 1 / max_share)."""
    total = float(sum(weights.values()))
    if max_share is None or not weights or total <= 0:
        return dict(weights)
    if max_share * len(weights) < 1:
        return {c: total / len(weights) for c in weights}
    capped: set[int] = set()
    while True:
        free = {c: w for c, w in weights.items() if c not in capped}
        left = 1.0 - max_share * len(capped)
        free_total = sum(free.values())
        over = {c for c, w in free.items() if w / free_total * left > max_share + 1e-12}
        if not over:
            break
        capped |= over
    return {c: total * (max_share if c in capped else w / free_total * left) for c, w in weights.items()}


def clip_update(upload: State, sent: State, keys, bound: float) -> tuple[State, float]:
    """The upload with its change scaled down to L2 norm `bound` (over `keys` jointly), and the factor."""
    delta = change(upload, sent, keys)
    size = norm(delta)
    if size <= bound:
        return upload, 1.0
    factor = bound / size
    # the change of a new tensor is the tensor itself, so it is scaled as a whole
    return {**upload, **{k: (upload[k].double() - d * (1 - factor)).to(upload[k].dtype)
                         for k, d in delta.items()}}, factor


def combine(uploads: list[Upload], fed: FederationConfig) -> Upload:
    """One upload standing for all of `uploads`, combined by `fed.aggregator` (not "mean")."""
    keys = sorted(uploads[0].state)
    if any(sorted(u.state) != keys for u in uploads):
        raise ValueError("robust aggregation needs every upload to carry the same tensors")
    results = [([u.state[k].double().cpu().numpy() for k in keys], u.num_examples) for u in uploads]
    n, f = len(uploads), fed.byzantine
    if fed.aggregator == "median":
        arrays = aggregate_median(results)
    elif fed.aggregator == "trimmed_mean":
        arrays = aggregate_trimmed_avg(results, fed.trim_fraction)
    elif fed.aggregator == "krum":
        arrays = aggregate_krum(results, f, 0)
    elif fed.aggregator == "multikrum":
        # Fewer than planned may have arrived: keep what is left after f, at least one.
        keep = max(1, min(fed.multikrum_keep or n - f, n - f))
        arrays = aggregate_krum(results, f, keep)
    else:
        raise ValueError(f"unknown aggregator {fed.aggregator!r}")
    state = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(uploads[0].state[k].dtype)
             for k, a in zip(keys, arrays)}
    return Upload(-1, state, sum(u.num_examples for u in uploads))
