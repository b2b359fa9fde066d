"""Checks on what a client uploads, before the server lets it near the global state.

A client may be broken (a diverged optimiser gives NaN), out of date (another layout),
or hostile (a scaled update that drags the average). The server compares each upload
with what an honest client holding the same message would send: the same keys, shapes
and dtypes, finite values, and an update norm not far beyond the round's median.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlrm.algorithms import Algorithm, Schema, State
from fedlrm.config import RunConfig
from fedlrm.federation.task import ModelBundle, load_client


@dataclass
class Rejection:
    round: int
    client: int
    reason: str


def expected_upload(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int, message: State,
                    server_round: int) -> Schema:
    """Keys, shapes and dtypes an honest client answers `message` of `server_round` with.

    Found by running the client-side code on the server's copy of the model, so it
    follows every algorithm without knowing which one runs."""
    ctx = load_client(bundle, algorithm, cfg, client_id, {}, message, server_round)
    upload = algorithm.upload(bundle.model, bundle.shared_keys, ctx)
    schema = {k: (tuple(v.shape), v.dtype) for k, v in upload.items()}
    schema.update(algorithm.report_schema(bundle.model))
    return schema


def schema_problem(schema: Schema, upload: State) -> str | None:
    """Why an upload does not have the expected form, or None if it does."""
    missing = sorted(set(schema) - set(upload))
    extra = sorted(set(upload) - set(schema))
    if missing:
        return f"{len(missing)} expected tensor(s) missing, e.g. {missing[0]!r}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}"
    for key, (shape, dtype) in schema.items():
        value = upload[key]
        if tuple(value.shape) != shape:
            return f"{key!r} has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype != dtype:
            return f"{key!r} has dtype {value.dtype}, expected {dtype}"
    for key, value in upload.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            return f"{key!r} has {bad} NaN or Inf value(s)"
    return None


def update_norm(upload: State, sent: State, keys) -> float:
    """L2 norm of the change a client made: to what it was sent, or to zero for new tensors."""
    total = 0.0
    for key in keys:
        value = upload[key].double()
        if key in sent and sent[key].shape == value.shape:
            value = value - sent[key].double()
        total += float(value.pow(2).sum())
    return total ** 0.5


def norm_outliers(norms: dict[int, float], ratio: float) -> dict[int, str]:
    """Clients whose update norm exceeds `ratio` times the round's median (needs 3 or more)."""
    if ratio <= 0 or len(norms) < 3:
        return {}
    median = float(torch.tensor(list(norms.values()), dtype=torch.float64).median())
    limit = ratio * max(median, 1e-12)
    return {c: f"update norm {n:.4g} exceeds {ratio:g} x the round's median {median:.4g}"
            for c, n in norms.items() if n > limit}
