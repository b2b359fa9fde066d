"""FedLEASE: clustering on LoRA B matrices, the top-M router, what crosses, resuming."""

import json

import numpy as np
import pytest
import torch

from fedlrm.adapters import TopMRouter
from fedlrm.algorithms import Upload, load_config
from fedlrm.algorithms.fedlease import FedLEASE, cluster_clients
from fedlrm.data import ClientSplit, FederatedData, ImageSet
from fedlrm.experiment import run_experiment
from fedlrm.federation.wire import decode


def planted_features(groups=(3, 4), layers=2, seed=0):
    """Clients whose B matrices are noisy copies of one matrix per group."""
    g = torch.Generator().manual_seed(seed)
    centres = [[torch.randn(8, 4, generator=g) for _ in range(layers)] for _ in groups]
    features, truth = [], []
    for gi, size in enumerate(groups):
        for _ in range(size):
            features.append([c + 0.3 * torch.randn(c.shape, generator=g) for c in centres[gi]])
            truth.append(gi)
    return features, np.array(truth)


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_clustering_recovers_planted_groups_and_picks_k_by_silhouette():
    features, truth = planted_features((3, 4, 3))
    distances, candidates, labels = cluster_clients(features, max_clusters=5)
    assert same_partition(labels, truth)
    assert [k for k, _ in candidates] == [2, 3, 4, 5]
    assert max(candidates, key=lambda c: c[1])[0] == 3 == labels.max() + 1
    assert distances.shape == (10, 10) and np.allclose(distances, distances.T) and np.allclose(np.diag(distances), 0)
    assert labels[0] == 0  # numbered by first client: deterministic


def test_server_starts_cluster_experts_from_weighted_means_of_members():
    cfg = load_config(None, ["algorithm=fedlease", "data.num_clients=4", "fedlease.warmup_rounds=1"])
    algo = FedLEASE(cfg)
    features, truth = planted_features((2, 2), layers=1)
    uploads = [Upload(c, {"l.experts.local.A": torch.full((4, 3), float(c)), "l.experts.local.B": f[0]},
                      num_examples=10 * (c + 1)) for c, f in enumerate(features)]
    state = algo.aggregate(algo.init_server({}), uploads, server_round=1)
    assignment = state.record.assignment.numpy()
    assert same_partition(assignment, truth)
    for j in range(2):
        members = [c for c in range(4) if assignment[c] == j]
        w = np.array([10 * (c + 1) for c in members], dtype=float)
        w /= w.sum()
        expected = sum(wi * float(c) for wi, c in zip(w, members))
        torch.testing.assert_close(state.weights[f"l.experts.e{j}.A"], torch.full((4, 3), expected))
    assert state.record.warmup == {}  # the warm-up LoRAs are not kept once they have been clustered
    message = algo.message_for(state, 3, server_round=2)
    assert int(message["fedlease.cluster"]) == assignment[3]
    assert set(message) == set(state.weights) | {"fedlease.cluster"}  # bookkeeping never leaves the server


@pytest.mark.parametrize("n_experts", [2, 3, 5])
def test_router_always_weights_own_expert_and_sums_to_one(n_experts):
    torch.manual_seed(n_experts)
    router = TopMRouter(16, n_experts)
    assert router.proj.weight.shape == (2 * n_experts - 1, 16) and router.proj.bias is None
    for own in range(n_experts):
        router.own.fill_(own)
        weights = router(torch.randn(4, 9, 16) * 3)
        assert weights.shape == (4, 9, n_experts)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 9))
        assert (weights[..., own] > 0).all()
        used = (weights > 0).sum(-1)
        assert used.min() >= 1 and used.max() <= n_experts


def colour_groups_data(tiny_dataset_images):
    """Four clients: 0 and 1 see only classes 0-2, clients 2 and 3 only classes 3-5."""
    images, labels = tiny_dataset_images
    clients = []
    for c in range(4):
        classes = [0, 1, 2] if c < 2 else [3, 4, 5]
        idx = [i for i, y in enumerate(labels.tolist()) if y in classes][c % 2::2]
        train = ImageSet.from_tensors(images[idx], labels[idx])
        clients.append(ClientSplit(c, train, ImageSet.from_tensors(images[idx], labels[idx])))
    return FederatedData(["red", "green", "blue", "yellow", "white", "black"], clients,
                         ImageSet.from_tensors(images, labels))


@pytest.fixture
def grouped_data():
    torch.manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9],
                            [0.9, 0.9, 0.1], [0.95, 0.95, 0.95], [0.05, 0.05, 0.05]])
    labels = torch.arange(6).repeat_interleave(8)
    images = colours[labels][:, :, None, None].expand(-1, 3, 16, 16) * 2 - 1 + 0.1 * torch.randn(48, 3, 16, 16)
    return colour_groups_data((images, labels))


def fedlease_overrides(tiny_overrides, *extra):
    return tiny_overrides + ["algorithm=fedlease", "data.num_clients=4", "fedlease.warmup_rounds=1",
                             "fedlease.max_clusters=3", "train.local_epochs=3", "train.lr=0.02", *extra]


def test_run_recovers_planted_groups_records_clusters_and_uploads_one_expert(tiny_overrides, grouped_data):
    cfg = load_config(None, fedlease_overrides(tiny_overrides))
    result = run_experiment(cfg, data=grouped_data, progress=False)
    record = json.loads((result.run_dir / "clustering.json").read_text())
    clusters = [record["cluster_of_client"][str(c)] for c in range(4)]
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]
    assert record["chosen_k"] == 2 and set(record["silhouette_by_k"]) == {"2", "3"}  # k in [2, min(3, n-1)]
    assert len(record["distance_matrix"]) == 4 and (result.run_dir / "clustering.png").is_file()
    # every upload, warm-up LoRA or cluster expert, is exactly one expert: A and B of every adapted layer
    rank, width, layers = 4, 32, 2 * 2  # q and v of 2 blocks
    one_expert = layers * 2 * rank * width
    for m in result.messages:
        if m.direction == "up":
            assert sum(v.numel() for v in decode(m.payload).values()) == one_expert
            keys = m.keys
            assert len({k.split(".experts.")[1].split(".")[0] for k in keys}) == 1
    # after clustering, each client receives all M experts and its cluster, and sends back its own
    later = [m for m in result.messages if m.round == 2]
    for m in later:
        if m.direction == "down":
            received = decode(m.payload)
            assert {k.split(".experts.")[1].split(".")[0] for k in received if ".experts." in k} == {"e0", "e1"}
            own = int(received["fedlease.cluster"])
            up = next(u for u in later if u.direction == "up" and u.client == m.client)
            assert all(f".experts.e{own}." in k for k in up.keys)
    rows = [r for r in result.client_rows if r["round"] == 1]
    assert all(r["bytes_down"] == 0 and r["bytes_up"] > 0 for r in rows)  # warm-up: nothing comes back
    # a client's exported model (experts, router, cluster index) reloads with the same outputs
    from fedlrm.federation.export import load_personalized
    from fedlrm.federation.simulation import Simulation
    from fedlrm.federation.task import personalize

    sim = Simulation(cfg, data=grouped_data, progress=False)
    x = grouped_data.clients[2].test.batches(5).__next__()[0]
    expected = personalize(sim.bundle, sim.algorithm, cfg, 2, result.client_states[2], result.server_state,
                           cfg.train.rounds)(x)
    torch.testing.assert_close(load_personalized(result.run_dir / "adapters" / "client_02")(x), expected)


