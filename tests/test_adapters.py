"""The LoRA layer, the FedLRM mixture and injection into real CLIP image encoders."""

import pytest
import torch
from torch import nn

from fedlrm.adapters import (
    AdaptedLinear,
    FixedMix,
    LoRAExpert,
    SoftmaxGate,
    TopMRouter,
    adapter_parameters,
    get_state,
    inject_adapters,
    only_expert,
    reset_adapters,
    set_state,
)
from fedlrm.algorithms import load_config
from fedlrm.config import ModelConfig
from fedlrm.errors import ModelError
from fedlrm.models import ClipClassifier, load_backbone
from fedlrm.params import count_parameters


def test_lora_starts_as_the_frozen_layer_and_has_the_right_shapes():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = AdaptedLinear(base, {"global": LoRAExpert(12, 7, rank=3, alpha=6)})
    x = torch.randn(4, 5, 12)
    assert torch.equal(layer(x), base(x))
    expert = layer.experts["global"]
    assert expert.A.shape == (3, 12) and expert.B.shape == (7, 3)
    assert torch.all(expert.B == 0) and expert.A.abs().max() <= 1 / 12 ** 0.5
    assert not base.weight.requires_grad and expert.A.requires_grad


def test_lora_output_is_scaled_low_rank_update():
    base = nn.Linear(6, 4)
    expert = LoRAExpert(6, 4, rank=2, alpha=8)
    with torch.no_grad():
        expert.B.normal_()
    layer = AdaptedLinear(base, {"global": expert})
    x = torch.randn(3, 6)
    expected = base(x) + 4.0 * x @ (expert.B @ expert.A).t()
    torch.testing.assert_close(layer(x), expected)


def test_sample_gate_gives_one_weight_pair_per_image_token_gate_one_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sample, token = SoftmaxGate(8, 2, "sample"), SoftmaxGate(8, 2, "token")
    with torch.no_grad():
        sample.proj.weight.normal_()
        token.proj.weight.copy_(sample.proj.weight)
    ws, wt = sample(x), token(x)
    assert ws.shape == (2, 1, 2) and wt.shape == (2, 5, 2)
    torch.testing.assert_close(ws.sum(-1), torch.ones(2, 1))
    torch.testing.assert_close(wt.sum(-1), torch.ones(2, 5))
    expected = torch.softmax(x.mean(1) @ sample.proj.weight.t(), -1)
    torch.testing.assert_close(ws[:, 0], expected)
    assert not torch.allclose(wt[:, 0], wt[:, 1])
    with pytest.raises(ValueError):
        SoftmaxGate(8, 2, "image")


def test_mixture_is_gate_weighted_sum_of_experts_and_only_expert_isolates_one():
    torch.manual_seed(1)
    base = nn.Linear(8, 8)
    g, l = LoRAExpert(8, 8, 4, 4), LoRAExpert(8, 8, 2, 2)
    gate = SoftmaxGate(8, 2, "sample")
    with torch.no_grad():
        g.B.normal_(), l.B.normal_(), gate.proj.weight.normal_()
    layer = AdaptedLinear(base, {"global": g, "local": l}, gate)
    x = torch.randn(3, 4, 8)
    w = gate(x)
    expected = base(x) + w[..., :1] * g(x) + w[..., 1:] * l(x)
    torch.testing.assert_close(layer(x), expected)
    with only_expert(layer, "global"):
        torch.testing.assert_close(layer(x), base(x) + g(x))
    torch.testing.assert_close(layer(x), expected)  # restored afterwards


