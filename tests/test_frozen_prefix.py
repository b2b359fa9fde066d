"""Frozen-prefix caching and activation checkpointing change speed and memory, never results."""

from __future__ import annotations

import csv

import pytest
import torch

from fedlrm.algorithms import ALGORITHMS, ClientRound, load_config
from fedlrm.data import load_federated_data
from fedlrm.experiment import run_experiment
from fedlrm.federation.task import (
    build_model,
    initial_private,
    load_client,
    train_locally,
)
from fedlrm.models import load_backbone
from fedlrm.models.frozen_prefix import _CACHE, cacheable_start


@pytest.fixture
def deep_clip_dir(tmp_path_factory):
    from conftest import make_tiny_clip_dir

    return str(make_tiny_clip_dir(tmp_path_factory.mktemp("deep-clip"), layers=3))


def setup(overrides, *extra):
    cfg = load_config(None, [*overrides, *extra])
    backbone = load_backbone(cfg.model)
    data = load_federated_data(cfg.data, backbone.preprocess, cfg.seed)
    bundle = build_model(backbone, data.class_names, cfg, ALGORITHMS[cfg.algorithm](cfg))
    return cfg, bundle, data


@pytest.mark.parametrize("start", [1, 2, 3])
def test_two_part_forward_equals_the_full_forward(tiny_overrides, deep_clip_dir, start):
    _, bundle, data = setup(tiny_overrides, f"model.name={deep_clip_dir}")
    backbone = bundle.model.backbone
    images, _ = next(data.clients[0].train.batches(8))
    with torch.no_grad():
        full = backbone.image_features(images)
        parts = backbone.features_from(backbone.hidden_before(images, start), start)
    assert torch.equal(full, parts)


def local_training(overrides, cache: bool, *extra):
    cfg, bundle, data = setup(overrides, f"train.cache_frozen_features={cache}", "train.local_epochs=3", *extra)
    algorithm = ALGORITHMS[cfg.algorithm](cfg)
    split = data.clients[0]
    private = initial_private(bundle, algorithm, cfg, 0)
    shared = {k: v for k, v in bundle.model.state_dict().items() if k in set(bundle.shared_keys)}
    ctx = load_client(bundle, algorithm, cfg, 0, private, shared, 1)
    stats = train_locally(bundle.model, algorithm, split.train, ctx, cfg)
    return stats, {k: v.clone() for k, v in bundle.model.state_dict().items() if ".experts." in k or "mixer" in k}


@pytest.mark.parametrize("algorithm", ["fedlrm", "fedavg"])
def test_cached_local_training_equals_recomputing(tiny_overrides, deep_clip_dir, algorithm):
    args = (f"model.name={deep_clip_dir}", "model.target_layers=[2]", f"algorithm={algorithm}")
    cached, cached_state = local_training(tiny_overrides, True, *args)
    plain, plain_state = local_training(tiny_overrides, False, *args)
    assert cached.cached_from_block == 2 and plain.cached_from_block == 0
    assert cached.loss == plain.loss
    assert cached_state.keys() == plain_state.keys() and cached_state
    for key in cached_state:
        assert torch.equal(cached_state[key], plain_state[key]), key


def test_no_caching_with_augmentation_or_when_the_lowest_block_trains(tiny_overrides, deep_clip_dir):
    _, bundle, _ = setup(tiny_overrides, f"model.name={deep_clip_dir}", "model.target_layers=[2]")
    assert cacheable_start(bundle.model, augment=False) == 2
    assert cacheable_start(bundle.model, augment=True) == 0
    _, bundle, _ = setup(tiny_overrides, f"model.name={deep_clip_dir}")
    assert cacheable_start(bundle.model, augment=False) == 0


