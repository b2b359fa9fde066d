"""Run directories: a fresh one per run, and the configuration it was run with."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fedlrm.config import RunConfig, absolute_paths, to_yaml
from fedlrm.errors import FedLRMError


def new_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    """A fresh, empty run directory under cfg.output_dir."""
    name = cfg.name or f"{cfg.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(cfg.output_dir).expanduser() / (name + suffix)
    if path.exists() and any(path.iterdir()):
        raise FedLRMError(f"run directory {path} exists and is not empty; choose another name= or "
                          f"continue it with `fedlrm run --resume {path}`")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    # Local paths absolute: the file is read again from the run directory (resume), where a
    # relative path would resolve against that folder, not where the run was started.
    (run_dir / "config.yaml").write_text(to_yaml(absolute_paths(cfg)))
