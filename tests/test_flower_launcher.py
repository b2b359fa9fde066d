"""`fedlrm-clientapp`: Flower's ClientApp entry point without the SuperNode's CLI imports."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from fedlrm.federation.flower.launcher import link_as_flwr_clientapp
from fedlrm.tools.deployment import LocalDeployment


def test_the_launcher_runs_flowers_own_clientapp_command_without_the_supernode_cli():
    code = ("import sys\n"
            "sys.argv = ['flwr-clientapp', '--help']\n"
            "from fedlrm.federation.flower.launcher import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as done:\n"
            "    assert done.code in (0, None), done.code\n"
            "print('LOADED', sorted(m for m in ('flwr.supernode.cli', 'sqlalchemy', 'alembic') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--runtime-api-address" in out  # Flower's own argument parser answered
    assert out.strip().endswith("LOADED []")


def test_the_console_script_is_installed_and_answers_as_flwr_clientapp():
    script = shutil.which("fedlrm-clientapp") or str(Path(sys.executable).parent / "fedlrm-clientapp")
    assert Path(script).is_file(), "pip install -e . installs the fedlrm-clientapp console script"
    flower = subprocess.run([str(Path(sys.executable).parent / "flwr-clientapp"), "--help"], capture_output=True,
                            text=True, check=True).stdout
    ours = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    options = lambda usage: sorted(set(re.findall(r"--[a-z-]+", usage)))  # noqa: E731
    assert options(ours) == options(flower) and "--token" in options(ours)  # Flower's parser: the same options


def test_a_linked_flwr_clientapp_is_an_executable_script_for_this_interpreter(tmp_path):
    script = link_as_flwr_clientapp(tmp_path / "bin")
    assert script == tmp_path / "bin" / "flwr-clientapp"
    assert script.stat().st_mode & stat.S_IXUSR
    assert script.read_text().splitlines()[0] == f"#!{sys.executable}"
    assert link_as_flwr_clientapp(tmp_path / "bin") == script  # linking again replaces it whole
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["flwr-clientapp"]
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--runtime-api-address" in out


def test_only_the_supernodes_find_the_lean_clientapp_first_on_their_path(tmp_path):
    deployment = LocalDeployment(tmp_path / "fl", 2)
    assert deployment.clientapp_bin == (tmp_path / "fl" / "bin").resolve()
    first = lambda component: deployment._env(component, tmp_path / "home")["PATH"].split(os.pathsep)[0]  # noqa: E731
    assert first("supernode-0") == str(deployment.clientapp_bin)
    assert first("superlink") == str(Path(sys.executable).parent)
    assert LocalDeployment(tmp_path / "f2", 2, lean_clientapp=False).clientapp_bin is None
    assert LocalDeployment(tmp_path / "f3", 2, simulation={}).clientapp_bin is None  # no SuperNode processes
