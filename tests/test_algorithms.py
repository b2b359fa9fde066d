"""The algorithm contract: what each method shares, keeps and sends; aggregation; registering
a new algorithm with a setting of its own."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedlrm.adapters import AdaptedLinear, adapter_parameters, inject_adapters
from fedlrm.algorithms import (
    ALGORITHMS,
    Algorithm,
    ServerState,
    Upload,
    load_config,
    register,
    unregister,
    weighted_mean,
)
from fedlrm.cli import main
from fedlrm.config import to_yaml
from fedlrm.errors import ConfigError
from fedlrm.experiment import resume_experiment, run_experiment
from fedlrm.federation.wire import decode
from fedlrm.params import SyntheticEncoder

GLOBAL = {"experts.global.A", "experts.global.B"}
LOCAL = {"experts.local.A", "experts.local.B"}
CLUSTER_EXPERTS = {"experts.e*.A", "experts.e*.B"}

# What every method's clients keep at the end of a run (`private`) and what crosses, by role (a
# weight's name without its layer; cluster experts numbered *). `down`: what clients receive;
# `up`: what they send.
CONTRACT = {
    "zeroshot": dict(private=set(), down=set(), up=set()),
    "local": dict(private=LOCAL, down=set(), up=set()),
    "fedavg": dict(private=set(), down=GLOBAL, up=GLOBAL),
    "fedprox": dict(private=set(), down=GLOBAL, up=GLOBAL),
    "apfl": dict(private=LOCAL, down=GLOBAL, up=GLOBAL),
    "fedlrm": dict(private=LOCAL | {"mixer.proj.weight"}, down=GLOBAL, up=GLOBAL),
    # warm-up: the local LoRA goes up, nothing comes down; then all cluster experts and the
    # client's cluster and that cluster's router come down, and its own cluster's expert and its
    # router go up (the official variant: routers are averaged within each cluster)
    "fedlease": dict(private=set(), down=CLUSTER_EXPERTS | {"fedlease.cluster", "mixer.proj.weight"},
                     up=LOCAL | CLUSTER_EXPERTS | {"mixer.proj.weight"}),
    # its private LoRA goes up under the global name, aligned and integrated on the server
    "fedpia": dict(private=LOCAL, down=GLOBAL, up=GLOBAL),
    "f3ocus": dict(private=set(), down=GLOBAL | {"f3ocus.mask"}, up=GLOBAL | {"f3ocus.scores"}),
    # CoOp's context vectors, averaged by the server; no LoRA anywhere
    "promptfl": dict(private=set(), down={"experts.global.ctx"}, up={"experts.global.ctx"}),
    # a global context averaged by the server, a local one that stays
    "fedotp": dict(private={"experts.local.ctx"}, down={"experts.global.ctx"}, up={"experts.global.ctx"}),
    # its own context goes up under its own name and comes down to others as a fixed expert; its gate stays
    "pfedmoap": dict(private={"experts.local.ctx", "prompt_context.gate.query.weight", "prompt_context.gate.key.weight"},
                     down={"experts.e*.ctx"}, up={"pfedmoap.prompt"}),
}


def role(key: str) -> str:
    for mark in (".experts.", ".mixer."):
        if mark in key:
            return re.sub(r"experts\.e\d+\.", "experts.e*.", mark[1:] + key.split(mark, 1)[1])
    return key


def quick(name: str, overrides: list[str], *extra: str):
    """A seconds-long run of `name`, with the fast settings the method declares for itself."""
    own = [f"{name}.{k}={v}" for k, v in ALGORITHMS[name].quick_settings.items()]
    return load_config(None, overrides + [f"algorithm={name}", *own, *extra])


def test_the_contract_table_covers_the_papers_methods():
    assert set(CONTRACT) <= set(ALGORITHMS)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_keeps_sends_and_resumes_as_its_contract_says(tiny_overrides, name):
    """For every registered algorithm: no honest upload is refused, private weights never cross,
    the bytes recorded are those that crossed, and a run cut after round 1 and resumed from its
    checkpoint (weights, the method's typed record, private states) equals the uninterrupted
    one. For the paper's methods, what is kept and what crosses is the table's."""
    schedule = ["train.rounds=2", "train.client_fraction=0.67"]
    full = run_experiment(quick(name, tiny_overrides, "name=full", *schedule), progress=False)
    assert full.rejections == [] and full.summary["rejected_updates"] == 0
    check_what_crossed(name, full)
    cut = run_experiment(quick(name, tiny_overrides, "name=cut", *schedule), progress=False, stop_after_round=1)
    resumed = resume_experiment(cut.run_dir, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(resumed.client_rows) == strip(full.client_rows)
    assert resumed.server_state.weights.keys() == full.server_state.weights.keys()
    for key, value in full.server_state.weights.items():
        assert torch.equal(value, resumed.server_state.weights[key]), key
    assert same_record(resumed.server_state.record, full.server_state.record)
    for c, state in full.client_states.items():
        assert all(torch.equal(v, resumed.client_states[c][k]) for k, v in state.items())


def check_what_crossed(name: str, result) -> None:
    # what the clients that trained in the last round keep (one left out keeps an older layout)
    last = max(row["round"] for row in result.client_rows)
    trained = {row["client"] for row in result.client_rows if row["round"] == last and row["sampled"]} or \
        set(result.client_states)
    private = {k for c in trained for k in result.client_states[c]}
    down = [m for m in result.messages if m.direction == "down"]
    up = [m for m in result.messages if m.direction == "up"]
    crossed = {k for m in result.messages for k in m.keys}
    assert not private & crossed, "a client's private weights never cross, under their own name"
    if name in CONTRACT:
        expected = CONTRACT[name]
        assert {role(k) for k in private} == expected["private"]
        assert {role(k) for m in down for k in m.keys} == expected["down"]
        assert {role(k) for m in up for k in m.keys} == expected["up"]
    for row in result.client_rows:
        for direction in ("up", "down"):
            sent = [m for m in result.messages if (m.round, m.client, m.direction) == (row["round"], row["client"],
                                                                                       direction)]
            assert row[f"bytes_{direction}"] == sum(len(m.payload) for m in sent)
    assert result.summary["uploaded"] == max((sum(v.numel() for v in decode(m.payload).values()) for m in up),
                                             default=0)
    assert (result.summary["global_accuracy"] is not None) == ALGORITHMS[name].has_global_model
    if not ALGORITHMS[name].trains:
        assert [r["round"] for r in result.round_rows] == [0] and result.summary["trainable"] == 0


def same_record(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # equal, NaN where NaN (FedLEASE's distances to unseen clients)
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all()))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same_record(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_record(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_record(x, y) for x, y in zip(a, b))
    return a == b


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


def build(name, *overrides):
    cfg = load_config(None, [f"algorithm={name}", *overrides])
    algo = ALGORITHMS[name](cfg)
    model = SyntheticEncoder(2, 8)
    if algo.trains:
        layout = algo.layout_of({})
        inject_adapters(model, ["proj"], lambda linear: algo.make_layer(linear, layout))
    return algo, model


def test_fedlrm_local_expert_has_its_own_rank_and_the_gate_has_no_bias():
    algo, model = build("fedlrm", "adapter.rank=6", "fedlrm.local_rank=4")
    layer = model.layers[0]["proj"]
    assert layer.experts["global"].A.shape == (6, 8) and layer.experts["local"].A.shape == (4, 8)
    assert layer.mixer.proj.bias is None and layer.mixer.proj.weight.shape == (2, 8)


def test_fedprox_term_is_half_mu_squared_distance():
    from fedlrm.algorithms import ClientRound

    algo, model = build("fedprox", "fedprox.mu=0.5")
    params = adapter_parameters(model)
    received = {k: p.detach().clone() for k, p in params.items()}
    assert algo.regularizer(model, ClientRound(0, 1, received)).item() == 0.0
    shifted = {k: v + 2.0 for k, v in received.items()}
    expected = 0.5 * 0.5 * sum(4.0 * v.numel() for v in received.values())
    assert algo.regularizer(model, ClientRound(0, 1, shifted)).item() == pytest.approx(expected)
    assert ALGORITHMS["fedavg"](algo.cfg).regularizer(model, ClientRound(0, 1, shifted)) is None


def test_global_view_of_mixtures_uses_the_global_expert_alone():
    for name in ("apfl", "fedlrm"):
        algo, model = build(name)
        for _, p in adapter_parameters(model).items():
            nn.init.normal_(p)
        x = torch.randn(3, 8)
        layer = model.layers[0]["proj"]
        with algo.global_view(model):
            torch.testing.assert_close(layer(x), layer.base(x) + layer.experts["global"](x))


# ------------------------------------------------------------------- a new algorithm, in a test
@dataclass
class DampedSettings:
    step: float = 1.0  # how far the server moves towards the clients' mean (1: FedAvg)


class DampedAvg(Algorithm):
    """FedAvg whose server takes only a fraction `damped.step` of the averaged update."""

    name = "damped"
    Settings = DampedSettings

    @classmethod
    def check(cls, settings, cfg):
        if not 0 < settings.step <= 1:
            raise ConfigError(f"damped.step must be in (0, 1], got {settings.step}")

    def make_layer(self, linear, layout):
        return AdaptedLinear(linear, {"global": self.expert(linear, self.cfg.adapter.rank)})

    def aggregate(self, state, uploads, server_round):
        mean = weighted_mean(uploads)
        step = self.settings.step
        return ServerState({k: v + step * (mean[k] - v) for k, v in state.weights.items()})


@pytest.fixture
def damped():
    register(DampedAvg)
    yield DampedAvg
    unregister(DampedAvg.name)


def test_an_algorithm_registered_at_test_time_has_its_own_settings_and_runs(damped, tiny_overrides, capsys):
    cfg = load_config(None, tiny_overrides + ["algorithm=damped", "damped.step=0.25", "train.rounds=2"])
    assert cfg.method == DampedSettings(step=0.25)
    assert "damped:\n  step: 0.25" in to_yaml(cfg) and "fedlease" not in to_yaml(cfg)
    with pytest.raises(ConfigError, match="the keys of damped are: step"):
        load_config(None, ["algorithm=damped", "damped.stride=2"])
    with pytest.raises(ConfigError, match=r"damped.step must be in \(0, 1\]"):
        load_config(None, ["algorithm=damped", "damped.step=0"])
    assert main(["config", "algorithm=damped"]) == 0
    assert "damped:\n  step: 1.0" in capsys.readouterr().out
    result = run_experiment(cfg, progress=False)
    # the server moved a quarter of the way from what it sent to the clients' weighted mean
    sizes = {row["client"]: row["n_train"] for row in result.client_rows if row["round"] == 1}
    sent = decode(next(m for m in result.messages if m.round == 1 and m.direction == "down").payload)
    ups = [m for m in result.messages if m.round == 1 and m.direction == "up"]
    then = decode(next(m for m in result.messages if m.round == 2 and m.direction == "down").payload)
    total = sum(sizes[m.client] for m in ups)
    for key, before in sent.items():
        mean = sum(decode(m.payload)[key].double() * sizes[m.client] / total for m in ups)
        torch.testing.assert_close(then[key].double(), before.double() + 0.25 * (mean - before.double()),
                                   rtol=1e-5, atol=1e-6)


def test_every_method_section_is_its_own_and_moved_keys_say_where_they_went():
    cfg = load_config(None, ["algorithm=fedavg"])
    assert "\nfedlrm:" not in to_yaml(cfg) and "\nadapter:" in to_yaml(cfg)
    assert load_config(None, ["algorithm=fedlrm"]).method.local_rank == 4
    for old, new in (("adapter.local_rank=2", "'apfl.local_rank' and 'fedlrm.local_rank'"),
                     ("adapter.gate=token", "'fedlrm.gate'"), ("train.prox_mu=0.1", "'fedprox.mu'"),
                     ("adapter.apfl_mix=0.3", "'apfl.mix'")):
        with pytest.raises(ConfigError, match=f"moved .* {re.escape(new)}"):
            load_config(None, [old])
    with pytest.raises(ConfigError, match="the keys of adapter are: rank, alpha, dropout"):
        load_config(None, ["adapter.rnak=4"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'.*fedlease"):
        load_config(None, ["bogus=1"])
