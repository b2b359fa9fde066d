"""Bounded influence and robust aggregation: what attacking clients can no longer do."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedlrm.algorithms import Upload, load_config, weighted_mean
from fedlrm.config import FederationConfig
from fedlrm.federation.attacks import INFLATED_EXAMPLES, AttackingTransport, flip_labels
from fedlrm.federation.robust import capped_weights, clip_update, combine
from fedlrm.federation.simulation import InProcessTransport, Simulation
from fedlrm.federation.validation import claim_problem, norm_outliers
from fedlrm.federation.wire import decode


# ----------------------------------------------------------------------------- the pieces
def test_capped_weights_bound_every_share_and_keep_the_rest_in_proportion():
    weights = capped_weights({0: 1e12, 1: 32, 2: 32, 3: 64, 4: 32}, 0.3)
    total = sum(weights.values())
    assert total == pytest.approx(1e12 + 160)
    shares = {c: w / total for c, w in weights.items()}
    assert shares[0] == pytest.approx(0.3)
    assert max(shares.values()) <= 0.3 + 1e-9
    assert shares[3] == pytest.approx(2 * shares[1])  # the uncapped keep their proportions
    assert shares[3] == pytest.approx(0.7 * 64 / 160)
    # a cap that would need more clients: equal shares; no cap: unchanged
    assert set(capped_weights({0: 5, 1: 1}, 0.4).values()) == {3.0}
    assert capped_weights({0: 5, 1: 1}, None) == {0: 5, 1: 1}


def test_clip_update_scales_the_change_to_the_bound_and_leaves_small_ones():
    sent = {"a": torch.ones(3), "b": torch.zeros(2)}
    upload = {"a": torch.tensor([4.0, 1.0, 1.0]), "b": torch.tensor([0.0, 4.0])}  # change norm 5
    clipped, factor = clip_update(upload, sent, ["a", "b"], 1.0)
    assert factor == pytest.approx(0.2)
    change = torch.cat([clipped["a"] - sent["a"], clipped["b"] - sent["b"]])
    assert float(change.norm()) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.0, 1.0]))
    same, factor = clip_update(upload, sent, ["a", "b"], 10.0)
    assert factor == 1.0 and same is upload


def uploads_of(rows, counts=None):
    counts = counts or [10] * len(rows)
    return [Upload(i, {"w": torch.tensor(r, dtype=torch.float32)}, n) for i, (r, n) in enumerate(zip(rows, counts))]


def test_combine_computes_each_robust_aggregate():
    rows = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [1000.0, -1000.0]]
    ups = uploads_of(rows)
    median = combine(ups, FederationConfig(aggregator="median")).state["w"]
    assert torch.equal(median, torch.tensor([3.0, 20.0]))
    trimmed = combine(ups, FederationConfig(aggregator="trimmed_mean", trim_fraction=0.2)).state["w"]
    assert torch.allclose(trimmed, torch.tensor([3.0, 20.0]))  # drops 1 of 5 at each end, per coordinate
    krum = combine(ups, FederationConfig(aggregator="krum", byzantine=1)).state["w"]
    assert any(torch.equal(krum, torch.tensor(r)) for r in rows[:4])  # an honest upload, never the far one
    multi = combine(ups, FederationConfig(aggregator="multikrum", byzantine=1)).state["w"]
    assert torch.allclose(multi, torch.tensor([2.5, 25.0]))  # the 4 close ones, averaged
    assert combine(ups, FederationConfig(aggregator="median")).client_id == -1


def test_claims_must_be_whole_positive_and_within_the_bound():
    assert claim_problem(32, 32) is None and claim_problem(31.0, 32) is None and claim_problem(10 ** 6, None) is None
    assert "more than the 32" in claim_problem(INFLATED_EXAMPLES, 32)
    for bad in (0, -3, 2.5, math.nan, math.inf):
        assert "whole number" in claim_problem(bad, 32), bad
    for bad in (None, "32", True):
        assert "not a number" in claim_problem(bad, 32), bad


def test_colluding_zero_changes_cannot_drag_the_reference_to_zero():
    # two of four send (almost) nothing: the lower median would be theirs and reject the honest
    assert norm_outliers({0: 1e-12, 1: 1e-12, 2: 1.0, 3: 1.2}, 10.0) == {}
    out = norm_outliers({0: 1.0, 1: 1.1, 2: 0.9, 3: 12.0}, 10.0)
    assert list(out) == [3] and "exceeds 10 x the round's median 1.1" in out[3]
    assert norm_outliers({0: 1.0, 1: 100.0, 2: 1.0}, None) == {}  # null: off


# ----------------------------------------------------------------------------- the server
def attacked(replies, sent, kind, attackers=(0,)):
    transport = AttackingTransport(Replay(replies), list(attackers), kind)
    return transport.train(1, sent)


class Replay:
    """A transport that answers with the given replies (what the clients already trained)."""

    def __init__(self, replies):
        self.replies = replies

    def train(self, round_index, messages):
        return {c: r for c, r in self.replies.items() if c in messages}


def test_an_inflated_claim_is_rejected_and_aggregation_is_as_without_it(round_one):
    sim, state, sent, replies = round_one
    without = sim.server.aggregate(1, state, sim.server.accept(1, sent, {c: r for c, r in replies.items() if c}))
    accepted = sim.server.accept(1, sent, attacked(replies, sent, "takeover"))
    assert [u.client_id for u in accepted] == [1, 2, 3]
    assert "claims 1000000000000 training examples, more than the" in sim.server.rejections[-1].reason
    got = sim.server.aggregate(1, state, accepted)
    assert all(torch.equal(got.weights[k], without.weights[k]) for k in without.weights)


def test_without_the_bound_an_inflated_claim_takes_the_mean_over(round_one):
    sim, state, sent, replies = round_one
    sim.cfg.federation.bound_examples = False
    accepted = sim.server.accept(1, sent, attacked(replies, sent, "inflate"))
    mean = sim.server.aggregate(1, state, accepted).weights
    own = decode(replies[0].upload)
    assert all(torch.allclose(mean[k], own[k], atol=1e-6) for k in own)  # client 0 alone decides
    # a share cap bounds it even then
    sim.cfg.federation.max_weight_share = 0.4
    accepted = sim.server.accept(1, sent, attacked(replies, sent, "inflate"))
    weights = {u.client_id: u.num_examples for u in accepted}
    assert weights[0] / sum(weights.values()) == pytest.approx(0.4)


def test_a_zero_change_is_not_a_change_and_honest_uploads_stay(round_one):
    sim, _, sent, replies = round_one
    accepted = sim.server.accept(1, sent, attacked(replies, sent, "zero", attackers=(0, 1)))
    assert [u.client_id for u in accepted] == [2, 3]
    assert all("not a change" in r.reason for r in sim.server.rejections)


def test_server_side_clipping_bounds_each_change(round_one):
    sim, _, sent, replies = round_one
    sim.cfg.federation.clip_update_norm = 1e-3
    accepted = sim.server.accept(1, sent, replies)
    assert sim.server.round_clipped == 4
    for u in accepted:
        message = decode(sent[u.client_id])
        norm = math.sqrt(sum(float((v.double() - message[k].double()).pow(2).sum()) for k, v in u.state.items()))
        assert norm == pytest.approx(1e-3, rel=1e-4)


def test_the_median_aggregator_gives_the_coordinate_wise_median(round_one):
    sim, state, sent, replies = round_one
    sim.cfg.federation.aggregator = "median"
    accepted = sim.server.accept(1, sent, attacked(replies, sent, "signflip"))
    got = sim.server.aggregate(1, state, accepted).weights
    for key in accepted[0].state:
        stacked = np.stack([u.state[key].double().numpy() for u in accepted])
        assert np.allclose(got[key].double().numpy(), np.median(stacked, axis=0), atol=1e-7), key
    mean = weighted_mean(accepted)
    assert any(not torch.equal(got[k], mean[k]) for k in mean)


def test_a_federation_with_attackers_runs_and_records_each_rejection(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=2", "data.num_clients=4",
                                              "data.shards_per_client=1", "federation.aggregator=trimmed_mean",
                                              "federation.trim_fraction=0.25"])
    sim = Simulation(cfg, progress=False)
    flip_labels(sim.clients, [1], len(sim.data.class_names))
    result = sim.server.run(AttackingTransport(InProcessTransport(sim.clients), [0], "takeover"))
    assert [row["clients_rejected"] for row in result.round_rows] == [1, 1]
    assert [(r.round, r.client) for r in result.rejections] == [(1, 0), (2, 0)]
    assert all(row["update_norm_median"] > 0 for row in result.round_rows)
    assert all(torch.isfinite(v).all() for v in result.server_state.weights.values())


def test_label_flip_changes_only_the_attackers_training_labels(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    sim = Simulation(cfg, progress=False)
    before = [c.split.train.labels.clone() for c in sim.clients]
    classes = len(sim.data.class_names)
    flip_labels(sim.clients, [0], classes)
    assert torch.equal(sim.clients[0].split.train.labels, classes - 1 - before[0])
    assert torch.equal(sim.data.clients[0].train.labels, before[0])  # the data itself is untouched
    assert all(torch.equal(sim.clients[c].split.train.labels, before[c]) for c in (1, 2))
    assert torch.equal(sim.clients[0].split.test.labels, sim.data.clients[0].test.labels)


def test_unknown_attack_is_refused():
    with pytest.raises(ValueError, match="unknown attack"):
        AttackingTransport(Replay({}), [0], "bribe")


def test_a_malformed_reply_from_flower_is_judged_not_trusted(round_one):
    sim, _, sent, replies = round_one
    tampered = {**replies, 1: replace(replies[1], num_examples=math.nan), 2: replace(replies[2], num_examples=None)}
    assert [u.client_id for u in sim.server.accept(1, sent, tampered)] == [0, 3]
    assert [r.client for r in sim.server.rejections] == [1, 2]
