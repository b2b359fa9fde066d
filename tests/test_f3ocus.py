"""F3OCUS: layer-wise NTK scores, multi-objective layer selection, training only what was chosen."""

import json
import re

import numpy as np
import pytest
import torch

from fedlrm.adapters import adapter_parameters
from fedlrm.algorithms import ClientRound, load_config
from fedlrm.algorithms.f3ocus import (
    F3OCUS,
    OPTIMIZERS,
    block_of,
    layer_of,
    ntk_scores,
    objectives,
    select_layers,
    units,
)
from fedlrm.errors import ConfigError
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


@pytest.mark.parametrize("unit", ["block", "layer"])
@pytest.mark.parametrize("classes", [None, [0, 2]])
def test_ntk_eigenvalue_equals_eigendecomposition_of_explicit_gram(tiny_clip_dir, classes, unit):
    """Over all logits, or only those of the classes a client holds (what clients send); per
    block, or per adapted layer (block 0's q_proj, its v_proj, block 1's ...)."""
    _, _, model = f3ocus_model(tiny_clip_dir)
    images = torch.randn(3, 3, 16, 16)
    scores = ntk_scores(model, images, classes, unit)
    params = {k: p for k, p in model.named_parameters() if ".experts." in k}
    logits = (model(images) if classes is None else model(images)[:, classes]).flatten()
    of = block_of if unit == "block" else layer_of
    expected_units = [0, 1] if unit == "block" else sorted({layer_of(k) for k in params})
    assert units(params, unit) == expected_units and len(expected_units) == (2 if unit == "block" else 4)
    if unit == "layer":  # each block's q_proj and v_proj apart
        assert [(b, path.rsplit(".", 1)[1]) for b, path in expected_units] == [
            (0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    eig = []
    for b in expected_units:
        mine = [p for k, p in params.items() if of(k) == b]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(out, mine, retain_graph=True)])
                for out in logits]  # one Jacobian row per (sample, class)
        J = torch.stack(rows).double()
        eig.append(torch.linalg.eigvalsh(J @ J.t()).max())
    expected = torch.stack(eig) / sum(eig)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)
    assert scores.sum().item() == pytest.approx(1.0)


def test_at_least_five_pymoo_algorithms_are_offered():
    assert len(OPTIMIZERS) >= 5 and {"nsga2", "nsga3", "smsemoa", "moead", "rvea", "ctaea"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("budget", [2, [1, 2, 3, 2, 1]], ids=["one-budget", "per-client"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_selection_respects_budget_and_is_pareto_optimal(optimizer, budget):
    """Every algorithm offered, MOEA/D (no constraint handling) included: every candidate it
    evaluated, and the one chosen, has exactly each client's budget, and nothing dominates it."""
    scores = np.random.default_rng(1).dirichlet(np.ones(6), size=5)
    picked = select_layers(scores, budget, optimizer, population=20, generations=10, seed=3)
    budgets = np.broadcast_to(budget, (5,))
    assert picked["masks"].shape == (5, 6) and (picked["masks"].sum(1) == budgets).all()
    assert (picked["evaluated_masks"].reshape(-1, 5, 6).sum(-1) == budgets).all()
    assert len(picked["evaluated"]) > 20  # it searched beyond the first population
    chosen = np.array(objectives(picked["masks"], scores, budget))
    np.testing.assert_allclose(chosen, picked["chosen"])
    evaluated = picked["evaluated"]  # (importance, diversity) of every candidate evaluated: maximised
    dominated = (evaluated >= chosen).all(1) & (evaluated > chosen).any(1)
    assert not dominated.any()
    for point in picked["front"]:
        assert not ((evaluated >= point).all(1) & (evaluated > point).any(1)).any()
    again = select_layers(scores, budget, optimizer, population=20, generations=10, seed=3)
    assert (again["masks"] == picked["masks"]).all()
    np.testing.assert_array_equal(again["evaluated"], picked["evaluated"])


def test_diversity_divides_each_pair_by_its_budgets():
    masks = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]])
    scores = np.full((3, 4), 0.25)
    importance, diversity = objectives(masks, scores, [1, 2, 3])
    assert importance == pytest.approx((1 + 2 + 3) * 0.25 / 3)
    assert diversity == pytest.approx((3 / 3 + 2 / 4 + 1 / 5) / 3)  # pairs (0,1), (0,2), (1,2)
    same = np.array([[1, 1, 0, 0], [0, 1, 1, 0]])
    assert objectives(same, scores[:2], 2)[1] == objectives(same, scores[:2], [2, 2])[1] == pytest.approx(2 / 4)


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


