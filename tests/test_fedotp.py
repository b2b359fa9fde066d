"""FedOTP: two prompts per client scored against the image's patch tokens through optimal transport."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from fedlrm.adapters import adapter_parameters, only_expert, set_state
from fedlrm.algorithms import check, get_algorithm, load_config
from fedlrm.algorithms.fedotp import FedOTPSettings, partial_plans, transport_plans
from fedlrm.errors import ConfigError
from fedlrm.experiment import run_experiment
from fedlrm.federation.task import build_model
from fedlrm.models import load_backbone


def costs(batch=5, patches=16, prompts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(batch, patches, 8, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(batch, prompts, 8, generator=g, dtype=torch.float64), dim=-1)
    return 1 - f @ t.transpose(1, 2)


def test_the_batched_partial_plans_are_pots_entropic_partial_transport():
    """Each problem of the batch is solved as POT solves it alone: patches send at most 1/M each,
    the prompts receive `mass` in all, half each."""
    cost = costs()
    mass, eps = 0.8, 0.1
    plans = partial_plans(cost, mass, eps, max_iter=5000, tol=1e-13)
    m, r = cost.shape[1:]
    for i in range(cost.shape[0]):
        ref = ot.partial.entropic_partial_wasserstein(np.full(m, 1 / m), np.full(r, mass / r), cost[i].numpy(), eps,
                                                      m=mass, numItermax=10000, stopThr=1e-15)
        np.testing.assert_allclose(plans[i].numpy(), ref, atol=1e-9)
    assert torch.all(plans.sum(2) <= 1 / m + 1e-12)
    torch.testing.assert_close(plans.sum(1), torch.full((cost.shape[0], r), mass / r, dtype=torch.float64))


def test_the_balanced_plans_are_sinkhorns():
    cost = costs(seed=1)
    settings = FedOTPSettings(transport="balanced", max_iter=5000, tol=1e-12)
    plans = transport_plans(cost, settings)
    m, r = cost.shape[1:]
    for i in range(cost.shape[0]):
        ref = ot.sinkhorn(np.full(m, 1 / m), np.full(r, 1 / r), cost[i].numpy(), settings.eps, numItermax=10000,
                          stopThr=1e-14)
        np.testing.assert_allclose(plans[i].numpy(), ref, atol=1e-9)


def test_a_mass_of_one_makes_the_unbalanced_transport_balanced():
    cost = costs(seed=2)
    balanced = transport_plans(cost, FedOTPSettings(transport="balanced", max_iter=5000, tol=1e-12))
    torch.testing.assert_close(partial_plans(cost, 1.0, 0.1, 5000, 1e-12), balanced, atol=1e-8, rtol=0)


def test_token_features_are_the_pooled_feature_first_and_the_frozen_prefix_gives_the_same(tiny_clip_dir):
    backbone = load_backbone(load_config(None, [f"model.name={tiny_clip_dir}"]).model)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        tokens = backbone.token_features(images)
        torch.testing.assert_close(tokens[:, 0], backbone.image_features(images))
        torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]))
        for start in (1, len(backbone.blocks())):
            torch.testing.assert_close(backbone.token_features_from(backbone.hidden_before(images, start), start), tokens)


def fedotp_bundle(tiny_overrides, *extra):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedotp", "fedotp.n_ctx=3", *extra])
    algorithm = get_algorithm(cfg)
    return cfg, algorithm, build_model(load_backbone(cfg.model), ["red", "green", "blue"], cfg, algorithm)


def test_fedotp_trains_two_contexts_and_scores_by_the_transported_patch_similarity(tiny_overrides):
    # converged plans (a batch stops when its slowest problem has), so one problem alone gives the same
    cfg, algorithm, bundle = fedotp_bundle(tiny_overrides, "fedotp.max_iter=2000", "fedotp.tol=1e-10")
    model = bundle.model
    width = model.backbone.text_width()
    assert bundle.shared_keys == ["prompt_context.experts.global.ctx"]
    assert bundle.private_keys == ["prompt_context.experts.local.ctx"]
    g = torch.Generator().manual_seed(0)
    set_state(model, {k: torch.randn(3, width, generator=g) for k in bundle.shared_keys + bundle.private_keys})
    images = torch.rand(4, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (4, 3)

    # the same score by hand: the plan between 64 patches and the two prompts of each class
    with torch.no_grad():
        patches = model.backbone.token_features(images)[:, 1:]
        text = model.role_text_features()
        assert text.shape == (2, 3, model.text_features.shape[1])
        sim = torch.einsum("bmd,rkd->bkmr", patches, text)
        expected = torch.empty(4, 3)
        for b in range(4):
            for k in range(3):
                plan = partial_plans((1 - sim[b, k]).unsqueeze(0), 0.8, 0.1, cfg.methods["fedotp"].max_iter,
                                     cfg.methods["fedotp"].tol)[0]
                expected[b, k] = model.backbone.logit_scale * (plan * sim[b, k]).sum()
    torch.testing.assert_close(logits.detach(), expected)

    logits.sum().backward()
    grads = {k: p.grad for k, p in adapter_parameters(model).items()}
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in bundle.shared_keys + bundle.private_keys)
    assert all(p.grad is None for p in model.backbone.parameters())  # both encoders stay frozen

    # the local context changes a client's logits; the global model does not see it
    with only_expert(model, "global"):
        global_logits = model(images).detach()
        assert model.role_text_features().shape[0] == 1
    set_state(model, {bundle.private_keys[0]: torch.randn(3, width, generator=g)})
    assert not torch.allclose(model(images).detach(), logits.detach())
    with algorithm.global_view(model):
        torch.testing.assert_close(model(images).detach(), global_logits)
    with model.classifying_over([2, 0]):
        assert model(images).shape == (4, 2)


def test_the_global_model_with_balanced_transport_scores_by_the_mean_patch_similarity(tiny_overrides):
    """One prompt, balanced: every patch sends 1/M to it, so the score is the mean cosine."""
    cfg, algorithm, bundle = fedotp_bundle(tiny_overrides, "fedotp.transport=balanced")
    model = bundle.model
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), algorithm.global_view(model):
        patches = model.backbone.token_features(images)[:, 1:]
        text = model.role_text_features()[0]
        expected = model.backbone.logit_scale * (patches @ text.t()).mean(dim=1)
        torch.testing.assert_close(model(images), expected)


def test_fedotp_lowers_its_training_loss_over_rounds(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides + ["algorithm=fedotp", "train.rounds=4",
                                                                "train.local_epochs=2", "train.lr=0.05"]), progress=False)
    loss = {r: sum(row["train_loss"] for row in result.client_rows if row["round"] == r and row["sampled"])
            for r in (1, 4)}
    assert loss[4] < loss[1]
    assert result.summary["global_accuracy"] is not None


@pytest.mark.parametrize("override, named", [
    ("fedotp.transport=partial", "fedotp.transport"), ("fedotp.mass=0", "fedotp.mass"),
    ("fedotp.mass=1.5", "fedotp.mass"), ("fedotp.eps=0", "fedotp.eps"), ("fedotp.n_ctx=0", "fedotp.n_ctx"),
    ("fedotp.max_iter=0", "fedotp.max_iter"), ("model.backend=open_clip", "model.backend=hf"),
])
def test_bad_fedotp_settings_are_refused_by_name(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check(load_config(None, ["algorithm=fedotp", override]))
