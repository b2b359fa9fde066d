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


def warmup_uploads(examples=(10, 20, 30, 40)):
    """Warm-up LoRAs of four clients of one layer (d_in 3, d_out 8, rank 4), in two planted groups:
    A of client c is all c, B its group's matrix plus noise."""
    features, truth = planted_features((2, 2), layers=1)
    uploads = [Upload(c, {"l.experts.local.A": torch.full((4, 3), float(c)), "l.experts.local.B": f[0]},
                      num_examples=n) for c, (f, n) in enumerate(zip(features, examples))]
    return uploads, truth


def lease(*overrides):
    return FedLEASE(load_config(None, ["algorithm=fedlease", "data.num_clients=4", "fedlease.warmup_rounds=1",
                                       *overrides]))


def test_weighted_variant_starts_cluster_experts_from_weighted_means_of_members():
    algo = lease("fedlease.variant=weighted")
    uploads, truth = warmup_uploads()
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


def test_official_variant_sends_a_client_its_own_warmup_lora_in_its_slot_and_fresh_experts_elsewhere():
    algo = lease()
    assert algo.settings.variant == "official"  # the default
    uploads, truth = warmup_uploads()
    state = algo.aggregate(algo.init_server({}), uploads, server_round=1)
    assignment = state.record.assignment.tolist()
    assert same_partition(np.array(assignment), truth)
    for j in range(2):  # the server's experts are fresh: a random A, B = 0, one draw per cluster
        assert state.weights[f"l.experts.e{j}.A"].shape == (4, 3) and state.weights[f"l.experts.e{j}.B"].shape == (8, 4)
        assert not state.weights[f"l.experts.e{j}.A"].eq(0).all() and state.weights[f"l.experts.e{j}.B"].eq(0).all()
    assert not torch.equal(state.weights["l.experts.e0.A"], state.weights["l.experts.e1.A"])
    assert sorted(state.record.warmup) == [0, 1, 2, 3] and state.record.routers == {}  # kept for the own slots
    routers = []
    for c in range(4):
        message = algo.message_for(state, c, server_round=2)
        own, other = assignment[c], 1 - assignment[c]
        assert int(message["fedlease.cluster"]) == own
        for part in "AB":
            assert torch.equal(message[f"l.experts.e{own}.{part}"], uploads[c].state[f"l.experts.local.{part}"])
            assert torch.equal(message[f"l.experts.e{other}.{part}"], state.weights[f"l.experts.e{other}.{part}"])
        assert set(message) == set(state.weights) | {"l.mixer.proj.weight", "fedlease.cluster"}
        assert message["l.mixer.proj.weight"].shape == (2 * 2 - 1, 3)  # Linear(d_in, 2M-1), fresh per client
        routers.append(message["l.mixer.proj.weight"])
    assert not torch.equal(routers[0], routers[1])
    assert torch.equal(algo.message_for(state, 0, 2)["l.mixer.proj.weight"], routers[0])  # drawn from a seed


def clustered_round_uploads(examples=(1, 3, 1, 9)):
    """After warm-up, the clustered round's uploads of four clients: each its cluster's expert and
    its router, with unequal example counts (which a plain mean ignores and a weighted one does not)."""
    uploads, _ = warmup_uploads()
    return uploads, lambda assignment: [
        Upload(c, {f"l.experts.e{assignment[c]}.A": torch.full((4, 3), 10.0 + c),
                   f"l.experts.e{assignment[c]}.B": torch.full((8, 4), -float(c)),
                   "l.mixer.proj.weight": torch.full((3, 3), float(c * c))}, num_examples=n)
        for c, n in enumerate(examples)]


@pytest.mark.parametrize("variant", ["official", "weighted"])
def test_experts_are_plain_means_official_or_weighted_means_and_routers_shared_within_a_cluster(variant):
    algo = lease(f"fedlease.variant={variant}")
    warm, clustered = clustered_round_uploads()
    state = algo.aggregate(algo.init_server({}), warm, server_round=1)
    assignment = state.record.assignment.tolist()
    uploads = clustered(assignment)
    if variant == "weighted":  # the router is private: an honest upload holds the expert alone
        uploads = [Upload(u.client_id, {k: v for k, v in u.state.items() if "mixer" not in k}, u.num_examples)
                   for u in uploads]
    after = algo.aggregate(state, uploads, server_round=2)
    for j in range(2):
        members = [c for c in range(4) if assignment[c] == j]
        n = np.array([uploads[c].num_examples for c in members], dtype=float)
        w = np.full(len(members), 1 / len(members)) if variant == "official" else n / n.sum()
        expected_a = sum(wi * (10.0 + c) for wi, c in zip(w, members))
        torch.testing.assert_close(after.weights[f"l.experts.e{j}.A"], torch.full((4, 3), expected_a))
        torch.testing.assert_close(after.weights[f"l.experts.e{j}.B"],
                                   torch.full((8, 4), -sum(wi * c for wi, c in zip(w, members))))
        if variant == "official":
            torch.testing.assert_close(after.record.routers[j]["l.mixer.proj.weight"],
                                       torch.full((3, 3), float(np.mean([c * c for c in members]))))
    if variant == "weighted":
        assert after.record.routers == {}
        return
    assert after.record.warmup == {}  # every cluster trained: its members' warm-up LoRAs are done with
    messages = [algo.message_for(after, c, server_round=3) for c in range(4)]
    for c in range(4):  # now every slot is the server's expert, and the router the cluster's
        assert all(torch.equal(messages[c][k], v) for k, v in after.weights.items())
        for d in range(4):
            same = torch.equal(messages[c]["l.mixer.proj.weight"], messages[d]["l.mixer.proj.weight"])
            assert same == (assignment[c] == assignment[d])


