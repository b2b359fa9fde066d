"""A text side that trains: CoOp's prompt context (promptfl) and LoRA on the text encoder
(`model.adapt_encoders=[image, text]`), with class text features computed live, and cached
when only the image side trains."""

from __future__ import annotations

import pytest
import torch

from fedlrm.adapters import adapted_layers, adapter_parameters, get_state, set_state
from fedlrm.algorithms import check, get_algorithm, load_config
from fedlrm.errors import ConfigError
from fedlrm.experiment import run_experiment
from fedlrm.federation.task import build_model
from fedlrm.models import load_backbone


def bundle_of(overrides):
    cfg = load_config(None, overrides)
    algorithm = get_algorithm(cfg)
    return cfg, build_model(load_backbone(cfg.model), ["red", "green", "blue"], cfg, algorithm)


def test_a_context_equal_to_the_placeholders_embeddings_gives_the_fixed_prompts_features(tiny_overrides):
    """The context takes exactly the positions of the placeholder words: set to their own
    embeddings, the features are those of the plain prompts."""
    cfg, bundle = bundle_of(tiny_overrides + ["algorithm=promptfl", "promptfl.n_ctx=3"])
    model = bundle.model
    context = model.prompt_context
    text_model = model.backbone.text_tower()[0]
    tokenizer = model.backbone._tokenizer
    prompts = [context.template(n) for n in model.class_names]
    placeholder = tokenizer(prompts[0])["input_ids"][1]
    with torch.no_grad():
        embedded = text_model.embeddings.token_embedding.weight[placeholder].expand(3, -1).clone()
        torch.testing.assert_close(model.backbone.encode_text(prompts, embedded),
                                   model.backbone.text_features(prompts))
        other = model.backbone.encode_text(prompts, torch.randn(3, context.width))
    assert not torch.allclose(other, model.backbone.text_features(prompts))


def test_promptfl_trains_only_the_context_and_its_logits_follow_it(tiny_overrides):
    cfg, bundle = bundle_of(tiny_overrides + ["algorithm=promptfl", "promptfl.n_ctx=4"])
    model = bundle.model
    assert not list(adapted_layers(model)) and model.text_trains
    assert bundle.shared_keys == ["prompt_context.experts.global.ctx"] and bundle.private_keys == []
    assert adapter_parameters(model)["prompt_context.experts.global.ctx"].shape == (4, model.backbone.text_width())
    images = torch.rand(2, 3, 16, 16)
    before = model(images)
    set_state(model, {"prompt_context.experts.global.ctx": torch.randn(4, model.backbone.text_width())})
    assert not torch.allclose(before, model(images))  # computed from the context, not from a cache
    with model.classifying_over([2, 0]):
        assert model(images).shape == (2, 2)
    logits = model(images)
    logits.sum().backward()
    grads = {k: p.grad for k, p in adapter_parameters(model).items()}
    assert grads["prompt_context.experts.global.ctx"] is not None
    assert all(p.grad is None for p in model.backbone.parameters())  # both encoders stay frozen


def test_text_lora_adapts_the_text_encoders_layers_and_starts_from_the_frozen_features(tiny_overrides):
    cfg, bundle = bundle_of(tiny_overrides + ["algorithm=fedavg", "model.adapt_encoders=[image,text]"])
    model = bundle.model
    text_keys = [k for k in bundle.shared_keys if k.startswith("text_encoder.")]
    image_keys = [k for k in bundle.shared_keys if k.startswith("backbone.image_encoder.")]
    text_blocks = model.backbone.text_tower()[0].config.num_hidden_layers
    assert len(text_keys) == 2 * 2 * text_blocks  # (A, B) x (q, v) x blocks
    assert len(image_keys) == 2 * 2 * len(model.backbone.blocks())
    assert model.text_trains
    torch.testing.assert_close(model.class_text_features(), model.text_features)  # B = 0: the frozen model
    state = get_state(model)
    set_state(model, {k: torch.randn_like(v) for k, v in state.items() if k in text_keys})
    assert not torch.allclose(model.class_text_features(), model.text_features)


