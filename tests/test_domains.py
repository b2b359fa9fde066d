"""Federations of several data sources (`data.domains`): each domain its own clients, partition and
shots; each client over its domain's classes; accuracies per domain and overall."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlrm.algorithms import load_config
from fedlrm.data import load_federated_data
from fedlrm.errors import ConfigError
from fedlrm.experiment import compare, run_experiment
from fedlrm.federation.simulation import Simulation
from fedlrm.models import load_backbone

# the second domain leaves two of the six colours out, so the domains differ in their classes
SECOND = ["yellow", "white"]


def two_domains(tiny_dataset, first=2, second=3, **extra) -> list[str]:
    a = f"{{label: warm, source: parquet, train: '{tiny_dataset['train']}', test: '{tiny_dataset['test']}', " \
        f"num_clients: {first}}}"
    b = f"{{label: cold, source: parquet, train: '{tiny_dataset['train']}', test: '{tiny_dataset['test']}', " \
        f"num_clients: {second}, shots: 2, exclude_classes: {SECOND}}}"
    return [f"data.domains=[{a}, {b}]"] + [f"{k}={v}" for k, v in extra.items()]


def test_clients_of_each_domain_classify_over_its_classes_and_keep_its_split(tiny_overrides, tiny_dataset):
    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset))
    preprocess = load_backbone(cfg.model).preprocess
    data = load_federated_data(cfg.data, preprocess, cfg.seed)
    assert [d.label for d in data.domains] == ["warm", "cold"]
    assert [d.clients for d in data.domains] == [[0, 1], [2, 3, 4]]
    assert data.class_names[:6] == ["red", "green", "blue", "yellow", "white", "black"]
    assert data.class_names[6:] == ["red", "green", "blue", "black"]  # names may repeat across domains
    assert data.domains[1].classes == [6, 7, 8, 9]
    assert data.global_test is None and [len(t.images) for t in data.global_tests] == [48, 32]
    # each domain's clients are those of a federation of that source alone, renumbered on
    for label, alone_overrides, ids in (("warm", ["data.num_clients=2"], [0, 1]),
                                       ("cold", ["data.num_clients=3", "data.shots=2",
                                                 f"data.exclude_classes={SECOND}"], [2, 3, 4])):
        alone = load_federated_data(load_config(None, tiny_overrides + alone_overrides).data, preprocess, cfg.seed)
        domain = next(d for d in data.domains if d.label == label)
        for own, mine in zip(alone.clients, (data.clients[c] for c in ids)):
            assert mine.classes == domain.classes and mine.client_id == ids[own.client_id]
            assert np.array_equal(own.train.rows, mine.train.rows) and np.array_equal(own.test.rows, mine.test.rows)
            assert torch.equal(own.train.labels, mine.train.labels)  # positions in its domain's list
            assert mine.class_names(data.class_names) == alone.class_names
    assert [row["domain"] for row in data.summary()] == ["warm"] * 2 + ["cold"] * 3
    assert len(data.clients[3].train) == 2 * len(data.clients[3].train.classes)  # the domain's own shots


def test_own_classes_within_a_domain_are_the_partitions_in_federation_ids(tiny_overrides, tiny_dataset):
    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + [
        "data.client_classes=own", "data.partition=classes", "data.classes_per_client=2"])
    data = load_federated_data(cfg.data, load_backbone(cfg.model).preprocess, cfg.seed)
    for d in data.domains:
        for c in d.clients:
            split = data.clients[c]
            assert len(split.classes) == 2 and set(split.classes) <= set(d.classes)
            assert set(split.train.labels.tolist()) <= {0, 1}


def test_a_run_reports_accuracy_per_domain_and_the_global_model_on_each_domains_classes(tiny_overrides,
                                                                                        tiny_dataset):
    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + ["algorithm=fedavg", "train.rounds=1"])
    sim = Simulation(cfg, progress=False)
    model = sim.bundle.model
    images = next(sim.data.clients[0].test.batches(4))[0]
    for split in sim.data.clients:
        with model.classifying_over(split.classes):
            assert model(images).shape[1] == (6 if split.client_id < 2 else 4)
    result = run_experiment(cfg, progress=False)
    s = result.summary
    final = [row for row in result.client_rows if row["round"] == 1]
    for label, ids in (("warm", [0, 1]), ("cold", [2, 3, 4])):
        own = [row for row in final if row["client"] in ids]
        expected = sum(r["accuracy"] * r["n_test"] for r in own) / sum(r["n_test"] for r in own)
        assert s[f"acc_weighted/{label}"] == pytest.approx(expected)
        assert 0 <= s[f"global_accuracy/{label}"] <= 1
    sizes = [48, 32]
    assert s["global_accuracy"] == pytest.approx(
        (s["global_accuracy/warm"] * sizes[0] + s["global_accuracy/cold"] * sizes[1]) / sum(sizes))
    assert "acc warm %" in (result.run_dir / "summary.md").read_text()
    about = json.loads((result.run_dir / "data_summary.json").read_text())
    assert [d["label"] for d in about["domains"]] == ["warm", "cold"] and about["global_test_size"] == 80
    exported = json.loads((result.run_dir / "adapters" / "client_03" / "fedlrm.json").read_text())
    assert exported["class_names"] == ["red", "green", "blue", "black"]


def test_compare_shows_each_domain_and_fedleases_clusters_against_the_domains(tiny_overrides, tiny_dataset,
                                                                              tmp_path):
    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + [
        "train.rounds=2", "fedlease.warmup_rounds=1", "fedlease.max_clusters=3", "name=two-domains"])
    out, summaries = compare(cfg, ["local", "fedlease"], progress=False)
    table = (out / "compare.md").read_text()
    assert "acc warm %" in table and "acc cold %" in table and "clusters vs domains (ARI)" in table
    fedlease = next(s for s in summaries if s["method"] == "fedlease")
    clusters = json.loads((out / "fedlease" / "clustering.json").read_text())["cluster_of_client"]
    groups = fedlease["groups"]
    assert {int(c): g["group"] for c, g in groups.items()} == {int(c): a for c, a in clusters.items()}
    assert [g["domain"] for _, g in sorted(groups.items(), key=lambda kv: int(kv[0]))] == ["warm"] * 2 + ["cold"] * 3
    from sklearn.metrics import adjusted_rand_score
    assert fedlease["groups_ari"] == pytest.approx(adjusted_rand_score(
        ["warm"] * 2 + ["cold"] * 3, [clusters[str(c)] for c in range(5)]))
    assert 0 < fedlease["groups_purity"] <= 1
    assert "groups_ari" not in next(s for s in summaries if s["method"] == "local")


def test_bad_domains_are_refused_with_the_domain_named(tiny_overrides, tiny_dataset):
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, tiny_overrides + ["data.domains=[{label: a}, {label: a}]"]).data.check()
    with pytest.raises(ConfigError, match=r"data.domains\[1\] \(b\): data.shots"):
        load_config(None, tiny_overrides + ["data.domains=[{label: a}, {label: b, shots: -1}]"]).data.check()
    with pytest.raises(ConfigError, match="label is empty"):
        load_config(None, tiny_overrides + ["data.domains=[{num_clients: 2}]"]).data.check()
    with pytest.raises(ConfigError, match="leaves no client"):
        load_config(None, tiny_overrides + two_domains(tiny_dataset) + ["data.new_clients=5"]).data.check()


def test_a_config_files_relative_domain_paths_are_read_against_its_folder(tmp_path, tiny_dataset):
    import shutil

    folder = tmp_path / "configs"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(tiny_dataset[split], folder / "data" / f"{split}.parquet")
    (folder / "two.yaml").write_text(
        "data:\n  domains:\n    - label: a\n      source: parquet\n      train: data/train.parquet\n"
        "      test: data/test.parquet\n")
    cfg = load_config(folder / "two.yaml", [])
    assert cfg.data.domains[0].train == str((folder / "data" / "train.parquet").resolve())
    assert cfg.data.domains[0].test == str((folder / "data" / "test.parquet").resolve())


def test_a_supernode_of_the_second_domain_classifies_over_that_domains_classes_only(tiny_overrides, tiny_dataset,
                                                                                   tmp_path):
    from test_flower_client import first_message, node

    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + ["algorithm=fedlrm"])
    client = node({"partition-id": 3, "num-partitions": 5, "state-dir": str(tmp_path / "n3")}, cfg,
                  first_message(cfg), 1)
    model = client.client.bundle.model
    assert client.class_names == model.class_names == ["red", "green", "blue", "black"]
    assert model(next(client.client.split.test.batches(4))[0]).shape[1] == 4
    with pytest.raises(Exception, match="num-partitions=5"):  # the sum over the domains, not data.num_clients
        node({"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path / "n1")}, cfg, first_message(cfg), 1)


def test_a_supernode_with_its_own_data_dir_in_a_multi_domain_run_reads_its_folder_only(tiny_overrides, tiny_dataset,
                                                                                     tmp_path):
    from pathlib import Path

    from test_flower_client import first_message, node

    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + ["algorithm=fedlrm", "data.new_clients=1"])
    own = {"client-id": 1, "data-dir": str(Path(tiny_dataset["train"]).parent), "state-dir": str(tmp_path / "n1")}
    client = node(own, cfg, first_message(cfg), 1)
    assert client.class_names == ["red", "green", "blue", "yellow", "white", "black"]  # its folder's, not a domain's
    with pytest.raises(Exception, match="this SuperNode's data-dir: .* is not a folder"):
        node({**own, "data-dir": str(tmp_path / "missing"), "state-dir": str(tmp_path / "n2")}, cfg,
             first_message(cfg), 1)
