"""Clients that classify over their own classes (`data.client_classes=own`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlrm.algorithms import load_config
from fedlrm.data import load_federated_data
from fedlrm.errors import ConfigError
from fedlrm.experiment import run_experiment
from fedlrm.federation.simulation import Simulation
from fedlrm.models import load_backbone

OWN = ["data.client_classes=own", "data.partition=classes", "data.classes_per_client=2"]


def test_a_client_with_its_own_classes_has_labels_in_them_and_the_same_images(tiny_overrides):
    cfg_all = load_config(None, tiny_overrides + OWN[1:])
    cfg_own = load_config(None, tiny_overrides + OWN)
    preprocess = load_backbone(cfg_own.model).preprocess
    shared, own = (load_federated_data(c.data, preprocess, c.seed) for c in (cfg_all, cfg_own))
    for every, mine in zip(shared.clients, own.clients):
        assert every.classes is None and mine.classes == every.train.classes and len(mine.classes) == 2
        for part in ("train", "test"):
            a, b = getattr(every, part), getattr(mine, part)
            assert np.array_equal(a.rows, b.rows)  # the same images ...
            assert [mine.classes[i] for i in b.labels.tolist()] == a.labels.tolist()  # ... named by their own list
            assert set(b.labels.tolist()) <= {0, 1}
    assert own.summary()[0]["classes"] == shared.summary()[0]["classes"]  # reported as the federation's ids


def test_in_process_a_clients_logits_have_exactly_its_own_classes(tiny_overrides):
    sim = Simulation(load_config(None, tiny_overrides + OWN + ["algorithm=fedlrm"]), progress=False)
    model = sim.bundle.model
    images = next(sim.data.clients[0].test.batches(4))[0]
    assert model(images).shape[1] == sim.data.num_classes  # the server's view: every class
    for split in sim.data.clients:
        with model.classifying_over(split.classes):
            logits = model(images)
        assert logits.shape[1] == len(split.classes)
        torch.testing.assert_close(logits, model(images)[:, split.classes])
    assert split.class_names(sim.data.class_names) == [sim.data.class_names[i] for i in split.classes]


def test_a_run_with_own_classes_exports_each_clients_own_class_names(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides + OWN + ["algorithm=fedlrm", "train.rounds=1"]),
                            progress=False)
    summary = json.loads((result.run_dir / "data_summary.json").read_text())
    for client in summary["clients"]:
        exported = json.loads((result.run_dir / "adapters" / f"client_{client['client']:02d}" / "fedlrm.json")
                              .read_text())
        assert exported["class_names"] == [summary["class_names"][i] for i in client["classifies_over"]]
        assert len(exported["class_names"]) == 2
    assert all(0 <= row["accuracy"] <= 1 for row in result.client_rows)


def test_a_supernode_with_its_own_classes_builds_a_model_over_them_only(tiny_overrides, tmp_path):
    from test_flower_client import first_message, node

    cfg = load_config(None, tiny_overrides + OWN + ["algorithm=fedlrm"])
    everyone = load_federated_data(cfg.data, load_backbone(cfg.model).preprocess, cfg.seed)
    client = node({"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path / "n1")}, cfg,
                  first_message(cfg), 1)
    own = everyone.clients[1].class_names(everyone.class_names)
    model = client.client.bundle.model
    assert client.class_names == own and model.class_names == own and model.text_features.shape[0] == 2
    images = next(client.client.split.test.batches(4))[0]
    assert model(images).shape[1] == 2


def test_an_unknown_client_classes_value_is_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="data.client_classes"):
        load_config(None, tiny_overrides + ["data.client_classes=mine"]).data.check()