def test_a_cluster_that_has_not_trained_keeps_its_members_on_their_warmup_loras():
    algo = lease()
    warm, clustered = clustered_round_uploads()
    state = algo.aggregate(algo.init_server({}), warm, server_round=1)
    assignment = state.record.assignment.tolist()
    trained = [u for u in clustered(assignment) if assignment[u.client_id] == 0]  # cluster 1 was not sampled
    after = algo.aggregate(state, trained, server_round=2)
    assert sorted(after.record.routers) == [0]
    assert sorted(after.record.warmup) == [c for c in range(4) if assignment[c] == 1]
    for c in after.record.warmup:
        message = algo.message_for(after, c, server_round=3)
        assert torch.equal(message["l.experts.e1.A"], warm[c].state["l.experts.local.A"])
        assert torch.equal(message["l.experts.e0.A"], after.weights["l.experts.e0.A"])
        assert not torch.equal(message["l.mixer.proj.weight"], after.record.routers[0]["l.mixer.proj.weight"])


@pytest.mark.parametrize("variant", ["official", "weighted"])
def test_a_newcomer_gets_the_largest_clusters_router_official_and_trains_its_router(variant):
    algo = lease(f"fedlease.variant={variant}")
    warm, clustered = clustered_round_uploads()
    state = algo.aggregate(algo.init_server({}), warm, server_round=1)
    uploads = clustered(state.record.assignment.tolist())
    if variant == "weighted":
        uploads = [Upload(u.client_id, {k: v for k, v in u.state.items() if "mixer" not in k}, u.num_examples)
                   for u in uploads]
    state = algo.aggregate(state, uploads, server_round=2)
    message = algo.newcomer_message(state, 2)
    largest = int(torch.bincount(state.record.assignment).argmax())
    assert int(message["fedlease.cluster"]) == largest
    assert all(torch.equal(message[k], v) for k, v in state.weights.items())
    if variant == "official":
        assert torch.equal(message["l.mixer.proj.weight"], state.record.routers[largest]["l.mixer.proj.weight"])
    else:
        assert "l.mixer.proj.weight" not in message
    keys = ["l.experts.e0.A", "l.experts.e0.B", "l.experts.e1.A", "l.experts.e1.B", "l.mixer.proj.weight"]
    assert algo.newcomer_trains(keys) == ["l.mixer.proj.weight"]  # the experts stay the server's


@pytest.mark.parametrize("variant", ["official", "weighted"])
def test_official_experts_have_their_own_rank_and_alpha_whatever_adapter_rank_says(variant):
    from test_algorithms import build

    algo, model = build("fedlease", "adapter.rank=16", "adapter.alpha=32", f"fedlease.variant={variant}")
    rank, alpha = (4, 16.0) if variant == "official" else (16, 32.0)
    warm = model.layers[0]["proj"].experts["local"]
    assert warm.A.shape == (rank, 8) and (warm.rank, warm.alpha) == (rank, alpha)  # the warm-up LoRA too
    layer = algo.make_layer(torch.nn.Linear(8, 8), 3)
    assert [e.A.shape for e in layer.experts.values()] == [(rank, 8)] * 3
    assert all(e.scaling == alpha / rank for e in layer.experts.values())
    assert algo.is_shared("x.mixer.proj.weight") == (variant == "official")  # routers cross in official only
    assert algo.is_shared("x.experts.e1.A") and not algo.is_shared("x.experts.local.A")


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


def experts_of(keys):
    return {k.split(".experts.")[1].split(".")[0] for k in keys if ".experts." in k}