@pytest.mark.parametrize("mixer", [SoftmaxGate(8, 3, "token"), TopMRouter(8, 3), FixedMix([0.2, 0.3, 0.5])])
def test_stacked_experts_give_the_per_expert_sum_and_its_gradients(mixer):
    """The layer computes the mixture as one product of the stacked experts; values and
    gradients must equal the sum over experts with their own ranks and scalings."""
    torch.manual_seed(2)
    base = nn.Linear(8, 6)
    experts = {"a": LoRAExpert(8, 6, 4, 8.0), "b": LoRAExpert(8, 6, 2, 1.0), "c": LoRAExpert(8, 6, 1, 3.0)}
    with torch.no_grad():
        for e in experts.values():
            e.B.normal_()
        for p in mixer.parameters():
            p.normal_()
    layer = AdaptedLinear(base, experts, mixer)
    x = torch.randn(3, 5, 8)
    fused = layer(x)
    w = mixer(x)
    looped = base(x) + sum(w[..., i:i + 1] * e(x) for i, e in enumerate(experts.values()))
    torch.testing.assert_close(fused, looped)
    params = [p for e in experts.values() for p in (e.A, e.B)]
    g_fused = torch.autograd.grad(fused.square().sum(), params)
    g_loop = torch.autograd.grad(looped.square().sum(), params)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b)


def test_fixed_mix_is_apfl_half_and_half():
    base = nn.Linear(4, 4)
    g, l = LoRAExpert(4, 4, 2, 2), LoRAExpert(4, 4, 2, 2)
    with torch.no_grad():
        g.B.normal_(), l.B.normal_()
    layer = AdaptedLinear(base, {"global": g, "local": l}, FixedMix([0.5, 0.5]))
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), base(x) + 0.5 * g(x) + 0.5 * l(x))


@pytest.mark.parametrize("rank,expected", [(1, 36_864), (4, 55_296), (16, 129_024)])
def test_paper_table1_parameter_counts(rank, expected):
    rows = count_parameters(load_config(), [rank], 4, "fedlrm", layers=12, dim=256)
    assert rows[0]["trainable"] == expected
    assert rows[0]["full_finetune"] == 786_432
    assert rows[0]["uploaded"] == 12 * 2 * 256 * rank  # the global expert only


def test_hf_clip_q_v_adapters_on_every_block(tiny_clip_dir):
    backbone = load_backbone(ModelConfig(name=tiny_clip_dir))
    classifier = ClipClassifier(backbone, ["red", "green", "blue"])
    x = torch.randn(2, 3, 16, 16)
    frozen = classifier(x)
    adapted = inject_adapters(classifier.image_encoder, ["q_proj", "v_proj"],
                              lambda lin: AdaptedLinear(lin, {"global": LoRAExpert(lin.in_features,
                                                                                   lin.out_features, 2, 2)}))
    assert sorted(adapted) == ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj",
                               "encoder.layers.1.self_attn.q_proj", "encoder.layers.1.self_attn.v_proj"]
    assert frozen.shape == (2, 3)
    torch.testing.assert_close(classifier(x), frozen)  # B = 0: still the frozen model
    params = adapter_parameters(classifier)
    assert sum(p.numel() for p in params.values()) == 4 * (2 * 32 + 32 * 2)
    trainable = [n for n, p in classifier.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(params)  # nothing but adapters trains


def test_target_layers_and_unknown_targets(tiny_clip_dir):
    backbone = load_backbone(ModelConfig(name=tiny_clip_dir))
    make = lambda lin: AdaptedLinear(lin, {"global": LoRAExpert(lin.in_features, lin.out_features, 2, 2)})
    adapted = inject_adapters(backbone.image_encoder, ["q_proj"], make, target_layers=[1])
    assert adapted == ["encoder.layers.1.self_attn.q_proj"]
    with pytest.raises(ModelError, match="q_projection.*k_proj"):
        inject_adapters(backbone.image_encoder, ["q_projection"], make)


def test_state_roundtrip_and_seeded_reset():
    model = nn.Sequential()
    model.add_module("fc", AdaptedLinear(nn.Linear(5, 5), {"global": LoRAExpert(5, 5, 2, 2)}))
    reset_adapters(model, 7)
    a = get_state(model)
    reset_adapters(model, 8)
    assert not torch.equal(get_state(model)["fc.experts.global.A"], a["fc.experts.global.A"])
    reset_adapters(model, 7)
    assert all(torch.equal(v, get_state(model)[k]) for k, v in a.items())
    with pytest.raises(KeyError):
        set_state(model, {"fc.experts.local.A": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="shape"):
        set_state(model, {"fc.experts.global.A": torch.zeros(3, 5)})


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        load_backbone(ModelConfig(name=str(tmp_path / "nope")))
