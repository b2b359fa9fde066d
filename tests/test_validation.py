"""Bad uploads are rejected with a reason and never reach the global state; DP on uploads."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import pytest
import torch

from fedlrm.algorithms import load_config
from fedlrm.config import PrivacyConfig
from fedlrm.experiment import run_experiment
from fedlrm.federation import privacy
from fedlrm.federation.server import RoundFailed
from fedlrm.federation.simulation import InProcessTransport, Simulation
from fedlrm.federation.wire import decode, encode


def first(upload):
    return next(iter(upload))


def with_value(value):
    def corrupt(upload, sent):
        key = first(upload)
        bad = upload[key].clone()
        bad.view(-1)[3] = value
        return {**upload, key: bad}
    return corrupt


def scaled(upload, sent):
    return {k: sent[k] + 1000 * (v - sent[k]) for k, v in upload.items()}


BAD_UPLOADS = {
    "nan": (with_value(math.nan), "NaN or Inf"),
    "inf": (with_value(math.inf), "NaN or Inf"),
    "missing key": (lambda u, s: {k: v for k, v in u.items() if k != first(u)}, "missing"),
    "extra key": (lambda u, s: {**u, "vision.layers.0.q_proj.experts.local.A": torch.zeros(2, 4)}, "unexpected"),
    "wrong shape": (lambda u, s: {**u, first(u): torch.zeros(3, 3)}, "shape"),
    "wrong dtype": (lambda u, s: {**u, first(u): u[first(u)].double()}, "dtype"),
    "huge norm": (scaled, "median"),
}


def test_honest_uploads_are_all_accepted(round_one):
    sim, state, sent, replies = round_one
    assert [u.client_id for u in sim.server.accept(1, sent, replies)] == [0, 1, 2, 3]
    assert sim.server.rejections == []


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_a_bad_upload_is_rejected_with_its_reason_and_never_averaged(round_one, kind, caplog):
    sim, state, sent, replies = round_one
    corrupt, reason = BAD_UPLOADS[kind]
    honest = {c: r for c, r in replies.items() if c != 0}
    expected = sim.server.aggregate(1, state, sim.server.accept(1, sent, honest))
    bad = corrupt(decode(replies[0].upload), decode(sent[0]))
    tampered = {**replies, 0: replace(replies[0], upload=encode(bad))}
    with caplog.at_level(logging.WARNING, logger="fedlrm.server"):
        accepted = sim.server.accept(1, sent, tampered)
    assert [u.client_id for u in accepted] == [1, 2, 3]
    assert sim.server.rejections[-1].client == 0 and reason in sim.server.rejections[-1].reason
    assert "rejected the upload of client 0" in caplog.text and reason in caplog.text
    got = sim.server.aggregate(1, state, accepted).weights
    expected = expected.weights
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_an_undecodable_payload_is_rejected(round_one):
    sim, state, sent, replies = round_one
    tampered = {**replies, 2: replace(replies[2], upload=b"\x00garbage")}
    assert [u.client_id for u in sim.server.accept(1, sent, tampered)] == [0, 1, 3]
    assert "cannot be decoded" in sim.server.rejections[-1].reason


class PoisonOne(InProcessTransport):
    """Client 1 answers every round with NaN in its upload."""

    def train(self, round_index, messages):
        replies = super().train(round_index, messages)
        upload = {k: torch.full_like(v, math.nan) for k, v in decode(replies[1].upload).items()}
        return {**replies, 1: replace(replies[1], upload=encode(upload))}


def test_a_run_goes_on_without_a_poisoning_client_and_records_it(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=2"])
    sim = Simulation(cfg, progress=False)
    result = sim.server.run(PoisonOne(sim.clients), tmp_path)
    assert all(torch.isfinite(v).all() for v in result.server_state.weights.values())
    assert [row["clients_rejected"] for row in result.round_rows] == [1, 1]
    recorded = json.loads((tmp_path / "rejected_updates.json").read_text())
    assert [(r["round"], r["client"]) for r in recorded] == [(1, 1), (2, 1)]


class Silent(InProcessTransport):
    """Only client 0 answers."""

    def train(self, round_index, messages):
        return {c: r for c, r in super().train(round_index, messages).items() if c == 0}


def test_a_round_with_fewer_answers_than_min_clients_fails_and_keeps_the_checkpoint(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=2", "federation.min_clients=2"])
    sim = Simulation(cfg, progress=False)
    sim.server.run(InProcessTransport(sim.clients), tmp_path, stop_after_round=1)
    before = (tmp_path / "checkpoint" / "global.safetensors").read_bytes()
    with pytest.raises(RoundFailed, match="min_clients=2"):
        sim.server.run(Silent(sim.clients), tmp_path, resume=True)
    assert (tmp_path / "checkpoint" / "global.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["round"] == 1


def test_a_round_with_enough_answers_completes_without_the_missing_client(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=1", "federation.min_clients=1"])
    sim = Simulation(cfg, progress=False)
    result = sim.server.run(Silent(sim.clients))
    assert result.round_rows[0]["clients_answered"] == 1
    assert [row["sampled"] for row in result.client_rows] == [True, False, False]


# ---------------------------------------------------------------------------- privacy
def test_dp_clips_the_change_to_the_bound_and_adds_noise_of_the_configured_scale():
    received = {"a": torch.zeros(50_000), "b": torch.ones(10)}
    upload = {"a": torch.full((50_000,), 0.1), "b": torch.ones(10) * 3, "new": torch.ones(5)}
    clipped = privacy.privatize(upload, received, PrivacyConfig(clip=1.0))
    change = torch.cat([clipped["a"], clipped["b"] - 1, clipped["new"]])
    assert change.norm().item() == pytest.approx(1.0, rel=1e-4)  # float32 storage
    noisy = privacy.privatize({"a": torch.zeros(50_000)}, {"a": torch.zeros(50_000)},
                              PrivacyConfig(clip=0.5, noise_multiplier=2.0))
    assert noisy["a"].std().item() == pytest.approx(1.0, rel=0.02)  # sigma = 2.0 * 0.5
    again = privacy.privatize({"a": torch.zeros(50_000)}, {"a": torch.zeros(50_000)},
                              PrivacyConfig(clip=0.5, noise_multiplier=2.0))
    assert not torch.equal(noisy["a"], again["a"])  # fresh entropy, not the run seed


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert privacy.epsilon(1.0, 10, 1e-5) < privacy.epsilon(1.0, 20, 1e-5)
    assert privacy.epsilon(2.0, 10, 1e-5) < privacy.epsilon(1.0, 10, 1e-5)
    assert privacy.epsilon(0.0, 10, 1e-5) == math.inf


def test_a_dp_run_writes_its_privacy_parameters_and_uploads_differ_from_plain(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=1", "privacy.clip=0.05",
                                              "privacy.noise_multiplier=1.0"])
    result = run_experiment(cfg, progress=False)
    report = json.loads((result.run_dir / "privacy.json").read_text())
    assert report["clip"] == 0.05 and report["noise_std"] == 0.05 and report["rounds_accounted"] == 1
    assert report["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1, 1e-5))
    for m in result.messages:
        if m.direction == "up":
            down = next(x for x in result.messages if x.direction == "down" and x.client == m.client)
            up, sent = decode(m.payload), decode(down.payload)
            change = torch.cat([(up[k] - sent[k]).flatten() for k in up])
            assert change.std().item() == pytest.approx(0.05, rel=0.1)  # dominated by the noise


def test_bad_privacy_settings_are_refused():
    from fedlrm.errors import ConfigError

    with pytest.raises(ConfigError, match="needs privacy.clip"):
        load_config(None, ["privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="secagg_threshold"):
        load_config(None, ["privacy.secagg_shares=2", "privacy.secagg_threshold=3"])
