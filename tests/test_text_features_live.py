"""Class text features computed live (prompt learners, text LoRA): a frozen text tower draws no
dropout while a prompt trains, and features whose inputs have not changed are read from a cache
(pFedMoAP's received experts within a round, every role in evaluation) with the values a fresh
pass would give."""

from __future__ import annotations

import torch

from fedlrm.adapters import set_state
from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.federation.task import build_model, load_client
from fedlrm.models import load_backbone

NAMES = ["red", "green", "blue"]


def dual_overrides(tiny_dual_dir, tiny_overrides):
    # the tiny BERT keeps transformers' default dropout (0.1), as all-MiniLM-L6-v2 does
    return [o for o in tiny_overrides if not o.startswith("model.name=")] + [f"model.name={tiny_dual_dir}"]


def bundle_of(overrides):
    cfg = load_config(None, overrides)
    algorithm = get_algorithm(cfg)
    return cfg, algorithm, build_model(load_backbone(cfg.model), NAMES, cfg, algorithm)


def counting(model, monkeypatch) -> list[int]:
    """The number of prompts of every text-encoder pass from now on."""
    passes, encode = [], model.backbone.encode_text

    def counted(prompts, context=None):
        passes.append(len(prompts))
        return encode(prompts, context)

    monkeypatch.setattr(model.backbone, "encode_text", counted)
    return passes


def test_a_frozen_text_tower_draws_no_dropout_while_a_prompt_trains(tiny_dual_dir, tiny_overrides):
    cfg, _, bundle = bundle_of(dual_overrides(tiny_dual_dir, tiny_overrides) + ["algorithm=promptfl"])
    model = bundle.model
    text_model = model.backbone.text_tower()[0]
    assert text_model.config.hidden_dropout_prob > 0
    model.train()
    assert not text_model.training and not model.backbone.image_encoder.training  # neither holds a trainable weight
    assert model.prompt_context.training
    first, second = model.class_text_features(), model.class_text_features()
    assert first.requires_grad and torch.equal(first, second)  # the same prompt, the same features
    first.sum().backward()
    assert model.prompt_context.vectors().grad is not None
    frozen = [p for m in model.backbone.text_modules() for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)  # no gradient for frozen weights


def test_a_text_tower_with_lora_keeps_training_mode(tiny_dual_dir, tiny_overrides):
    cfg, _, bundle = bundle_of(dual_overrides(tiny_dual_dir, tiny_overrides)
                               + ["algorithm=fedavg", "model.adapt_encoders=[image,text]"])
    model = bundle.model.train()
    assert model.text_encoder[0].training and model.backbone.image_encoder.training


def test_pfedmoap_encodes_the_experts_it_received_once_per_round(tiny_dual_dir, tiny_overrides, monkeypatch):
    cfg, algorithm, bundle = bundle_of(dual_overrides(tiny_dual_dir, tiny_overrides)
                                       + ["algorithm=pfedmoap", "pfedmoap.experts=2", "pfedmoap.n_ctx=3"])
    model = bundle.model
    width = model.backbone.text_width()
    g = torch.Generator().manual_seed(0)
    received = {f"prompt_context.experts.e{j}.ctx": torch.randn(3, width, generator=g) for j in range(2)}
    load_client(bundle, algorithm, cfg, 0, {}, received, 2)
    passes = counting(model, monkeypatch)
    model.train()
    images = torch.rand(4, 3, 16, 16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):  # training steps: the own prompt changes, the received ones do not
        optimizer.zero_grad()
        model(images).logsumexp(-1).sum().backward()
        optimizer.step()
    assert passes == [3 * len(NAMES), len(NAMES), len(NAMES)]

    trained = model.role_text_features().detach()
    model._text_cache = {}
    torch.testing.assert_close(trained, model.role_text_features().detach())  # what a fresh pass gives

    model.eval()
    passes.clear()
    with torch.no_grad():
        cached = model(images)
        assert model(images).equal(cached)
    assert passes == [len(NAMES)]  # the own prompt, changed by the last step, once for all batches; the experts cached

    # the next round's experts: the cache follows the new weights
    new = {k: torch.randn(3, width, generator=g) for k in received}
    load_client(bundle, algorithm, cfg, 0, {}, new, 3)
    with torch.no_grad():
        after = model.role_text_features()
        model._text_cache = {}
        torch.testing.assert_close(after, model.role_text_features())
    assert not torch.allclose(after[1:], trained[1:])


def test_evaluation_reads_a_prompt_again_after_it_changes(tiny_dual_dir, tiny_overrides):
    cfg, _, bundle = bundle_of(dual_overrides(tiny_dual_dir, tiny_overrides) + ["algorithm=promptfl",
                                                                                 "promptfl.n_ctx=4"])
    model = bundle.model.eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images)
        set_state(model, {"prompt_context.experts.global.ctx": torch.randn(4, model.backbone.text_width())})
        assert not torch.allclose(before, model(images))
