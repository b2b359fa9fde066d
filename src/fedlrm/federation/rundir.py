"""Run directories: a fresh one per run, and the configuration it was run with."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from fedlrm.config import RunConfig, absolute_paths, to_yaml
from fedlrm.errors import FedLRMError


def run_dir_path(cfg: RunConfig, suffix: str = "") -> Path:
    """Where the run directory of `cfg` goes (a timestamped name when `name` is not set)."""
    name = cfg.name or f"{cfg.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.output_dir).expanduser() / (name + suffix)


def check_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    """Refuse, without creating anything, a run directory that could not be made: one that exists
    and is not empty, or an output_dir under a file or in a folder this user cannot write."""
    path = run_dir_path(cfg, suffix)
    if path.exists():
        if not path.is_dir():
            raise FedLRMError(f"the run directory {path} is a file; choose another name= or output_dir=")
        if any(path.iterdir()):
            raise FedLRMError(f"run directory {path} exists and is not empty; choose another name= or "
                              f"continue it with `fedlrm run --resume {path}`")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FedLRMError(f"output_dir={cfg.output_dir!r} cannot hold run directories: {existing} is a file, "
                          f"not a folder; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FedLRMError(f"output_dir={cfg.output_dir!r} cannot hold run directories: this user cannot write "
                          f"in {existing}; choose another output_dir")
    return path


def new_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    """A fresh, empty run directory under cfg.output_dir."""
    path = check_run_dir(cfg, suffix)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a full disk, or a path that appeared since the check
        raise FedLRMError(f"cannot create the run directory {path} (output_dir={cfg.output_dir!r}): "
                          f"{err.strerror or err}; choose another output_dir") from None
    return path


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    # Local paths absolute: the file is read again from the run directory (resume), where a
    # relative path would resolve against that folder, not where the run was started.
    (run_dir / "config.yaml").write_text(to_yaml(absolute_paths(cfg)))
