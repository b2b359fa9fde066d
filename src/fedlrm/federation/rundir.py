"""Run directories: a fresh one per run, and the configuration it was run with."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from fedlrm.config import RunConfig, absolute_paths, to_dict, to_yaml
from fedlrm.errors import ConfigError, FedLRMError


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


def read_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run directory was started with, read strictly for a resume: a file that
    does not parse, or lacks a key the run had, is refused rather than filled with defaults (which
    would resume another run into this one's checkpoint)."""
    from omegaconf import OmegaConf

    from fedlrm.algorithms import load_config  # the algorithms' sections; they import this package

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FedLRMError(f"{run_dir} is not a run directory (it has no config.yaml); give the folder a run was "
                          f"started in, which holds its config.yaml and checkpoint/")
    hint = (f"put back the config.yaml {run_dir} was started with (its checkpoint/manifest.json keeps that "
            f"configuration under \"config\")")
    try:
        cfg = load_config(path)
        written = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except ConfigError as err:
        cut = _without_empty_sections(path)  # a file cut right after a section's name: report what it lacks
        if cut is None:
            raise ConfigError(f"{err}; this is the configuration of the run in {run_dir}: {hint}") from None
        cfg, written = cut
    have = config_leaves(written if isinstance(written, dict) else {})
    missing = [k for k in config_leaves(to_dict(cfg)) if k not in have]
    if not have:
        raise ConfigError(f"{path} is empty, and a resumed run must not take defaults for its settings; {hint}")
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} of the run's settings (e.g. {', '.join(missing[:3])}): it is "
                          f"cut short or was edited, and a resumed run must not take defaults for them; {hint}")
    return cfg


def config_leaves(tree: dict, prefix: str = "") -> dict:
    """A configuration tree (as `to_dict` gives it) flat: dotted key -> value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(config_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _without_empty_sections(path: Path):
    """(config, written) of a config file whose empty sections (`data:` with nothing under it, as a
    file cut short leaves) are dropped, or None if the file has none or still does not load."""
    import tempfile

    from omegaconf import OmegaConf

    from fedlrm.algorithms import load_config

    try:
        written = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - not YAML: the loader's own message says so
        return None
    if not isinstance(written, dict) or all(v is not None for v in written.values()):
        return None
    kept = {k: v for k, v in written.items() if v is not None}
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_text(OmegaConf.to_yaml(OmegaConf.create(kept)))
        try:
            return load_config(copy), kept
        except ConfigError:
            return None
