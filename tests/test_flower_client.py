"""The ClientApp's own logic without a deployment: own data dirs, state on disk, bad node configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.errors import DataError
from fedlrm.federation.flower.client_app import client_id_of
from fedlrm.federation.flower.node import NodeClient
from fedlrm.federation.flower.protocol import read_fields, request_fields
from fedlrm.federation.server import Server
from fedlrm.federation.task import build_model
from fedlrm.federation.wire import decode, encode
from fedlrm.models import load_backbone


def test_a_client_app_runs_one_torch_thread_unless_its_node_config_says_otherwise(tiny_overrides, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config(None, tiny_overrides)
    payload = first_message(cfg)
    node({"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "a")}, cfg, payload, 1)
    assert torch.get_num_threads() == 1
    node({"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "a"), "threads": 2}, cfg, payload, 1)
    assert torch.get_num_threads() == 2


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def first_message(cfg) -> bytes:
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), ["a", "b"], cfg, algorithm)
    return encode(algorithm.message_for(Server(cfg, algorithm, bundle, cfg.data.num_clients).initial_state(), 0, 1))


def node(node_config, cfg, payload, round_index, training=True) -> NodeClient:
    meta, parsed = read_fields(request_fields(round_index=round_index, client=client_id_of(node_config),
                                              run_key="test-run", cfg=cfg))
    return NodeClient(context(node_config), meta, parsed, payload, training=training)


def test_a_supernode_with_its_own_data_dir_trains_and_keeps_its_private_state_on_disk(tiny_overrides, tiny_dataset,
                                                                                      tmp_path):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedlrm"])
    own = {"client-id": 1, "data-dir": str(Path(tiny_dataset["train"]).parent), "state-dir": str(tmp_path / "n1")}
    payload = first_message(cfg)
    first = node(own, cfg, payload, 1)
    assert len(first.client.split.train) > 0 and first.class_names[:2] == ["red", "green"]
    reply = first.client.train(1, payload)
    first.save_private(1)
    assert set(decode(reply.upload)) == set(decode(payload))  # only the global expert goes back
    # The next message finds the private weights of round 1 on disk, not fresh ones.
    second = node(own, cfg, payload, 2)
    saved = first.client.state()
    assert saved.keys() == second.client.state().keys()
    assert all(torch.equal(saved[k], second.client.state()[k]) for k in saved)
    assert any(".experts.local." in k for k in saved) and any(".mixer." in k for k in saved)
    assert (tmp_path / "n1" / "data").is_dir()  # preprocessed images cached for later messages


def test_a_partition_count_that_differs_from_the_run_is_refused(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg"])
    with pytest.raises(DataError, match="num-partitions=3"):
        node({"partition-id": 0, "num-partitions": 5, "state-dir": str(tmp_path)}, cfg, b"", 1)


def test_a_node_config_without_a_client_is_refused():
    with pytest.raises(DataError, match="partition-id"):
        client_id_of({"data-dir": "/somewhere"})


def test_a_data_dir_without_splits_is_refused(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg"])
    with pytest.raises(DataError, match=r"data-dir: .* holds neither train/ \+ test/ image folders .* nor train.parquet"):
        node({"client-id": 0, "data-dir": str(tmp_path), "state-dir": str(tmp_path / "s")}, cfg, b"", 1)


def test_the_client_app_answers_a_query_without_importing_torch():
    """Flower loads the ClientApp module for every message; a query needs neither torch nor the model."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from fedlrm.federation.flower import client_app, protocol\n"
            "assert client_app.client_id_of({'partition-id': 2, 'num-partitions': 3}) == 2\n"
            "assert client_app.app is not None and protocol.reply is not None\n"
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def content_of(cfg, node_config, payload, round_index, evaluation=None):
    from fedlrm.federation.flower.protocol import request

    return request(payload, round_index=round_index, client=client_id_of(node_config), run_key="test-run", cfg=cfg,
                   evaluation=evaluation)


def test_a_training_message_that_carries_the_round_before_evaluates_it_first_as_an_evaluation_message_would(
        tiny_overrides, tmp_path):
    from fedlrm.errors import FedLRMError
    from fedlrm.federation.flower import node as handlers
    from fedlrm.federation.flower.protocol import EVALUATION_PREFIX, METRICS, request

    cfg = load_config(None, tiny_overrides + ["algorithm=fedlrm", "train.threads=1"])
    config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "n0")}
    payload = first_message(cfg)
    handlers.train(content_of(cfg, config, payload, 1), context(config))
    alone = handlers.evaluate(content_of(cfg, config, payload, 1), context(config))[METRICS]
    other = encode({k: 2 * v for k, v in decode(payload).items()})  # tensors of their own travel beside the others
    assert "evaluate-state" in request(payload, evaluation=(1, other), round_index=2, client=0, run_key="k", cfg=cfg)
    assert "evaluate-state" not in request(payload, evaluation=(1, payload), round_index=2, client=0, run_key="k",
                                           cfg=cfg)
    both = handlers.train(content_of(cfg, config, payload, 2, evaluation=(1, payload)), context(config))[METRICS]
    for name in ("accuracy", "loss", "n_test", "n_train"):
        assert both[EVALUATION_PREFIX + name] == alone[name], name
    assert both["num_examples"] > 0 and "train_loss" in both
    with pytest.raises(FedLRMError, match="only the round before"):
        handlers.train(content_of(cfg, config, payload, 3, evaluation=(1, payload)), context(config))


def test_the_supernode_worker_answers_as_the_client_app_would_and_keeps_its_process(tiny_overrides, tmp_path):
    """Flower starts a process per message; the worker that the ClientApp hands training to keeps
    one process (and its model) for later messages, gives the replies the ClientApp gives, and
    ends when the process it watches is gone."""
    import subprocess
    import sys
    import time

    from fedlrm.federation.flower import node as handlers
    from fedlrm.federation.flower import worker
    from fedlrm.federation.flower.protocol import METRICS, STATE, unpack_state

    cfg = load_config(None, tiny_overrides + ["algorithm=fedlrm", "train.threads=1"])
    here = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "here")}
    there = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "there")}
    payload = first_message(cfg)
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands for the SuperExec
    try:
        pids = set()
        for r in (1, 2):
            expected = handlers.train(content_of(cfg, here, payload, r), context(here))
            got = worker.call("train", content_of(cfg, there, payload, r), context(there), tmp_path / "there",
                              watch=watched.pid)
            figures = [{k: v for k, v in reply[METRICS].items() if "seconds" not in k} for reply in (got, expected)]
            assert figures[0] == figures[1] and figures[0]["num_examples"] > 0
            assert unpack_state(got[STATE]) == unpack_state(expected[STATE])
            pids |= {int(line.split()[1]) for line in (tmp_path / "there" / "worker.log").read_text().splitlines()
                     if line.startswith("worker ")}
        assert len(pids) == 1, "the second message found the worker of the first"
        assert (tmp_path / "there" / "runs" / "test-run" / "client0").is_dir()  # its state went to its own disk
        with pytest.raises(Exception, match="the ClientApp worker failed"):  # an error reaches the caller
            worker.call("train", content_of(cfg, there, payload, 3, evaluation=(1, payload)), context(there),
                        tmp_path / "there", watch=watched.pid)
    finally:
        watched.kill()
        watched.wait()
    (pid,) = pids
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
            "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]:
        time.sleep(0.2)
    alive = Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    assert not alive, "the worker outlived the process it watched"
    assert not worker.socket_path(tmp_path / "there").exists()