# ----------------------------------------------------------------------------- budgets per client
def test_per_client_budgets_bound_each_clients_mask():
    cfg = load_config(None, ["algorithm=f3ocus", "data.num_clients=4", "f3ocus.budgets=[1,3,2,4]",
                             "f3ocus.population=8", "f3ocus.generations=3"])
    algo = F3OCUS(cfg)
    weights = {f"image_encoder.encoder.layers.{b}.self_attn.q_proj.experts.global.A": torch.zeros(1)
               for b in range(4)}
    state = algo.init_server(weights)
    assert state.record.masks.sum(1).tolist() == [1, 3, 2, 4]
    for c, budget in enumerate([1, 3, 2, 4]):
        assert int(algo.message_for(state, c, 1)["f3ocus.mask"].sum()) == budget
    assert int(algo.newcomer_message(state, 1)["f3ocus.mask"].sum()) == cfg.method.budget  # f3ocus.budget (2)
    assert torch.equal(F3OCUS(cfg).init_server(weights).record.masks, state.record.masks)  # same seed, same choice


def test_budgets_drawn_from_a_distribution_are_seeded_and_within_bounds():
    def drawn(seed, *more):
        cfg = load_config(None, ["algorithm=f3ocus", "data.num_clients=30", "f3ocus.budget_distribution=uniform",
                                 "f3ocus.budget_min=2", f"seed={seed}", *more])
        return F3OCUS(cfg).client_budgets(6)

    first = drawn(1, "f3ocus.budget_max=4")
    assert len(first) == 30 and first.min() >= 2 and first.max() <= 4 and len(set(first.tolist())) == 3
    assert (drawn(1, "f3ocus.budget_max=4") == first).all()
    assert not (drawn(2, "f3ocus.budget_max=4") == first).all()
    assert drawn(1).max() <= 6 and drawn(1).max() > 4  # budget_max unset: up to every unit
    # the clients that train only: new ones (data.new_clients) get f3ocus.budget
    cfg = load_config(None, ["algorithm=f3ocus", "data.num_clients=5", "data.new_clients=2",
                             "f3ocus.budget_distribution=uniform"])
    assert len(F3OCUS(cfg).client_budgets(4)) == 3


@pytest.mark.parametrize("overrides,key", [
    (["data.num_clients=3", "f3ocus.budgets=[1,2]"], "f3ocus.budgets"),
    (["data.num_clients=3", "data.new_clients=1", "f3ocus.budgets=[1,2,1]"], "f3ocus.budgets"),  # 2 train
    (["data.num_clients=3", "f3ocus.budgets=[1,0,1]"], "f3ocus.budgets[1]"),
    (["data.num_clients=2", "f3ocus.budgets=[1,1]", "f3ocus.budget_distribution=uniform"], "f3ocus.budgets"),
    (["f3ocus.budget_distribution=normal"], "f3ocus.budget_distribution"),
    (["f3ocus.budget_distribution=uniform", "f3ocus.budget_min=0"], "f3ocus.budget_min"),
    (["f3ocus.budget_distribution=uniform", "f3ocus.budget_min=3", "f3ocus.budget_max=2"], "f3ocus.budget_max"),
    (["f3ocus.budget=0"], "f3ocus.budget"),
    (["f3ocus.unit=head"], "f3ocus.unit"),
    (["f3ocus.optimizer=pso"], "f3ocus.optimizer"),
    (["f3ocus.population=1"], "f3ocus.population"),
    (["model.target_layers=[0]", "data.num_clients=2", "f3ocus.budget=1", "f3ocus.budgets=[1,2]"],
     "f3ocus.budgets[1]"),
])
def test_bad_budget_settings_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}[ =]"):
        load_config(None, ["algorithm=f3ocus", *overrides])


def test_training_client_count_in_the_budgets_error():
    with pytest.raises(ConfigError, match=r"f3ocus.budgets has 3 budget\(s\), but the run has 2 training client"):
        load_config(None, ["algorithm=f3ocus", "data.num_clients=3", "data.new_clients=1", "f3ocus.budgets=[1,2,1]"])


