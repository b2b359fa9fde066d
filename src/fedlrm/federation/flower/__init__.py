"""The Flower runtime: fedlrm's federation as a Flower app (ServerApp and ClientApp).

The app folder (a `pyproject.toml` naming the components and the run config) ships inside
the package, so a wheel install can run `fedlrm flower`; `write_app` copies it out for
users who run `flwr run` themselves.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from fedlrm.errors import FedLRMError


def app_source() -> Path:
    """The Flower app folder inside the installed package."""
    folder = Path(str(resources.files("fedlrm.federation.flower") / "app"))
    if not (folder / "pyproject.toml").is_file():
        raise FedLRMError(f"the Flower app is missing from the installation ({folder}); reinstall fedlrm")
    return folder


def write_app(dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the Flower app folder to `dest` (created); refuses to replace another folder's
    pyproject.toml unless `overwrite`."""
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise FedLRMError(f"{dest} exists and is not a folder; give a folder for the Flower app")
    target = dest / "pyproject.toml"
    if target.exists() and not overwrite:
        raise FedLRMError(f"{target} exists already; choose another folder or pass --force to replace it")
    source = app_source()
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    return dest
