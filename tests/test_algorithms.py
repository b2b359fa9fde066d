"""The algorithm contract: aggregation, the FedProx term, what each method shares."""

import pytest
import torch
from torch import nn

from fedlrm.adapters import adapter_parameters, inject_adapters
from fedlrm.algorithms import ALGORITHMS, Upload, weighted_mean
from fedlrm.config import load_config
from fedlrm.params import SyntheticEncoder


def test_weighted_mean_matches_hand_computation():
    uploads = [Upload(0, {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[3.0]])}, 10),
               Upload(1, {"w": torch.tensor([4.0, 0.0]), "v": torch.tensor([[1.0]])}, 30),
               Upload(2, {"w": torch.tensor([0.0, 8.0]), "v": torch.tensor([[-2.0]])}, 60)]
    mean = weighted_mean(uploads)
    # by hand: weights 0.1, 0.3, 0.6
    torch.testing.assert_close(mean["w"], torch.tensor([0.1 * 1 + 0.3 * 4 + 0.0, 0.1 * 2 + 0.0 + 0.6 * 8]))
    torch.testing.assert_close(mean["v"], torch.tensor([[0.3 + 0.3 - 1.2]]))
    with pytest.raises(ValueError):
        weighted_mean([Upload(0, {"w": torch.zeros(1)}, 0)])


def build(name, **adapter):
    cfg = load_config(None, [f"algorithm={name}"] + [f"adapter.{k}={v}" for k, v in adapter.items()])
    algo = ALGORITHMS[name](cfg)
    model = SyntheticEncoder(2, 8)
    if algo.trains:
        inject_adapters(model, ["proj"], algo.make_layer)
    return algo, model


@pytest.mark.parametrize("name,shared_roles,private_roles", [
    ("zeroshot", set(), set()),
    ("local", set(), {"experts.local.A", "experts.local.B"}),
    ("fedavg", {"experts.global.A", "experts.global.B"}, set()),
    ("fedprox", {"experts.global.A", "experts.global.B"}, set()),
    ("apfl", {"experts.global.A", "experts.global.B"}, {"experts.local.A", "experts.local.B"}),
    ("fedlrm", {"experts.global.A", "experts.global.B"}, {"experts.local.A", "experts.local.B",
                                                          "mixer.proj.weight"}),
])
def test_what_each_algorithm_shares_and_keeps(name, shared_roles, private_roles):
    algo, model = build(name)
    keys = list(adapter_parameters(model))
    role = lambda k: k.split(".", 3)[-1]  # layers.0.proj.<role>
    assert {role(k) for k in keys if algo.is_shared(k)} == shared_roles
    assert {role(k) for k in keys if not algo.is_shared(k)} == private_roles


def test_fedlrm_local_expert_has_the_local_rank_and_gate_has_no_bias():
    algo, model = build("fedlrm", rank=6, local_rank=4)
    layer = model.layers[0]["proj"]
    assert layer.experts["global"].A.shape == (6, 8) and layer.experts["local"].A.shape == (4, 8)
    assert layer.mixer.proj.bias is None and layer.mixer.proj.weight.shape == (2, 8)


def test_fedprox_term_is_half_mu_squared_distance():
    algo, model = build("fedprox")
    algo.cfg.train.prox_mu = 0.5
    params = adapter_parameters(model)
    received = {k: p.detach().clone() for k, p in params.items()}
    assert algo.regularizer(model, received).item() == 0.0
    shifted = {k: v + 2.0 for k, v in received.items()}
    expected = 0.5 * 0.5 * sum(4.0 * v.numel() for v in received.values())
    assert algo.regularizer(model, shifted).item() == pytest.approx(expected)
    assert ALGORITHMS["fedavg"](algo.cfg).regularizer(model, shifted) is None


def test_global_view_of_mixtures_uses_the_global_expert_alone():
    for name in ("apfl", "fedlrm"):
        algo, model = build(name)
        for _, p in adapter_parameters(model).items():
            nn.init.normal_(p)
        x = torch.randn(3, 8)
        layer = model.layers[0]["proj"]
        with algo.global_view(model):
            torch.testing.assert_close(layer(x), layer.base(x) + layer.experts["global"](x))