@pytest.mark.parametrize("overrides,key,count", [
    (["f3ocus.budget=3"], "f3ocus.budget", "2 transformer block"),
    (["data.num_clients=2", "f3ocus.budget=1", "f3ocus.budgets=[1,3]"], "f3ocus.budgets[1]", "2 transformer block"),
    (["f3ocus.unit=layer", "f3ocus.budget=5"], "f3ocus.budget", "4 adapted layer"),
    (["f3ocus.unit=layer", "f3ocus.budget_distribution=uniform", "f3ocus.budget_max=5"], "f3ocus.budget_max",
     "4 adapted layer"),
])
def test_budgets_above_the_selectable_units_are_refused_once_the_model_is_built(tiny_clip_dir, overrides, key,
                                                                               count):
    with pytest.raises(ConfigError) as err:
        f3ocus_model(tiny_clip_dir, *overrides)
    assert str(err.value).startswith(key + "=") and count in str(err.value)
    f3ocus_model(tiny_clip_dir, "f3ocus.unit=layer", "f3ocus.budget=3")  # 3 of 4 layers: fine (2 blocks)


# ----------------------------------------------------------------------------- layer granularity
def test_a_layer_mask_trains_only_the_selected_layers(tiny_clip_dir):
    cfg, algo, model = f3ocus_model(tiny_clip_dir, "f3ocus.unit=layer")
    assert algo.report_schema(model)["f3ocus.scores"][0] == (4,)
    images = torch.randn(2, 3, 16, 16)
    layers = units(adapter_parameters(model), "layer")  # (0, q), (0, v), (1, q), (1, v)
    for mask in ([0, 1, 0, 0], [1, 0, 0, 1]):
        algo.receive(model, ClientRound(0, 1, {"f3ocus.mask": torch.tensor(mask)}))
        model(images).sum().backward()
        chosen = {u for u, on in zip(layers, mask) if on}
        for key, p in model.named_parameters():
            if ".experts." in key:
                assert (p.grad is not None) == (layer_of(key) in chosen), key
        assert set(algo.upload(model, [], None)) == {k for k, p in model.named_parameters()
                                                      if ".experts." in k and layer_of(k) in chosen}
        model.zero_grad(set_to_none=True)


def test_layer_unit_run_masks_uploads_and_aggregation_follow_layers(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=f3ocus", "f3ocus.unit=layer", "f3ocus.budgets=[1,2,3]",
                                              "f3ocus.budget=2", "f3ocus.population=8", "f3ocus.generations=3",
                                              "f3ocus.ntk_batch=4", "train.rounds=2"])
    result = run_experiment(cfg, progress=False)
    downs = {(m.round, m.client): decode(m.payload) for m in result.messages if m.direction == "down"}
    ups = {(m.round, m.client): decode(m.payload) for m in result.messages if m.direction == "up"}
    assert ups
    for (rnd, client), up in ups.items():
        mask = downs[(rnd, client)]["f3ocus.mask"].tolist()
        assert len(mask) == 4 and sum(mask) == [1, 2, 3][client]
        sent = sorted({layer_of(k) for k in downs[(rnd, client)] if ".experts." in k})
        assert {layer_of(k) for k in up if ".experts." in k} == {u for u, on in zip(sent, mask) if on}
        assert up["f3ocus.scores"].shape == (4,)
        assert up["f3ocus.scores"].sum().item() == pytest.approx(1.0, abs=1e-5)
    # round 2's message holds, for each weight, the mean over the round-1 uploads that trained it
    seen = set()
    for key, value in downs[(2, 0)].items():
        if ".experts." not in key:
            continue
        holders = [up for (rnd, _), up in ups.items() if rnd == 1 and key in up]
        seen.add(len(holders))
        if len(holders) == 1:
            torch.testing.assert_close(value, holders[0][key])
        elif not holders:
            torch.testing.assert_close(value, downs[(1, 0)][key])  # no one trained it: as it was
        else:  # a weighted mean of its trainers' uploads, of theirs only
            stacked = torch.stack([h[key] for h in holders])
            assert (value >= stacked.min(0).values - 1e-6).all() and (value <= stacked.max(0).values + 1e-6).all()
    assert 1 in seen  # budgets 1, 2, 3 of 4 layers: some layer has one trainer
    record = result.server_state.record  # a newcomer: the f3ocus.budget layers of highest mean score
    newcomer = F3OCUS(cfg).newcomer_message(result.server_state, 2)["f3ocus.mask"]
    top = torch.argsort(-record.scores.double().mean(0), stable=True)[:2]
    assert newcomer.shape == (4,) and newcomer.nonzero().flatten().tolist() == sorted(top.tolist())
    report = json.loads((result.run_dir / "selection.json").read_text())
    assert report["unit"] == "layer" and report["budgets"] == [1, 2, 3] and len(report["units"]) == 4
    assert report["units"][0] == "0.self_attn.q_proj"
