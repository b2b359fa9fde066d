"""Client-level differential privacy on what a client uploads: clipping plus Gaussian noise.

The client bounds the change it uploads (upload minus what it received; a tensor it was
not sent counts whole) to an L2 norm `clip` over all tensors together, then adds
N(0, (noise_multiplier * clip)^2) to every value before anything leaves it. The noise
is added on the client, so the guarantee holds against the server too (local DP), and it
is drawn from the operating system's entropy, not from the run seed that the server
knows: a DP run is therefore not bit-reproducible, by design.

Why not Flower's DP mods: they assume the reply carries the same arrays as the message
(FedAvg's model), which FedLEASE, FedPIA and F3OCUS do not, and they would leave the
in-process runtime without DP. This module serves both runtimes.

Accounting: two datasets of one client can move its clipped change by up to 2 * clip, so
each upload is a Gaussian mechanism with noise multiplier z / 2 relative to that
sensitivity. Its Renyi DP is 2 * alpha / z^2 per round; composed over every round the
client may train in and converted to (epsilon, delta) with the standard RDP bound. No
amplification by client sampling is claimed, so the figure is an upper bound.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import torch

from fedlrm.algorithms import State
from fedlrm.config import PrivacyConfig
from fedlrm.federation.updates import change, norm

ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def enabled(cfg: PrivacyConfig) -> bool:
    return cfg.clip > 0


def privatize(upload: State, received: State, cfg: PrivacyConfig, generator: torch.Generator | None = None) -> State:
    """The upload a client sends under DP: its change clipped to `cfg.clip`, plus noise."""
    deltas = change(upload, received, [k for k, v in upload.items() if v.is_floating_point()])
    size = norm(deltas)
    scale = min(1.0, cfg.clip / size) if size > 0 else 1.0
    generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
    sigma = cfg.noise_multiplier * cfg.clip
    out = dict(upload)
    for k, delta in deltas.items():
        noisy = delta * scale
        if sigma > 0:
            noisy = noisy + sigma * torch.randn(delta.shape, generator=generator, dtype=torch.float64)
        base = received.get(k)
        if base is not None and base.shape == delta.shape:
            noisy = noisy + base.double()
        out[k] = noisy.to(upload[k].dtype)
    return out


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` local Gaussian releases of a change clipped to C, noise z*C."""
    if noise_multiplier <= 0:
        return math.inf
    rdp_per_alpha = [rounds * 2.0 * a / noise_multiplier ** 2 for a in ALPHAS]
    return min(r + math.log(1 / delta) / (a - 1) for r, a in zip(rdp_per_alpha, ALPHAS))


def write_privacy_report(run_dir: Path, cfg: PrivacyConfig, rounds: int) -> dict:
    report = {
        "mechanism": "client-side clipping of the uploaded change + Gaussian noise (local, client-level DP)",
        "clip": cfg.clip,
        "noise_multiplier": cfg.noise_multiplier,
        "noise_std": cfg.noise_multiplier * cfg.clip,
        "sensitivity": 2 * cfg.clip,
        "rounds_accounted": rounds,
        "delta": cfg.delta,
        "epsilon": epsilon(cfg.noise_multiplier, rounds, cfg.delta),
        "accountant": "Renyi DP of the Gaussian mechanism, composed over rounds, no sampling amplification",
        "unit": "one client's whole dataset",
    }
    (run_dir / "privacy.json").write_text(json.dumps(report, indent=2))
    return report
