"""F3OCUS: layer-wise NTK scores, multi-objective layer selection, training only what was chosen."""

import numpy as np
import pytest
import torch

from fedlrm.algorithms import ClientRound, load_config
from fedlrm.algorithms.f3ocus import (
    F3OCUS,
    block_of,
    ntk_scores,
    objectives,
    select_layers,
)
from fedlrm.experiment import run_experiment
from fedlrm.federation.task import build_model
from fedlrm.federation.wire import decode
from fedlrm.models import load_backbone


def f3ocus_model(tiny_clip_dir, *overrides):
    cfg = load_config(None, ["algorithm=f3ocus", f"model.name={tiny_clip_dir}", "adapter.rank=2", *overrides])
    algo = F3OCUS(cfg)
    bundle = build_model(load_backbone(cfg.model), ["red", "green", "blue"], cfg, algo)
    torch.manual_seed(0)
    with torch.no_grad():
        for key, p in bundle.model.named_parameters():
            if ".experts." in key:
                p.normal_(0, 0.5)
    return cfg, algo, bundle.model


@pytest.mark.parametrize("classes", [None, [0, 2]])
def test_ntk_eigenvalue_equals_eigendecomposition_of_explicit_gram(tiny_clip_dir, classes):
    """Over all logits, or only those of the classes a client holds (what clients send)."""
    _, _, model = f3ocus_model(tiny_clip_dir)
    images = torch.randn(3, 3, 16, 16)
    scores = ntk_scores(model, images, classes)
    params = {k: p for k, p in model.named_parameters() if ".experts." in k}
    logits = (model(images) if classes is None else model(images)[:, classes]).flatten()
    eig = []
    for b in (0, 1):
        mine = [p for k, p in params.items() if block_of(k) == b]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(out, mine, retain_graph=True)])
                for out in logits]  # one Jacobian row per (sample, class)
        J = torch.stack(rows).double()
        eig.append(torch.linalg.eigvalsh(J @ J.t()).max())
    expected = torch.stack(eig) / sum(eig)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)
    assert scores.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("optimizer", ["nsga2", "smsemoa"])
def test_selection_respects_budget_and_is_pareto_optimal(optimizer):
    scores = np.random.default_rng(1).dirichlet(np.ones(6), size=5)
    picked = select_layers(scores, 2, optimizer, population=20, generations=10, seed=3)
    assert picked["masks"].shape == (5, 6) and (picked["masks"].sum(1) == 2).all()
    chosen = np.array(objectives(picked["masks"], scores, 2))
    np.testing.assert_allclose(chosen, picked["chosen"])
    evaluated = picked["evaluated"]  # (importance, diversity) of every candidate evaluated: maximised
    dominated = (evaluated >= chosen).all(1) & (evaluated > chosen).any(1)
    assert not dominated.any()
    for point in picked["front"]:
        assert not ((evaluated >= point).all(1) & (evaluated > point).any(1)).any()
    again = select_layers(scores, 2, optimizer, population=20, generations=10, seed=3)
    assert (again["masks"] == picked["masks"]).all()


def test_unselected_blocks_below_the_lowest_selected_cost_no_backward(tiny_clip_dir):
    cfg, algo, model = f3ocus_model(tiny_clip_dir)
    calls = []
    block0 = model.image_encoder.encoder.layers[0]
    block0.register_full_backward_hook(lambda *args: calls.append(1))
    images = torch.randn(2, 3, 16, 16)
    for mask, expect_calls in (([0, 1], False), ([1, 1], True)):
        calls.clear()
        algo.receive(model, ClientRound(0, 1, {"f3ocus.mask": torch.tensor(mask)}))
        model(images).sum().backward()
        assert bool(calls) == expect_calls
        grads = {k: p.grad for k, p in model.named_parameters() if ".experts." in k}
        assert all((g is None) == (block_of(k) == 0 and not mask[0]) for k, g in grads.items())
        model.zero_grad(set_to_none=True)


def test_clients_upload_only_their_selected_blocks(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=f3ocus", "f3ocus.budget=1", "f3ocus.population=8",
                                              "f3ocus.generations=3", "f3ocus.ntk_batch=4"])
    result = run_experiment(cfg, progress=False)
    downs = {(m.round, m.client): decode(m.payload) for m in result.messages if m.direction == "down"}
    for m in result.messages:
        if m.direction != "up":
            continue
        mask = downs[(m.round, m.client)]["f3ocus.mask"].tolist()
        up = decode(m.payload)
        assert sum(mask) == 1
        assert {block_of(k) for k in up if ".experts." in k} == {b for b, on in enumerate(mask) if on}
        scores = up["f3ocus.scores"]
        assert scores.shape == (2,) and scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (result.run_dir / "selection.json").is_file() and (result.run_dir / "selection.png").is_file()