def test_cache_is_kept_across_rounds_only_for_pretrained_blocks(tiny_overrides, deep_clip_dir):
    """F3OCUS leaves adapters in unselected lower blocks, which change between rounds: a run
    with caching must equal one without, round after round."""
    args = [f"model.name={deep_clip_dir}", "algorithm=f3ocus", "f3ocus.budget=1", "f3ocus.population=8",
            "f3ocus.generations=3", "train.rounds=2"]
    results = []
    for cache in (True, False):
        cfg = load_config(None, [*tiny_overrides, *args, f"train.cache_frozen_features={cache}", f"name=c{cache}"])
        results.append(run_experiment(cfg, progress=False))
    assert results[0].summary["per_client_accuracy"] == results[1].summary["per_client_accuracy"]
    for key, value in results[0].server_state.weights.items():
        assert torch.equal(value, results[1].server_state.weights[key]), key


def test_frozen_prefix_is_computed_once_per_image_set(tiny_overrides, deep_clip_dir):
    args = (f"model.name={deep_clip_dir}", "model.target_layers=[2]")
    cfg, bundle, data = setup(tiny_overrides, *args)
    algorithm = ALGORITHMS[cfg.algorithm](cfg)
    train_set = data.clients[0].train
    calls = []
    original = bundle.model.backbone.hidden_before
    bundle.model.backbone.hidden_before = lambda *a: calls.append(1) or original(*a)
    for round_index in (1, 2):
        train_locally(bundle.model, algorithm, train_set, ClientRound(0, round_index, {}), cfg)
    assert len(calls) == -(-len(train_set) // cfg.train.batch_size)  # one pass over the set, not one per round
    assert bundle.model.backbone in _CACHE[train_set]


def test_activation_checkpointing_gives_the_same_training(tiny_overrides):
    on, on_state = local_training(tiny_overrides, False, "train.activation_checkpointing=true")
    off, off_state = local_training(tiny_overrides, False, "train.activation_checkpointing=false")
    assert on.loss == pytest.approx(off.loss, rel=1e-6)
    for key in on_state:
        torch.testing.assert_close(on_state[key], off_state[key], rtol=1e-5, atol=1e-6)


def test_rounds_record_compute_time_and_runner_overhead(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides), progress=False)
    with (result.run_dir / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        compute, wall, share = (float(row[k]) for k in ("compute_seconds", "wall_seconds", "overhead_share"))
        assert 0 < compute <= wall
        assert share == pytest.approx(1 - compute / wall)


def test_negative_target_layers_count_from_the_top(tiny_overrides, deep_clip_dir):
    _, top, _ = setup(tiny_overrides, f"model.name={deep_clip_dir}", "model.target_layers=[-1]")
    _, explicit, _ = setup(tiny_overrides, f"model.name={deep_clip_dir}", "model.target_layers=[2]")
    assert top.adapted_modules == explicit.adapted_modules
    assert all(".layers.2." in name for name in top.adapted_modules)


def test_auto_activation_checkpointing_is_on_for_vit_b16_and_off_for_small_models(tiny_overrides):
    from types import SimpleNamespace

    from transformers import CLIPVisionConfig

    from fedlrm.config import TrainConfig
    from fedlrm.federation.task import use_activation_checkpointing
    from fedlrm.models.backbone import HFClipBackbone

    def backbone(**sizes):
        fake = SimpleNamespace(image_encoder=SimpleNamespace(config=CLIPVisionConfig(**sizes)))
        fake.activation_bytes = lambda batch: HFClipBackbone.activation_bytes(fake, batch)
        fake.blocks = lambda: [None] * fake.image_encoder.config.num_hidden_layers
        return fake

    vit_b16 = backbone(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)
    small = backbone(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     image_size=32, patch_size=4)
    auto = TrainConfig()
    assert auto.activation_checkpointing is None
    assert use_activation_checkpointing(vit_b16, auto) and not use_activation_checkpointing(small, auto)
    assert use_activation_checkpointing(small, TrainConfig(activation_checkpointing=True))
    assert not use_activation_checkpointing(vit_b16, TrainConfig(activation_checkpointing=False))
    # only the top third trains: a third of the activations are kept, under the threshold
    assert not use_activation_checkpointing(vit_b16, auto, [-4, -3, -2, -1])
    assert not use_activation_checkpointing(vit_b16, auto, [8, 9, 10, 11])
    assert use_activation_checkpointing(vit_b16, auto, [2, 11])
