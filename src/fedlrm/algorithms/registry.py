"""The algorithms a run can name, and the run configuration that knows their settings.

An algorithm registers itself with `@register` on its class; the built-in ones are found
by importing every module of this package (`fedlrm.algorithms` does so on import), so a new
algorithm is one new module and no edit elsewhere. Registering also makes its `Settings` a
config section named after it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from fedlrm import config as shared
from fedlrm.algorithms.base import Algorithm
from fedlrm.config import RunConfig
from fedlrm.errors import ConfigError
from fedlrm.seeding import clients_per_round

#: name -> class, in the order `fedlrm compare` runs them
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Make an algorithm available by its `name` (use as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier (it names the config section), got {name!r}")
    if name in shared.SHARED_KEYS:
        raise TypeError(f"algorithm name {name!r} is taken by a shared config key")
    if not dataclasses.is_dataclass(cls.Settings):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass")
    if name in ALGORITHMS and ALGORITHMS[name] is not cls:
        raise TypeError(f"two algorithms are called {name!r}: {ALGORITHMS[name].__qualname__} and {cls.__qualname__}")
    ALGORITHMS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget an algorithm (for tests that register one of their own)."""
    ALGORITHMS.pop(name, None)


def sections() -> dict[str, type]:
    return {name: cls.Settings for name, cls in ALGORITHMS.items()}


def moved_keys() -> dict[str, list[str]]:
    moved: dict[str, list[str]] = {}
    for name, cls in ALGORITHMS.items():
        for old, own in cls.moved_keys.items():
            moved.setdefault(old, []).append(f"{name}.{own}")
    return moved


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The built-in defaults, updated by a YAML file, then by `dotted.key=value` overrides, with
    every registered algorithm's own section; checked as a whole."""
    cfg = shared.load(path, overrides, sections(), moved_keys())
    check(cfg)
    return cfg


def config_from_dict(data: Mapping) -> RunConfig:
    """A configuration as `fedlrm.config.to_dict` wrote it (a run's config.yaml, a Flower message)."""
    cfg = shared.from_mapping(data, sections())
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Every value, shared and per method, and how the algorithm that runs fits the rest."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    cfg.check_shared()
    # Checked now, not after round 1 has trained: a round is aggregated only with
    # min_clients valid uploads, and at most the sampled clients upload.
    # rounds sample from the clients that train: the new ones (data.new_clients) join after the last
    training = cfg.data.training_clients
    sampled = clients_per_round(training, cfg.train.client_fraction)
    if cfg.federation.min_clients > sampled:
        held_out = f", less data.new_clients={cfg.data.new_clients}" if cfg.data.new_clients else ""
        raise ConfigError(
            f"federation.min_clients={cfg.federation.min_clients} can never be met: each round samples "
            f"{sampled} client(s) (train.client_fraction={cfg.train.client_fraction} of the {training} "
            f"training clients: {cfg.data.total_clients} in all{held_out}); lower "
            f"federation.min_clients to at most {sampled} or sample more clients")
    check_defences(cfg, sampled)
    export = cfg.report.export_selection()
    if isinstance(export, list) and export[-1] >= cfg.data.total_clients:  # new clients' ids included
        raise ConfigError(f"report.export_adapters names client {export[-1]}, but the run has clients "
                          f"0..{cfg.data.total_clients - 1} (the new ones of data.new_clients included)")
    for name, cls in ALGORITHMS.items():
        cls.check(cfg.methods[name], cfg)
    if cfg.privacy.secagg and not ALGORITHMS[cfg.algorithm].aggregates_by_mean:
        raise ConfigError(f"privacy.secagg gives the server only the weighted mean of the uploads, but "
                          f"{cfg.algorithm} needs each upload; use it with "
                          f"{', '.join(a for a, c in ALGORITHMS.items() if c.aggregates_by_mean and c.trains)}")


def check_defences(cfg: RunConfig, sampled: int) -> None:
    """How the server's defences fit the algorithm and the clients a round samples."""
    fed, method = cfg.federation, ALGORITHMS[cfg.algorithm]
    if fed.aggregator != "mean":
        if not method.aggregates_by_mean:
            raise ConfigError(f"federation.aggregator={fed.aggregator} replaces the mean of the uploads, but "
                              f"{cfg.algorithm} combines them its own way; use it with "
                              f"{', '.join(a for a, c in ALGORITHMS.items() if c.aggregates_by_mean and c.trains)}")
        if cfg.privacy.secagg:
            raise ConfigError(f"federation.aggregator={fed.aggregator} needs each upload, but privacy.secagg "
                              f"gives the server only their mean; drop one of them")
    if fed.aggregator in ("krum", "multikrum") and sampled < 2 * fed.byzantine + 3:
        raise ConfigError(f"federation.aggregator={fed.aggregator} withstands federation.byzantine="
                          f"{fed.byzantine} attacker(s) only among at least {2 * fed.byzantine + 3} clients a "
                          f"round, but each round samples {sampled}; lower federation.byzantine or sample more")
    if fed.aggregator == "multikrum" and fed.multikrum_keep is not None and fed.multikrum_keep > sampled:
        raise ConfigError(f"federation.multikrum_keep={fed.multikrum_keep} is more than the {sampled} client(s) "
                          f"a round samples; keep at most {sampled}")
    if fed.max_weight_share is not None and fed.max_weight_share * sampled < 1 - 1e-9:
        raise ConfigError(f"federation.max_weight_share={fed.max_weight_share} cannot hold: the {sampled} "
                          f"client(s) of a round share the whole weight, so one gets at least 1/{sampled}; "
                          f"use at least {1 / sampled:.3g} or null")


def get_algorithm(cfg: RunConfig) -> Algorithm:
    return ALGORITHMS[cfg.algorithm](cfg)


def compare_entries() -> list[str]:
    """What `fedlrm compare` runs by default: every algorithm, each followed by the variants of its
    own settings it names (`Algorithm.compare_variants`), as `<name>+key=value`."""
    return [entry for name, cls in ALGORITHMS.items()
            for entry in (name, *(f"{name}+{variant}" for variant in cls.compare_variants))]
