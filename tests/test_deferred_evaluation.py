"""A round's evaluation carried by the next round's training messages (what the Flower transport
does, so that a deployed client starts one ClientApp process per round) gives the rows an
evaluation right after the round gives, also across a resume, and survives a client that fails."""

from __future__ import annotations

import json
import logging

import pytest

from fedlrm.algorithms import load_config
from fedlrm.federation.simulation import InProcessTransport, Simulation

SETTINGS = ["algorithm=fedlrm", "data.num_clients=4", "data.shards_per_client=1", "train.client_fraction=0.5",
            "train.eval_fraction=0.5", "train.rounds=3", "train.threads=1", "seed=1"]
TIMES = {"train_seconds", "eval_seconds", "compute_seconds", "eval_forward_seconds", "wall_seconds",
         "overhead_share"}


class Deferring(InProcessTransport):
    """In-process clients reached as the Flower transport reaches them: round r's evaluation
    travels with round r + 1's training (each client evaluates, then trains)."""

    def __init__(self, clients, lost: set[int] = frozenset()):
        super().__init__(clients)
        self.carried: list[tuple[int, list[int], int, list[int]]] = []
        self.alone: list[tuple[int, list[int]]] = []
        self.lost = lost  # clients whose combined message never comes back

    def train_and_evaluate(self, round_index, messages, eval_round, evaluations):
        self.carried.append((round_index, sorted(messages), eval_round, sorted(evaluations)))
        evals = {c: self.clients[c].evaluate(eval_round, m) for c, m in evaluations.items() if c not in self.lost}
        return self.train(round_index, {c: m for c, m in messages.items() if c not in self.lost}), evals

    def evaluate(self, round_index, messages):
        self.alone.append((round_index, sorted(messages)))
        return super().evaluate(round_index, messages)


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


@pytest.fixture
def cfg(tiny_overrides):
    return load_config(None, tiny_overrides + SETTINGS)


@pytest.fixture
def immediate(cfg, tmp_path):
    sim = Simulation(cfg, progress=False)
    return sim.server.run(InProcessTransport(sim.clients), tmp_path / "immediate")


def test_a_deferred_evaluation_gives_the_rows_of_an_immediate_one(cfg, immediate, tmp_path):
    sim = Simulation(cfg, progress=False)
    transport = Deferring(sim.clients)
    deferred = sim.server.run(transport, tmp_path / "deferred")
    assert without_times(deferred.client_rows) == without_times(immediate.client_rows)
    assert without_times(deferred.round_rows) == without_times(immediate.round_rows)
    assert deferred.summary["per_client_accuracy"] == immediate.summary["per_client_accuracy"]
    # rounds 1 and 2 were evaluated with the training of rounds 2 and 3; the last on its own, by every client
    assert [(r, p) for r, _, p, _ in transport.carried] == [(2, 1), (3, 2)]
    for (_, _, p, asked) in transport.carried:
        assert asked == sorted({row["client"] for row in immediate.client_rows if row["round"] == p})
    assert transport.alone == [(3, [0, 1, 2, 3])]
    assert json.loads((tmp_path / "deferred" / "checkpoint" / "state.json").read_text())["pending_evaluation"] is None


@pytest.mark.parametrize("resumed_by", ["deferring", "in-process"])
def test_a_run_cut_with_an_evaluation_on_its_way_resumes_to_the_uninterrupted_rows(cfg, immediate, tmp_path,
                                                                                  resumed_by):
    run_dir = tmp_path / "cut"
    first = Simulation(cfg, progress=False)
    first.server.run(Deferring(first.clients), run_dir, stop_after_round=1)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["pending_evaluation"]["round"] == 1 and state["pending_evaluation"]["clients"]
    assert not any(row["round"] == 1 for row in state["client_rows"]), "round 1's evaluation had not come back"
    sim = Simulation(cfg, progress=False)
    transport = Deferring(sim.clients) if resumed_by == "deferring" else InProcessTransport(sim.clients)
    resumed = sim.server.run(transport, run_dir, resume=True)
    assert without_times(resumed.client_rows) == without_times(immediate.client_rows)
    assert without_times(resumed.round_rows) == without_times(immediate.round_rows)


def test_a_client_lost_with_its_combined_message_has_no_evaluation_row_and_the_run_goes_on(cfg, immediate, tmp_path,
                                                                                          caplog):
    evaluated_1 = {row["client"] for row in immediate.client_rows if row["round"] == 1}
    lost = min(evaluated_1)
    sim = Simulation(cfg, progress=False)
    with caplog.at_level(logging.WARNING, logger="fedlrm.server"):
        result = sim.server.run(Deferring(sim.clients, lost={lost}), tmp_path / "lost")
    assert {row["client"] for row in result.client_rows if row["round"] == 1} == evaluated_1 - {lost}
    assert f"client(s) [{lost}] sent no evaluation of round 1" in caplog.text
    assert {row["client"] for row in result.client_rows if row["round"] == 3} == {0, 1, 2, 3}
