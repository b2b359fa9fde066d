"""`fedlrm-clientapp`: Flower's own `flwr-clientapp` entry point, without the SuperNode's CLI.

Flower 1.41 starts a `flwr-clientapp` process for every message a SuperNode receives. Its
console script imports the package `flwr.supernode.cli`, whose `__init__` also imports the
SuperNode's command (SQLAlchemy, Alembic, its object store), code a ClientApp never runs: on
this project's 2-core machine `flwr-clientapp --help` took 1.75-1.93 s of CPU and this
launcher 1.22-1.28 s, ten times a round on a host with ten SuperNodes. This launcher loads Flower's
`flwr/supernode/cli/flwr_clientapp.py` by its file, so the package `__init__` does not run,
and calls its `flwr_clientapp()`: the same arguments, token and `run_clientapp`, Flower's
code unchanged. If that file is not where flwr 1.41 keeps it, it runs Flower's entry point.

A SuperNode's SuperExec starts the program named `flwr-clientapp` on its PATH. To use this
one, link the console script `fedlrm-clientapp` under that name in a folder ahead on the
SuperNode's PATH (`LocalDeployment` does it for its SuperNodes with `link_as_flwr_clientapp`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

FLOWER_NAME = "flwr-clientapp"


def _flower_entry_file() -> Path | None:
    spec = importlib.util.find_spec("flwr.supernode")  # imports `flwr`, which the ClientApp needs anyway
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "cli" / "flwr_clientapp.py"
    return path if path.is_file() else None


def main() -> None:
    path = _flower_entry_file()
    if path is None:
        from flwr.supernode.cli import flwr_clientapp  # Flower moved its file: its own (slower) entry

        flwr_clientapp()
        return
    spec = importlib.util.spec_from_file_location("fedlrm_flower_clientapp_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.flwr_clientapp()


def link_as_flwr_clientapp(folder: str | os.PathLike[str]) -> Path:
    """Make `folder/flwr-clientapp` start this launcher (a small script for the running
    interpreter); put `folder` first on a SuperNode's PATH. Returns the script's path."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / FLOWER_NAME
    text = f"#!{sys.executable}\nfrom fedlrm.federation.flower.launcher import main\nmain()\n"
    temporary = script.with_name(f".{FLOWER_NAME}.{os.getpid()}")
    temporary.write_text(text)
    temporary.chmod(0o755)
    os.replace(temporary, script)  # a SuperExec starting it meanwhile sees the old or the new whole
    return script


if __name__ == "__main__":
    main()