def test_an_image_only_model_reads_its_class_features_from_the_cache(tiny_overrides, monkeypatch):
    cfg, bundle = bundle_of(tiny_overrides + ["algorithm=fedavg"])
    model = bundle.model
    assert not model.text_trains and model.text_encoder is None
    calls = []
    monkeypatch.setattr(model.backbone, "encode_text", lambda *a, **k: calls.append(a))
    model(torch.rand(2, 3, 16, 16))
    assert calls == []


@pytest.mark.parametrize("algorithm", ["promptfl", "fedlrm"])
def test_a_run_with_a_text_side_resumes_to_the_uninterrupted_result_and_exports(tiny_overrides, algorithm):
    from fedlrm.experiment import resume_experiment
    from fedlrm.federation.export import load_personalized

    extra = [f"algorithm={algorithm}", "train.rounds=2"] + (["model.adapt_encoders=[image,text]"]
                                                            if algorithm != "promptfl" else [])
    whole = run_experiment(load_config(None, tiny_overrides + extra + ["name=whole"]), progress=False)
    cut = run_experiment(load_config(None, tiny_overrides + extra + ["name=cut"]), progress=False, stop_after_round=1)
    resumed = resume_experiment(cut.run_dir, progress=False)
    assert resumed.summary["per_client_accuracy"] == whole.summary["per_client_accuracy"]
    for k, v in whole.server_state.weights.items():
        torch.testing.assert_close(resumed.server_state.weights[k], v)
    assert any(k.startswith(("text_encoder.", "prompt_context.")) for k in whole.server_state.weights)
    model = load_personalized(whole.run_dir / "adapters" / "client_00")
    assert model.text_trains
    exported = {k: v for k, v in get_state(model).items() if k.startswith(("text_encoder.", "prompt_context."))}
    assert exported and all(torch.equal(v, whole.server_state.weights[k]) for k, v in exported.items()
                            if k in whole.server_state.weights)


def test_text_settings_that_cannot_work_are_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="model.adapt_encoders"):
        load_config(None, tiny_overrides + ["model.adapt_encoders=[image,audio]"]).check_shared()
    with pytest.raises(ConfigError, match="f3ocus .*text encoder"):
        check(load_config(None, tiny_overrides + ["algorithm=f3ocus", "model.adapt_encoders=[image,text]"]))
    with pytest.raises(ConfigError, match="promptfl.n_ctx"):
        check(load_config(None, tiny_overrides + ["algorithm=promptfl", "promptfl.n_ctx=0"]))


@pytest.mark.parametrize("algorithm", ["local", "fedavg", "fedprox", "apfl", "fedlrm", "fedlease", "fedpia"])
def test_every_lora_method_adapts_the_text_encoder_when_asked(tiny_overrides, algorithm):
    from fedlrm.algorithms import ALGORITHMS

    own = [f"{algorithm}.{k}={v}" for k, v in ALGORITHMS[algorithm].quick_settings.items()]
    cfg = load_config(None, tiny_overrides + [f"algorithm={algorithm}", "train.rounds=2",
                                              "model.adapt_encoders=[image,text]", *own])
    result = run_experiment(cfg, progress=False)
    assert result.summary["rejected_updates"] == 0
    kept = set(result.server_state.weights) | set(result.client_states[0])
    assert any(k.startswith("text_encoder.") for k in kept)
    uploads = [m for m in result.messages if m.direction == "up" and m.keys]
    if uploads:  # what a client shares of its text side crosses like its image side
        assert any(k.startswith("text_encoder.") for m in uploads for k in m.keys)


def test_promptfl_computes_its_frozen_image_features_once_and_trains_exactly_as_without(tiny_overrides):
    from fedlrm.models.frozen_prefix import cacheable_start

    cfg, bundle = bundle_of(tiny_overrides + ["algorithm=promptfl"])
    assert cacheable_start(bundle.model, augment=False) == len(bundle.model.backbone.blocks())
    runs = [run_experiment(load_config(None, tiny_overrides + ["algorithm=promptfl", "train.rounds=2", f"name={n}",
                                                            f"train.cache_frozen_features={c}"]), progress=False)
            for n, c in (("cached", "true"), ("uncached", "false"))]
    cached, uncached = (r.server_state.weights["prompt_context.experts.global.ctx"] for r in runs)
    torch.testing.assert_close(cached, uncached)
    assert runs[0].summary["per_client_accuracy"] == runs[1].summary["per_client_accuracy"]
