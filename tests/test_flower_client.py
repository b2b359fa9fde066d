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
    with pytest.raises(DataError, match="neither train.parquet"):
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
