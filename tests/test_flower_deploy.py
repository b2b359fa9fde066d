"""Local Flower 1.41 deployment (SuperLink + SuperNodes as real processes) end to end.

Runs the hello-world app in tests/flower_hello on 127.0.0.1 (random free ports):
insecure with 2 SuperNodes, and TLS + SuperNode authentication. Checks that the
ServerApp saw both partition ids and the ClientApp state kept across rounds, and that no
process of the deployment survives the context manager.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.flower

from fedlrm.tools.certs import generate_supernode_keys
from fedlrm.tools.deployment import LocalDeployment, find_free_port
from fedlrm.tools.processes import pid_alive

HELLO = Path(__file__).resolve().parent / "flower_hello"

if shutil.which("flower-superlink") is None and not (Path(sys.executable).parent / "flower-superlink").exists():
    pytest.skip("flwr (flower-superlink) not installed", allow_module_level=True)


def _run_collecting_pids(dep: LocalDeployment, run_config: dict, timeout: float = 120.0):
    """Submit a run and wait for it, recording every process seen meanwhile."""
    seen = set(dep.spawned_pids())
    run_id = dep.submit(HELLO, run_config)
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        seen.update(dep.spawned_pids())  # catches flwr-serverapp / flwr-clientapp
        info = dep.run_info(run_id, via="api")
        if info["status"].startswith("finished"):
            break
        time.sleep(0.3)
    return run_id, info, seen


def _assert_all_dead(pids):
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"processes still alive: {alive}"
    # Cross-check with `ps` (zombies excluded; they are reaped by init).
    out = subprocess.run(["ps", "-eo", "pid=,stat="], check=True, capture_output=True, text=True).stdout
    running = {int(a): b for a, b in (line.split(None, 1) for line in out.splitlines() if line.strip())}
    leftovers = [p for p in pids if p in running and not running[p].startswith("Z")]
    assert not leftovers, f"ps still lists: {leftovers}"


def test_insecure_two_supernodes(tmp_path):
    out = tmp_path / "obs.json"
    with LocalDeployment(tmp_path / "fl", num_supernodes=2, superexec_poll_interval=0.2) as dep:
        assert len(dep.pids) == 3 and all(pid_alive(p) for p in dep.pids.values())
        assert all(dep.node_ids)
        run_id, info, seen = _run_collecting_pids(dep, {"out-path": str(out), "num-rounds": 2})
        logs = dep.logs(run_id)
        assert info["status"] == "finished:completed", (info, logs)
        assert "[hello-server] round 2" in logs  # `flwr log` returns the ServerApp output
        recorded = set(dep.started_pids) | seen
        print("startup", dep.timings, "processes seen", len(recorded))
    _assert_all_dead(recorded)
    assert len(recorded) > 3  # SuperExecs + ServerApp/ClientApps were tracked too

    obs = json.loads(out.read_text())
    assert sorted(obs["node_ids"]) == sorted(dep.node_ids)
    assert len(obs["rounds"]) == 2
    for rnd in obs["rounds"]:
        replies = rnd["replies"]
        assert not [r for r in replies if "error_code" in r], replies
        assert sorted(r["partition_id"] for r in replies) == [0, 1]
        # context.state persisted on each SuperNode: counter == round number
        assert all(r["count"] == rnd["round"] for r in replies), replies
        for r in replies:
            assert r["array"] == [rnd["round"] + r["partition_id"]] * 3


def test_tls_and_supernode_auth(tmp_path):
    out = tmp_path / "obs.json"
    with LocalDeployment(tmp_path / "fl", num_supernodes=2, tls=True, auth=True,
                         superexec_poll_interval=0.2) as dep:
        assert dep.tls_paths is not None and all(k is not None for k in dep.auth_keys)
        registered = list(dep.node_ids)
        run_id, info, seen = _run_collecting_pids(dep, {"out-path": str(out), "num-rounds": 1})
        assert info["status"] == "finished:completed", (info, dep.logs(run_id))

        # Auth is enforced: a SuperNode with an unregistered key is refused.
        keys = generate_supernode_keys(tmp_path / "rogue", "rogue")
        log = tmp_path / "rogue.log"
        with open(log, "wb") as f:
            rogue = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", dep.address,
                 "--root-certificates", str(dep.tls_paths.ca_cert), "--port", str(find_free_port()),
                 "--auth-supernode-private-key", str(keys.private_key)],
                env=dep.component_env("rogue", tmp_path / "rogue" / "home"),
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = rogue.wait(timeout=30)
        finally:
            if rogue.poll() is None:
                rogue.kill()
                rogue.wait()
        assert rc != 0 and "Failed to activate SuperNode" in log.read_text(), log.read_text()
        recorded = set(dep.started_pids) | seen | {rogue.pid}
    _assert_all_dead(recorded)

    obs = json.loads(out.read_text())
    assert sorted(obs["node_ids"]) == sorted(registered)  # ids from `flwr supernode register`
    (rnd,) = obs["rounds"]
    assert sorted(r["partition_id"] for r in rnd["replies"]) == [0, 1]
    assert all(r["count"] == 1 for r in rnd["replies"])