@pytest.mark.parametrize("variant", ["official", "weighted"])
def test_run_recovers_planted_groups_records_clusters_and_sends_what_its_variant_says(tiny_overrides, grouped_data,
                                                                                      variant):
    cfg = load_config(None, fedlease_overrides(tiny_overrides, "adapter.rank=8", f"fedlease.variant={variant}"))
    result = run_experiment(cfg, data=grouped_data, progress=False)
    assert result.rejections == []  # the server's checks (routers included) refuse no honest upload
    record = json.loads((result.run_dir / "clustering.json").read_text())
    clusters = [record["cluster_of_client"][str(c)] for c in range(4)]
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]
    assert record["chosen_k"] == 2 and set(record["silhouette_by_k"]) == {"2", "3"}  # k in [2, min(3, n-1)]
    assert record["variant"] == variant
    assert len(record["distance_matrix"]) == 4 and (result.run_dir / "clustering.png").is_file()
    # every upload holds one expert, A and B of every adapted layer: of rank 4 (official, whatever
    # adapter.rank says) or adapter.rank; after warm-up, official, the client's router too
    rank, width, layers, m = (4 if variant == "official" else 8), 32, 2 * 2, 2  # q and v of 2 blocks
    one_expert, routers = layers * 2 * rank * width, layers * (2 * m - 1) * width
    messages = {(msg.round, msg.client, msg.direction): decode(msg.payload) for msg in result.messages}
    for (r, c, direction), payload in messages.items():
        if direction == "up":
            crossing_router = variant == "official" and r > 1
            assert sum(v.numel() for v in payload.values()) == one_expert + (routers if crossing_router else 0)
            assert len(experts_of(payload)) == 1
            assert any("mixer" in k for k in payload) == crossing_router
    assert result.summary["uploaded"] == one_expert + (routers if variant == "official" else 0)
    # after clustering, each client receives all M experts and its cluster, and sends back its own
    for (r, c, direction), received in messages.items():
        if direction == "down" and r >= 2:
            assert experts_of(received) == {"e0", "e1"}
            own = int(received["fedlease.cluster"])
            assert experts_of(messages[(r, c, "up")]) == {f"e{own}"}
            assert any("mixer" in k for k in received) == (variant == "official")
    if variant == "official":  # the first clustered round: its own warm-up LoRA in its slot, fresh experts elsewhere
        for c in range(4):
            own, got, warm = clusters[c], messages[(2, c, "down")], messages[(1, c, "up")]
            for k, v in got.items():
                if f".experts.e{own}." in k:
                    assert torch.equal(v, warm[k.replace(f".experts.e{own}.", ".experts.local.")])
                elif k.endswith(".B"):
                    assert v.eq(0).all()
        router = lambda c: {k: v for k, v in messages[(3, c, "down")].items() if "mixer" in k}
        same = lambda c, d: all(torch.equal(v, router(d)[k]) for k, v in router(c).items())
        assert same(0, 1) and same(2, 3) and not same(0, 2)  # averaged within each cluster
    rows = [r for r in result.client_rows if r["round"] == 1]
    assert all(r["bytes_down"] == 0 and r["bytes_up"] > 0 for r in rows)  # warm-up: nothing comes back
    # a client's exported model (experts, router, cluster index) reloads with the same outputs
    from fedlrm.federation.export import load_personalized
    from fedlrm.federation.simulation import Simulation
    from fedlrm.federation.task import personalize
    from fedlrm.federation.validation import expected_upload, schema_problem

    sim = Simulation(cfg, data=grouped_data, progress=False)
    x = grouped_data.clients[2].test.batches(5).__next__()[0]
    expected = personalize(sim.bundle, sim.algorithm, cfg, 2, result.client_states[2], result.server_state,
                           cfg.train.rounds)(x)
    torch.testing.assert_close(load_personalized(result.run_dir / "adapters" / "client_02")(x), expected)
    # the server expects the router in the upload (official) and refuses one without it
    upload = messages[(3, 2, "up")]
    schema = expected_upload(sim.bundle, sim.algorithm, cfg, 2, messages[(3, 2, "down")], 3)
    assert schema.keys() == upload.keys() and schema_problem(schema, upload) is None
    if variant == "official":
        assert "missing" in schema_problem(schema, {k: v for k, v in upload.items() if "mixer" not in k})


@pytest.mark.parametrize("cut_after", [1, 2])
def test_an_official_run_cut_and_resumed_equals_the_uninterrupted_one(tiny_overrides, cut_after):
    """Cut after clustering (the record holds the warm-up LoRAs for the own slots) or after the first
    clustered round (it holds the clusters' routers; with 3 of 4 clients sampled, perhaps some
    warm-up LoRAs still)."""
    from test_algorithms import same_record

    from fedlrm.experiment import resume_experiment

    base = tiny_overrides + ["algorithm=fedlease", "data.num_clients=4", "data.shards_per_client=1",
                             "fedlease.warmup_rounds=1", "fedlease.max_clusters=3", "train.client_fraction=0.75"]
    full = run_experiment(load_config(None, base + ["name=full"]), progress=False)
    cut = run_experiment(load_config(None, base + ["name=cut"]), progress=False, stop_after_round=cut_after)
    if cut_after == 1:
        assert cut.server_state.record.warmup and not cut.server_state.record.routers
    else:
        assert cut.server_state.record.routers
    resumed = resume_experiment(cut.run_dir, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(resumed.client_rows) == strip(full.client_rows)
    assert resumed.server_state.weights.keys() == full.server_state.weights.keys()
    assert all(torch.equal(v, resumed.server_state.weights[k]) for k, v in full.server_state.weights.items())
    assert same_record(resumed.server_state.record, full.server_state.record)
    assert full.server_state.record.routers  # the comparison covered the routers
