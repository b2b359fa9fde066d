"""The federation on Flower's Simulation Runtime: the same ServerApp and ClientApp, `flwr run` on a
SuperLink in simulation mode, virtual SuperNodes served by Ray actors on 127.0.0.1.

Every process the test starts (SuperLink, SuperExec, flwr-simulation and Ray's) is ended by the
deployment's context manager, and checked to be gone.
"""

from __future__ import annotations

import json

import pytest

from fedlrm.algorithms import load_config
from fedlrm.cli import main
from fedlrm.experiment import run_experiment
from fedlrm.federation.flower import app_source
from fedlrm.tools.deployment import LocalDeployment, pid_alive

pytestmark = pytest.mark.flower
ray = pytest.importorskip("ray", reason="the Simulation Runtime needs Ray: pip install 'fedlrm[simulation]'")
APP = app_source()
NODES = 3
# A ClientApp runs one torch thread; the in-process run it is compared with must too, since the
# thread count changes the order of float sums (results then differ by ~1e-5, not 0)
SAME_THREADS = ["train.threads=1"]


def test_the_simulation_runtime_equals_in_process_and_keeps_each_client_apart(tiny_overrides, tmp_path):
    overrides = tiny_overrides + SAME_THREADS + ["algorithm=fedlrm", "train.rounds=2", f"output_dir={tmp_path / 'runs'}"]
    started = []
    backend = {"client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0}
    with LocalDeployment(tmp_path / "fl", NODES, simulation=backend) as dep:
        result = dep.run(APP, {"overrides": " ".join(overrides + ["name=simulated"]), "node-wait-timeout": 90.0,
                               "client-state-dir": str(tmp_path / "clients")}, timeout=900)
        started += dep.spawned_pids()
        assert result.ok, result.logs[-4000:]
    alive = [p for p in started if pid_alive(p)]
    assert not alive, f"processes still alive after the deployment closed: {alive}"

    simulated = json.loads((tmp_path / "runs" / "simulated" / "summary.json").read_text())
    local = run_experiment(load_config(None, overrides + ["name=in-process"]), progress=False).summary
    assert simulated["per_client_accuracy"].keys() == {str(c) for c in range(NODES)}
    for c, acc in local["per_client_accuracy"].items():
        assert simulated["per_client_accuracy"][str(c)] == pytest.approx(acc, abs=1e-6)
    assert simulated["global_accuracy"] == pytest.approx(local["global_accuracy"], abs=1e-6)
    # each virtual SuperNode kept its private state and exported its model in its own folder
    for c in range(NODES):
        folder = tmp_path / "clients" / f"partition-{c}"
        assert list(folder.glob("runs/*/client*/private-round*.safetensors")), f"client {c} kept no private state"
        assert list(folder.glob("runs/*/adapters/*")), f"client {c} exported no model"


def test_fedlrm_flower_runtime_simulation_runs_in_one_command(tiny_overrides, tmp_path, capsys):
    code = main(["flower", "--runtime", "simulation", "--work-dir", str(tmp_path / "work"), *tiny_overrides,
                 "algorithm=fedavg", "train.rounds=1", f"output_dir={tmp_path / 'runs'}", "name=one-command"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "Simulation Runtime" in out and (tmp_path / "runs" / "one-command" / "summary.json").is_file()


def test_bad_simulation_settings_are_refused_before_anything_starts(tiny_overrides, tmp_path, capsys):
    code = main(["flower", "--runtime", "simulation", "--client-cpus", "0", "--work-dir", str(tmp_path / "work"),
                 *tiny_overrides])
    assert code == 2 and "--client-cpus must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
