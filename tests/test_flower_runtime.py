"""The federation on Flower's deployment runtime: a SuperLink and SuperNodes on 127.0.0.1.

Each test starts its own deployment and, through the context manager, ends every process
it started by its PID, also when the test fails; each then checks no PID is left alive.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from fedlrm.algorithms import load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.flower import app_source
from fedlrm.tools.deployment import LocalDeployment, pid_alive

pytestmark = pytest.mark.flower
APP = app_source()  # the Flower app folder shipped in the package
NODES = 3
# A ClientApp runs one torch thread; the in-process run it is compared with must too, since the
# thread count changes the order of float sums (results then differ by ~1e-5, not 0)
SAME_THREADS = ["train.threads=1"]


def node_configs(tmp_path, n=NODES):
    return [{"partition-id": i, "num-partitions": n, "state-dir": str(tmp_path / f"node{i}")} for i in range(n)]


def flower_run_config(overrides: list[str], **extra) -> dict:
    return {"overrides": " ".join(overrides), "node-wait-timeout": 90.0, **extra}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "messages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_same_state(run_dir: Path, expected: dict) -> None:
    """The server state a Flower run ended with equals the in-process one (float tolerance)."""
    from safetensors.torch import load_file

    got = load_file(run_dir / "checkpoint" / "global.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert (got[key].double() - value.double()).abs().max().item() <= 1e-5, key


def assert_all_ended(pids):
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"processes still alive after the deployment closed: {alive}"


def test_flower_with_tls_and_auth_equals_in_process_and_keeps_local_experts_home(tiny_overrides, tiny_dataset,
                                                                                 tmp_path):
    overrides = tiny_overrides + SAME_THREADS + ["algorithm=fedlrm", "train.rounds=2", f"output_dir={tmp_path / 'runs'}"]
    started = []
    with LocalDeployment(tmp_path / "fl", NODES, node_configs(tmp_path), tls=True, auth=True) as dep:
        started += dep.spawned_pids()
        with pytest.raises(Exception):  # the SuperLink speaks TLS only
            urllib.request.urlopen(f"http://{dep.address}/", timeout=5)
        result = dep.run(APP, flower_run_config(overrides + ["name=flower"]), timeout=900)
        started += dep.spawned_pids()
        assert result.ok, result.logs[-4000:]
    assert_all_ended(started)  # the SuperNodes' workers too
    for i in range(NODES):  # each SuperNode's ClientApps handed their work to one worker, for the whole run
        log = (tmp_path / f"node{i}" / "worker.log").read_text()
        assert sum(line.startswith("worker ") for line in log.splitlines()) == 1 and "Traceback" not in log

    flower = json.loads((tmp_path / "runs" / "flower" / "summary.json").read_text())
    in_process = run_experiment(load_config(None, overrides + ["name=in-process"]), progress=False)
    local = in_process.summary
    assert_same_state(tmp_path / "runs" / "flower", in_process.server_state.weights)
    assert flower["per_client_accuracy"].keys() == {str(c) for c in range(NODES)}
    for c, acc in local["per_client_accuracy"].items():
        assert flower["per_client_accuracy"][str(c)] == pytest.approx(acc, abs=1e-6)
    assert flower["global_accuracy"] == pytest.approx(local["global_accuracy"], abs=1e-6)

    # round 1's evaluation travelled with round 2's training (one ClientApp process per client and
    # round) and gave the rows an evaluation right after round 1 gives
    flower_rows = {(int(r["round"]), int(r["client"])): float(r["accuracy"])
                   for r in csv_rows(tmp_path / "runs" / "flower" / "metrics.csv")}
    local_rows = {(r["round"], r["client"]): r["accuracy"] for r in in_process.client_rows}
    assert flower_rows.keys() == local_rows.keys() and {r for r, _ in flower_rows} == {1, 2}
    for key, acc in local_rows.items():
        assert flower_rows[key] == pytest.approx(acc, abs=1e-6), key
    crossed = records(tmp_path / "runs" / "flower")
    assert {(r["kind"], r["direction"]) for r in crossed} == {(k, d) for k in ("train", "evaluate") for d in ("up", "down")}
    assert {r["round"] for r in crossed if r["kind"] == "evaluate"} == {2}
    assert all(r.get("evaluates_round") == 1 for r in crossed if (r["round"], r["kind"], r["direction"]) ==
               (2, "train", "down"))
    for r in crossed:
        for key, shape in r["tensors"].items():
            assert ".experts.global." in key, f"{key} crossed the network ({r['kind']} {r['direction']})"
            assert len(shape) == 2 and min(shape) <= 4, f"{key} of shape {shape} is not a rank-4 LoRA factor"
    uploads = [r for r in crossed if r["direction"] == "up" and r["kind"] == "train"]
    assert len(uploads) == 2 * NODES and all(r["bytes"] > 0 for r in uploads)

    # a user's own new client joins the Flower run from its final server state (the run holds no client states)
    from fedlrm.federation.newcomers import personalize_run

    out, joined = personalize_run(tmp_path / "runs" / "flower", Path(tiny_dataset["train"]).parent, epochs=1,
                                  out=tmp_path / "newcomer")
    assert (out / "result.json").is_file() and 0 <= joined["accuracy"] <= 1 and joined["round"] == 2


def test_crashed_and_frozen_clients_are_left_out_and_rejoin_with_the_current_state(tiny_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "faults"
    # two rounds after the one the faults hit: a restarted SuperNode's first ClientApp may still miss the
    # round it comes back in on a loaded machine, but not the next
    overrides = tiny_overrides + SAME_THREADS + ["algorithm=fedavg", "train.rounds=5", f"output_dir={tmp_path / 'runs'}",
                                  "name=faults", "federation.min_clients=1", "federation.round_timeout=40"]
    started = []
    with LocalDeployment(tmp_path / "fl", NODES, node_configs(tmp_path)) as dep:
        started += dep.spawned_pids()
        run_id = dep.submit(APP, flower_run_config(overrides))
        # After round 1's training: client 1 crashes, client 2 hangs (it will miss the time limit).
        wait_until(lambda: sum(r["direction"] == "up" and r["round"] == 1 for r in records(run_dir)) >= NODES,
                   300, "round 1 uploads")
        dep.kill_supernode(1)
        dep.signal_supernode(2, signal.SIGSTOP)
        wait_until(lambda: any(r["round"] == 2 and r["kind"] == "train" for r in records(run_dir)), 300,
                   "round 2 to end without the two clients")
        started += dep.spawned_pids()
        dep.start_supernode(1)  # rejoins
        dep.restart_supernode(2)  # the hung one is killed and comes back
        started += dep.spawned_pids()
        info = dep.wait(run_id, timeout=900)
        logs = dep.logs(run_id)
        assert str(info["status"]) == "finished:completed", logs[-4000:]
    assert_all_ended(started)

    rounds = {int(r["round"]): r for r in csv_rows(run_dir / "rounds.csv")}
    assert rounds[2]["clients_answered"] == "1"
    assert rounds[5]["clients_answered"] == str(NODES)
    assert "did not train in time" in logs
    crossed = records(run_dir)
    for client in (1, 2):
        last = max(r["round"] for r in crossed if r["client"] == client and r["direction"] == "up"
                   and r["kind"] == "train")
        down = next(r for r in crossed if (r["round"], r["client"], r["kind"], r["direction"]) ==
                    (last, client, "train", "down"))
        up = next(r for r in crossed if (r["round"], r["client"], r["kind"], r["direction"]) ==
                  (last, client, "train", "up"))
        assert last >= 3 and up["info"]["received_digest"] == down["digest"]
        others = [r["digest"] for r in crossed if (r["round"], r["kind"], r["direction"]) == (last, "train", "down")]
        assert len(set(others)) == 1  # every client of the round got the same, current, global state


def test_a_killed_server_resumes_from_its_checkpoint_to_the_uninterrupted_result(tiny_overrides, tmp_path):
    run_dir = tmp_path / "runs" / "resumed"
    overrides = tiny_overrides + SAME_THREADS + ["algorithm=fedlrm", "train.rounds=3", f"output_dir={tmp_path / 'runs'}"]
    started = []
    with LocalDeployment(tmp_path / "fl", NODES, node_configs(tmp_path)) as dep:
        started += dep.spawned_pids()
        run_id = dep.submit(APP, flower_run_config(overrides + ["name=resumed"]))
        wait_until(lambda: (run_dir / "checkpoint" / "state.json").is_file(), 600, "the first checkpoint")
        started += dep.spawned_pids()
        assert dep.kill_serverapp(), "no ServerApp process found"
        # Flower would mark the orphaned run failed after two missed 30-s heartbeats; the
        # operator's `flwr stop` ends it at once
        dep.stop_run(run_id)
        killed = dep.wait(run_id, timeout=120)
        assert str(killed["status"]).startswith("finished") and not str(killed["status"]).endswith("completed")
        done = json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
        assert done < 3
        result = dep.run(APP, {"resume": str(run_dir), "node-wait-timeout": 90.0}, timeout=900)
        started += dep.spawned_pids()
        assert result.ok, result.logs[-4000:]
    assert_all_ended(started)
    resumed = json.loads((run_dir / "summary.json").read_text())
    uninterrupted = run_experiment(load_config(None, overrides + ["name=uninterrupted"]), progress=False)
    local = uninterrupted.summary
    assert_same_state(run_dir, uninterrupted.server_state.weights)
    for c, acc in local["per_client_accuracy"].items():
        assert resumed["per_client_accuracy"][str(c)] == pytest.approx(acc, abs=1e-6)


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))



def test_secure_aggregation_gives_the_server_only_the_mean_and_matches_plain_averaging(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    overrides = tiny_overrides + SAME_THREADS + ["algorithm=fedavg", "train.rounds=2", f"output_dir={tmp_path / 'runs'}"]
    started = []
    with LocalDeployment(tmp_path / "fl", NODES, node_configs(tmp_path)) as dep:
        started += dep.spawned_pids()
        # max_weight bounds a client's examples (8 here): a loose bound (default 1000) shrinks each
        # weighted upload towards SecAgg+'s quantisation step and the error grows with training.
        result = dep.run(APP, flower_run_config(overrides + ["name=secagg", "privacy.secagg=true",
                                                             "privacy.secagg_max_weight=10"]), timeout=900)
        started += dep.spawned_pids()
        assert result.ok, result.logs[-4000:]
    assert_all_ended(started)
    run_dir = tmp_path / "runs" / "secagg"
    crossed = records(run_dir)
    assert {r["kind"] for r in crossed} == {"secure-train", "evaluate"}
    ups = [r for r in crossed if r["kind"] == "secure-train" and r["direction"] == "up"]
    assert [r["contributors"] for r in ups] == [NODES, NODES] and all("client" not in r for r in ups)
    plain = run_experiment(load_config(None, overrides + ["name=plain"]), progress=False)
    secure = load_file(run_dir / "checkpoint" / "global.safetensors")
    assert secure.keys() == plain.server_state.weights.keys()
    for key, value in plain.server_state.weights.items():  # SecAgg+ quantises: equal up to its resolution
        assert (secure[key] - value).abs().max().item() < 1e-3, key


def test_secure_aggregation_is_refused_where_it_cannot_work(tiny_overrides):
    from fedlrm.errors import ConfigError

    with pytest.raises(ConfigError, match="needs each upload"):
        load_config(None, tiny_overrides + ["algorithm=fedpia", "privacy.secagg=true"])
    with pytest.raises(ConfigError, match="needs the Flower runtime"):
        run_experiment(load_config(None, tiny_overrides + ["algorithm=fedavg", "privacy.secagg=true"]),
                       progress=False)
