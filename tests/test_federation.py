"""The in-process federation: what crosses, how it is averaged, resuming, exports."""

import json

import torch

from fedlrm.algorithms import load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.export import load_personalized
from fedlrm.federation.task import personalize
from fedlrm.federation.wire import decode


def run(overrides, *extra, **kwargs):
    return run_experiment(load_config(None, overrides + list(extra)), progress=False, **kwargs)


def test_server_state_is_the_sample_weighted_mean_of_uploads(tiny_overrides):
    result = run(tiny_overrides, "algorithm=fedavg", "train.rounds=2", "data.partition=dirichlet",
                 "data.dirichlet_alpha=0.5", "data.shots=0")
    sizes = {row["client"]: row["n_train"] for row in result.client_rows if row["round"] == 1}
    assert len(set(sizes.values())) > 1, "the test needs clients of different sizes"
    ups = [m for m in result.messages if m.round == 1 and m.direction == "up"]
    next_down = next(m for m in result.messages if m.round == 2 and m.direction == "down")
    total = sum(sizes[m.client] for m in ups)
    received = decode(next_down.payload)
    for key, value in received.items():
        by_hand = sum(decode(m.payload)[key].double() * sizes[m.client] / total for m in ups)
        torch.testing.assert_close(value.double(), by_hand, rtol=1e-6, atol=1e-7)


def test_run_directory_contents_and_personalized_export(tiny_overrides):
    result = run(tiny_overrides, "algorithm=fedlrm")
    d = result.run_dir
    for name in ("config.yaml", "metrics.csv", "rounds.csv", "summary.json", "summary.md",
                 "accuracy_per_round.png", "client_accuracy.png", "data_summary.json", "checkpoint/state.json"):
        assert (d / name).is_file(), name
    header = (d / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("round", "client", "accuracy", "loss", "n_train", "bytes_up", "bytes_down", "train_seconds"):
        assert column in header
    exported = load_personalized(d / "adapters" / "client_01")
    from fedlrm.federation.simulation import Simulation

    sim = Simulation(load_config(d / "config.yaml"), progress=False)
    sim_model = personalize(sim.bundle, sim.algorithm, sim.cfg, 1, result.client_states[1], result.server_state,
                            sim.cfg.train.rounds)
    x = sim.data.clients[1].test.batches(4).__next__()[0]
    torch.testing.assert_close(exported(x), sim_model(x))
    meta = json.loads((d / "adapters" / "client_01" / "fedlrm.json").read_text())
    assert meta["config"]["algorithm"] == "fedlrm" and meta["config"]["fedlrm"]["local_rank"] == 2


def test_token_gate_sgd_bf16_and_augmentation_run(tiny_overrides):
    result = run(tiny_overrides, "algorithm=fedlrm", "fedlrm.gate=token", "train.optimizer=sgd",
                 "train.precision=bf16", "data.augment=true", "train.rounds=1", "train.client_fraction=0.5")
    assert len(result.round_rows) == 1 and result.round_rows[0]["clients_sampled"] == 2
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["loss"] == row["loss"] for row in result.client_rows)
    sampled = [row for row in result.client_rows if row["sampled"]]
    assert len(sampled) == 2 and all(row["train_loss"] is not None for row in sampled)


def test_a_method_record_survives_the_checkpoint(tmp_path):
    """Records are dataclasses of tensors, dicts with int keys, optional fields and tuples."""
    from fedlrm.algorithms import ServerState
    from fedlrm.algorithms.fedlease import Clustering
    from fedlrm.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    warmup = {3: {"l.experts.local.A": torch.randn(2, 4)}, 0: {"l.experts.local.A": torch.zeros(2, 4)}}
    record = Clustering(torch.tensor([5, 0, 0, 7]), warmup, None, None, [(2, 0.25), (3, -0.5)])
    save_checkpoint(tmp_path, Checkpoint(4, ServerState({"w": torch.ones(3)}, record), {0: {}}, [], []))
    back = load_checkpoint(tmp_path, Clustering)
    got = back.server.record
    assert back.round == 4 and torch.equal(back.server.weights["w"], torch.ones(3))
    assert torch.equal(got.examples, record.examples) and got.assignment is None and got.distances is None
    assert list(got.warmup) == [3, 0] and torch.equal(got.warmup[3]["l.experts.local.A"], warmup[3]["l.experts.local.A"])
    assert got.silhouette == [(2, 0.25), (3, -0.5)]


def test_a_sampled_fraction_of_clients_is_evaluated_and_every_client_in_the_last_round(tiny_overrides):
    from fedlrm.federation.simulation import Simulation
    from fedlrm.seeding import sample_clients

    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "data.num_clients=4", "data.shards_per_client=1",
                                              "train.rounds=3", "train.eval_fraction=0.5"])
    result = Simulation(cfg, progress=False).run()
    evaluated = {r: sorted(row["client"] for row in result.client_rows if row["round"] == r) for r in (1, 2, 3)}
    assert evaluated[3] == [0, 1, 2, 3]
    for r in (1, 2):
        assert evaluated[r] == sample_clients(cfg.seed, r, 4, 0.5, "evaluate") and len(evaluated[r]) == 2
    assert sorted(result.summary["per_client_accuracy"]) == [0, 1, 2, 3]
    # the training sample is drawn as before (a different stream)
    assert sample_clients(cfg.seed, 1, 4, 0.5) == sample_clients(cfg.seed, 1, 4, 0.5, "sample")


def test_the_summary_names_the_best_round_the_worst_client_and_the_10th_percentile():
    from fedlrm.federation.server import best_round, spread_over_clients

    def rows(r, accuracies, n_test=10):
        return [{"round": r, "client": c, "accuracy": a, "n_test": n_test} for c, a in enumerate(accuracies)]

    history = rows(1, [0.2, 0.4, 0.6]) + rows(2, [0.5, 0.9, 0.7]) + rows(3, [0.5, 0.9])  # round 3: a sample
    history += rows(4, [0.6, 0.3, 0.9])  # the last round evaluates every client
    best = best_round(history)
    assert best == {"acc_last": 0.6, "acc_best": 0.7, "best_round": 2, "best_rounds_compared": 3}
    assert best_round(rows(1, [0.5, 0.5]) + rows(2, [0.5, 0.5]))["best_round"] == 1  # the earliest of equals
    spread = spread_over_clients(rows(4, [0.6, 0.3, 0.9, 0.8, 0.7]))
    assert spread["acc_worst"] == 0.3 and spread["worst_client"] == 1
    assert abs(spread["acc_p10"] - (0.3 + 0.4 * (0.6 - 0.3))) < 1e-12  # numpy's linear interpolation


def test_summary_files_carry_last_best_worst_and_p10(tiny_overrides):
    result = run(tiny_overrides, "algorithm=fedavg", "train.rounds=2", "train.eval_every=1")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    final = result.summary["per_client_accuracy"]
    assert summary["acc_worst"] == min(final.values()) and summary["best_round"] in (1, 2)
    assert summary["acc_last"] == summary["acc_weighted"] and summary["acc_best"] >= summary["acc_last"]
    assert summary["best_rounds_compared"] == 2
    table = (result.run_dir / "summary.md").read_text()
    assert "worst client %" in table and "p10 over clients %" in table and "best round" in table
