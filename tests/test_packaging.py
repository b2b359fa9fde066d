"""A wheel has everything: the shipped configs, the Flower app, the built-in model and data.

The wheel is built from a copy of the sources (so nothing stale in build/ can hide a missing
file) and installed, without its dependencies, into a venv that sees this machine's packages;
the commands then run from the installed copy, in a folder far from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    return next(out.glob("fedlrm-*.whl"))


def test_the_wheel_holds_configs_flower_app_model_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("fedlrm/configs/paper/cifar10.yaml", "fedlrm/configs/paper/caltech101.yaml",
                   "fedlrm/federation/flower/app/pyproject.toml",
                   "fedlrm/federation/flower/server_app.py", "fedlrm/federation/flower/client_app.py",
                   "fedlrm/assets/tiny-clip/config.json", "fedlrm/assets/tiny-clip/trained.safetensors",
                   "fedlrm/assets/cifar10-subset/train.parquet", "fedlrm/assets/cifar10-subset/test.parquet"):
        assert needed in names, f"{needed} is missing from {wheel.name}"


def test_an_installed_wheel_runs_every_command_from_its_own_files(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}

    def fedlrm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([bin_dir / "fedlrm", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    where = subprocess.run([bin_dir / "python", "-c", "import fedlrm; print(fedlrm.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where, f"the venv imports fedlrm from {where}, not from the wheel"

    listed = fedlrm("configs")
    assert listed.returncode == 0 and "paper/cifar10" in listed.stdout and "paper/caltech101" in listed.stdout

    # found by name, and its dataset paths follow the environment variable it names
    shown = subprocess.run([bin_dir / "fedlrm", "config", "--config", "paper/cifar10"], cwd=work,
                           env={**env, "FEDLRM_DATASETS": "/data/sets"}, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "train: /data/sets/cifar10-train.parquet" in shown.stdout and "clip-vit-base-patch16" in shown.stdout
    unset = fedlrm("config", "--config", "paper/cifar10")
    assert unset.returncode == 2 and "FEDLRM_DATASETS" in unset.stderr

    app = fedlrm("flower-app", "app")
    assert app.returncode == 0, app.stderr
    assert "serverapp" in (work / "app" / "pyproject.toml").read_text()

    # the built-in model and data come from the installed package
    run = fedlrm("run", "--no-progress", "algorithm=zeroshot", "data.num_clients=2", "data.test_per_client=10",
                 "data.global_test_size=20", "name=wheel")
    assert run.returncode == 0, run.stderr
    assert (work / "runs" / "wheel" / "summary.json").is_file()


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    from fedlrm.algorithms import load_config

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text("output_dir: ../runs\ndata:\n  source: parquet\n  train: ../data/train.parquet\n"
                                      "  test: /abs/test.parquet\nmodel:\n  name: openai/clip-vit-base-patch16\n")
    monkeypatch.chdir(tmp_path)  # somewhere else: the file's own folder decides
    cfg = load_config(folder / "mine.yaml", ["data.root=cache"])
    assert cfg.data.train == str(tmp_path / "project" / "data" / "train.parquet")
    assert cfg.data.test == "/abs/test.parquet"
    assert cfg.output_dir == str(tmp_path / "project" / "runs")
    assert cfg.model.name == "openai/clip-vit-base-patch16"  # a hub id, not a path
    assert cfg.data.root == "cache"  # an override is the command line's: relative to where it is typed
