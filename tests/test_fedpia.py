"""FedPIA: optimal-transport alignment of LoRA rank components and their barycenter."""

import csv

import pytest
import torch

from fedlrm.adapters import adapter_parameters, inject_adapters
from fedlrm.algorithms import (
    ClientRound,
    ServerState,
    Upload,
    load_config,
    weighted_mean,
)
from fedlrm.algorithms.fedpia import FedPIA, TransportCosts, align, components, split
from fedlrm.experiment import run_experiment
from fedlrm.params import SyntheticEncoder


def lora(seed, d_in=6, d_out=5, rank=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)


def permuted(A, B, perm):
    return A[perm], B[:, perm]


def test_permuting_rank_components_never_changes_the_adapter():
    A, B = lora(0)
    for seed in range(3):
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        pA, pB = permuted(A, B, perm)
        torch.testing.assert_close(pB @ pA, B @ A)
        aligned, before, after = align(components(pA, pB), components(A, B))
        rA, rB = split(aligned, 6, torch.float32)
        torch.testing.assert_close(rA, A)
        torch.testing.assert_close(rB, B)
        assert after == pytest.approx(0.0, abs=1e-9)
        assert (before > 0) == (not perm.equal(torch.arange(4)))


def shuffled_uploads(n=4):
    A, B = lora(1)
    uploads = []
    for c in range(n):
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(10 + c))
        pA, pB = permuted(A, B, perm)
        uploads.append(Upload(c, {"l.experts.global.A": pA, "l.experts.global.B": pB}, num_examples=10 + c))
    return A, B, uploads


def test_barycenter_of_shuffled_copies_is_the_adapter_while_plain_averaging_is_not():
    A, B, uploads = shuffled_uploads()
    cfg = load_config(None, ["algorithm=fedpia"])
    algo = FedPIA(cfg)
    state = algo.aggregate(algo.init_server({}), uploads, server_round=1)
    bA, bB = state.weights["l.experts.global.A"], state.weights["l.experts.global.B"]
    torch.testing.assert_close(bB @ bA, B @ A, atol=1e-5, rtol=1e-5)  # equal up to one permutation
    history = state.record.per_round
    assert history.shape == (1, 1, 2) and history[0, 0, 0] > 0 and history[0, 0, 1] == pytest.approx(0, abs=1e-8)
    mean = weighted_mean(uploads)
    naive = mean["l.experts.global.B"] @ mean["l.experts.global.A"]
    assert (naive - B @ A).norm() > 0.1 * (B @ A).norm()


def test_aggregation_is_deterministic():
    cfg = load_config(None, ["algorithm=fedpia"])
    uploads = [Upload(c, {"l.experts.global.A": lora(c)[0], "l.experts.global.B": lora(c)[1]}, 5 + c)
               for c in range(3)]
    first = FedPIA(cfg).aggregate(ServerState({}, TransportCosts()), uploads, server_round=1)
    second = FedPIA(cfg).aggregate(ServerState({}, TransportCosts()), uploads, server_round=1)
    for key in first.weights:
        assert torch.equal(first.weights[key], second.weights[key])
    assert torch.equal(first.record.per_round, second.record.per_round)


def test_client_aligns_the_global_adapter_to_its_own_before_integrating():
    cfg = load_config(None, ["algorithm=fedpia", "fedpia.global_weight=0.5"])
    algo = FedPIA(cfg)
    model = SyntheticEncoder(1, 8)
    inject_adapters(model, ["proj"], lambda linear: algo.make_layer(linear, None))
    params = adapter_parameters(model)
    A, B = lora(3, d_in=8, d_out=8, rank=16)
    with torch.no_grad():
        params["layers.0.proj.experts.local.A"].copy_(A)
        params["layers.0.proj.experts.local.B"].copy_(B)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    gA, gB = permuted(A, B, perm)  # the same adapter, components in another order
    received = {"layers.0.proj.experts.global.A": gA, "layers.0.proj.experts.global.B": gB}
    algo.receive(model, ClientRound(0, 2, received))
    # aligned first, the two-point barycenter of identical adapters is the adapter itself
    torch.testing.assert_close(params["layers.0.proj.experts.local.A"], A)
    torch.testing.assert_close(params["layers.0.proj.experts.local.B"], B)
    upload = algo.upload(model, [], ClientRound(0, 2, received))
    assert set(upload) == {"layers.0.proj.experts.global.A", "layers.0.proj.experts.global.B"}


def test_run_records_transport_cost_per_round_and_layer(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides + ["algorithm=fedpia"]), progress=False)
    rows = list(csv.DictReader((result.run_dir / "transport.csv").open()))
    assert len(rows) == 3 * 4  # 3 rounds x (q, v) of 2 blocks
    assert all(float(r["cost_after_alignment"]) <= float(r["cost_before_alignment"]) + 1e-9 for r in rows)
    assert (result.run_dir / "transport.png").is_file()
    for m in result.messages:
        assert all(".experts.global." in k for k in m.keys)  # the private adapter crosses only as the upload
