"""Clients held out of training (`data.new_clients`) and a user's own new client (`fedlrm personalize`):
they take no part in the rounds, then adapt from the final server state as their algorithm
brings a newcomer in, and are evaluated."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import CLASSES, COLOURS, jpeg_bytes
from test_algorithms import GLOBAL, LOCAL, quick, role

from fedlrm.adapters import get_state
from fedlrm.algorithms import ALGORITHMS, load_config
from fedlrm.cli import main
from fedlrm.errors import ConfigError
from fedlrm.experiment import resume_experiment, run_experiment
from fedlrm.federation.newcomers import adapt_newcomer
from fedlrm.federation.simulation import InProcessTransport, Simulation
from fedlrm.federation.task import evaluate, initial_private, load_client
from fedlrm.federation.wire import decode, encode
from fedlrm.inference import load_personalized

NEW = ["data.num_clients=4", "data.new_clients=1"]  # clients 0..2 train; client 3 joins afterwards
ROUTER = {"mixer.proj.weight"}

# What a newcomer trains, by role (see test_algorithms.role); the rest stays as it received it.
NEWCOMER_TRAINS = {
    "zeroshot": set(),
    "local": LOCAL,
    "fedavg": GLOBAL,  # the baseline: a plain local fine-tune of the global LoRA
    "fedprox": GLOBAL,
    "apfl": LOCAL,
    "fedlrm": LOCAL | ROUTER,  # its local expert and gate
    "fedlease": ROUTER,  # its router; the cluster experts stay the server's
    "fedpia": LOCAL,
    "f3ocus": GLOBAL,  # the blocks it is given, only
}


class Recording(InProcessTransport):
    """The in-process transport, noting every client a message goes to."""

    def __init__(self, clients):
        super().__init__(clients)
        self.addressed: dict[int, set[int]] = {}

    def train(self, round_index, messages):
        self.addressed.setdefault(round_index, set()).update(messages)
        return super().train(round_index, messages)

    def evaluate(self, round_index, messages):
        self.addressed.setdefault(round_index, set()).update(messages)
        return super().evaluate(round_index, messages)


def test_new_clients_are_neither_sampled_nor_sent_anything_during_training(tiny_overrides):
    cfg = load_config(None, tiny_overrides + NEW + ["data.new_clients=2", "algorithm=fedlrm",
                                                    "train.client_fraction=0.5", "train.rounds=3"])
    sim = Simulation(cfg, progress=False)
    assert sim.server.num_clients == 2 and [c.client_id for c in sim.clients] == [0, 1]
    assert [split.client_id for split in sim.newcomers] == [2, 3]
    transport = Recording(sim.clients)
    result = sim.server.run(transport, None)
    assert sorted(transport.addressed) == [1, 2, 3]
    assert set().union(*transport.addressed.values()) == {0, 1}  # every message of every round
    assert {m.client for m in result.messages} <= {0, 1}  # nothing came back from 2 or 3 either
    assert {row["client"] for row in result.client_rows} == {0, 1}
    assert set(result.summary["per_client_accuracy"]) == {0, 1}


@pytest.mark.parametrize("name", ["fedlease", "f3ocus"])
def test_a_methods_record_holds_the_training_clients_only(tiny_overrides, name):
    sim = Simulation(quick(name, tiny_overrides, *NEW), progress=False)
    record = sim.server.initial_state().record
    assert len(record.examples if name == "fedlease" else record.masks) == 3


def test_the_rounds_sample_from_the_training_clients_when_checking_min_clients(tiny_overrides):
    # 4 clients, 1 held out: a round samples all 3 that train, so min_clients=4 can never be met
    with pytest.raises(ConfigError, match="3 training clients"):
        load_config(None, tiny_overrides + NEW + ["federation.min_clients=4"])


def test_a_finished_run_reports_its_new_clients_beside_the_others(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides + NEW + ["algorithm=fedlrm", "train.rounds=2",
                                                                      "data.new_client_epochs=2"]), progress=False)
    run_dir = result.run_dir
    rows = json.loads((run_dir / "new_clients.json").read_text())
    assert [row["client"] for row in rows] == [3] and rows[0]["epochs"] == 2
    assert rows[0]["n_train"] > 0 and rows[0]["n_test"] == 8 and 0 <= rows[0]["accuracy"] <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["new_clients"] == 1 and summary["new_acc_weighted"] == rows[0]["accuracy"]
    assert summary["new_acc_mean"] == rows[0]["accuracy"] and "acc_weighted" in summary
    assert set(summary["per_client_accuracy"]) == {"0", "1", "2"}  # the participating clients' figures
    assert "## New clients" in (run_dir / "summary.md").read_text()
    assert "new clients %" in (run_dir / "summary.md").read_text()
    meta = json.loads((run_dir / "adapters" / "client_03" / "fedlrm.json").read_text())
    assert meta["client"] == 3 and meta["round"] == 2
    assert "3" not in {line.split(",")[1] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]}


def test_a_new_client_of_a_domain_classifies_over_that_domains_classes(tiny_overrides, tiny_dataset):
    from test_domains import SECOND, two_domains

    cfg = load_config(None, tiny_overrides + two_domains(tiny_dataset) + ["data.new_clients=1", "algorithm=fedlrm",
                                                                          "train.rounds=1"])
    result = run_experiment(cfg, progress=False)
    rows = json.loads((result.run_dir / "new_clients.json").read_text())
    assert [(row["client"], row["domain"]) for row in rows] == [(4, "cold")]
    meta = json.loads((result.run_dir / "adapters" / "client_04" / "fedlrm.json").read_text())
    assert sorted(meta["class_names"]) == sorted(set(CLASSES) - set(SECOND))


@pytest.mark.parametrize("name", list(NEWCOMER_TRAINS))
def test_a_newcomer_trains_what_its_algorithm_says_and_keeps_the_rest_as_received(tiny_overrides, name):
    cfg = quick(name, tiny_overrides, *NEW, "train.rounds=2")
    sim = Simulation(cfg, progress=False)
    result = sim.run()
    algorithm, bundle, split = sim.algorithm, sim.bundle, sim.newcomers[0]
    last = cfg.train.rounds if algorithm.trains else 0
    message = decode(encode(algorithm.newcomer_message(result.server_state, last)))
    with bundle.model.classifying_over(split.classes):  # the newcomer's model before it trains
        load_client(bundle, algorithm, cfg, 3, initial_private(bundle, algorithm, cfg, 3), message, last)
        received = get_state(bundle.model)
        untrained = evaluate(bundle.model, split.test)["accuracy"]
    # two epochs: with B = 0 at the start (a fresh LoRA), the first step changes B alone
    state, row = adapt_newcomer(bundle, algorithm, cfg, 3, split, result.server_state, last, 2)
    assert state.keys() == received.keys()
    changed = {k for k in state if not torch.equal(state[k], received[k])}
    assert {role(k) for k in changed} == NEWCOMER_TRAINS[name]
    for key, value in result.server_state.weights.items():  # the server's weights are left as they were
        assert torch.equal(value, message[key])
    if name == "fedlrm":  # the global expert is the server's, exactly
        assert all(torch.equal(state[k], result.server_state.weights[k]) for k in state if ".experts.global." in k)
    if name == "f3ocus":  # only the blocks it was given
        trained_blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in changed}
        assert len(trained_blocks) == cfg.methods["f3ocus"].budget
    if name == "zeroshot":  # nothing to train: its accuracy is the frozen model's
        assert row["epochs"] == 0 and row["trained_weights"] == 0 and row["accuracy"] == untrained
    else:
        assert row["epochs"] == 2 and row["trained_weights"] == sum(state[k].numel() for k in changed)


def test_a_fedlease_newcomer_joins_the_largest_cluster():
    from fedlrm.algorithms import ServerState
    from fedlrm.algorithms.fedlease import CLUSTER, Clustering

    algorithm = ALGORITHMS["fedlease"](load_config(None, ["algorithm=fedlease"]))
    record = Clustering(torch.ones(5), assignment=torch.tensor([1, 0, 1, 2, 0]))
    assert int(algorithm.newcomer_message(ServerState({}, record), 3)[CLUSTER]) == 0  # 0 and 1 tie: the lower
    record.assignment = torch.tensor([1, 0, 1, 2, 1])
    assert int(algorithm.newcomer_message(ServerState({}, record), 3)[CLUSTER]) == 1


def test_an_f3ocus_newcomer_gets_the_blocks_most_important_to_the_federation():
    from fedlrm.algorithms import ServerState
    from fedlrm.algorithms.f3ocus import MASK, Selections

    algorithm = ALGORITHMS["f3ocus"](load_config(None, ["algorithm=f3ocus", "f3ocus.budget=2"]))
    scores = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.2, 0.2, 0.1, 0.5]], dtype=torch.float64)
    record = Selections(torch.zeros(2, 4, dtype=torch.int64), scores)
    assert algorithm.newcomer_message(ServerState({}, record), 3)[MASK].tolist() == [0, 1, 0, 1]


def test_a_resumed_run_gives_its_new_clients_the_same_results(tiny_overrides):
    base = tiny_overrides + NEW + ["data.new_clients=2", "algorithm=fedlrm", "train.rounds=2",
                                   "report.export_adapters=0,3"]  # a new client's id selects it too
    full = run_experiment(load_config(None, base + ["name=full"]), progress=False)
    cut = run_experiment(load_config(None, base + ["name=cut"]), progress=False, stop_after_round=1)
    assert not (cut.run_dir / "new_clients.json").exists()  # they join once the run is over
    resumed = resume_experiment(cut.run_dir, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    rows = [json.loads((r.run_dir / "new_clients.json").read_text()) for r in (full, resumed)]
    assert [row["client"] for row in rows[0]] == [2, 3] and strip(rows[0]) == strip(rows[1])
    assert resumed.summary["new_acc_weighted"] == full.summary["new_acc_weighted"]
    assert sorted(p.name for p in (resumed.run_dir / "adapters").iterdir()) == ["client_00", "client_03"]


# ---------------------------------------------------------------------------- fedlrm personalize
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_clip_dir, tiny_dataset):
    out = tmp_path_factory.mktemp("personalize")
    cfg = load_config(None, [
        f"model.name={tiny_clip_dir}", "data.source=parquet", f"data.train={tiny_dataset['train']}",
        f"data.test={tiny_dataset['test']}", "data.num_clients=2", "data.shards_per_client=3", "data.shots=2",
        "data.test_per_client=4", "train.rounds=1", "train.local_epochs=1", "train.batch_size=8", "train.lr=0.05",
        "adapter.rank=4", "fedlrm.local_rank=2", "algorithm=fedlrm", f"output_dir={out / 'runs'}", "seed=2"])
    return run_experiment(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """A new client's own data: train/ and test/, one subfolder for each of three classes."""
    root = tmp_path_factory.mktemp("mine") / "my-shop"
    rng = np.random.default_rng(1)
    for part, count in (("train", 4), ("test", 3)):
        for name, colour in list(zip(CLASSES, COLOURS))[:3]:
            (root / part / name).mkdir(parents=True)
            for i in range(count):
                (root / part / name / f"{i}.jpg").write_bytes(jpeg_bytes(colour, rng))
    return root


def tree_digest(folder, skip=None):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and (skip is None or skip not in p.parents)}


def test_personalize_adapts_a_users_own_client_and_writes_its_adapters(finished_run, own_folder, capsys):
    before = tree_digest(finished_run)
    assert main(["personalize", str(finished_run), "--data", str(own_folder), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    out = finished_run / "personalized" / "my-shop"
    result = json.loads((out / "result.json").read_text())
    assert f"{100 * result['accuracy']:.2f} %" in printed and str(out) in printed
    assert result["epochs"] == 2 and result["n_train"] == 12 and result["n_test"] == 9
    assert result["algorithm"] == "fedlrm" and sorted(result["class_names"]) == ["blue", "green", "red"]
    assert tree_digest(finished_run, skip=finished_run / "personalized") == before  # the run itself is untouched
    model = load_personalized(out)  # its own classes, and only those
    assert sorted(model.class_names) == ["blue", "green", "red"] and model.info["client"] == 2
    assert len(model.predict([own_folder / "test" / "red" / "0.jpg"], top_k=5)[0]) == 3


def test_personalize_writes_where_out_says(finished_run, own_folder, tmp_path, capsys):
    out = tmp_path / "mine"
    assert main(["personalize", str(finished_run), "--data", str(own_folder), "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 1  # the run's train.local_epochs
    assert (out / "fedlrm.json").is_file()


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, tiny_clip_dir, tiny_dataset):
    out = tmp_path_factory.mktemp("unfinished")
    cfg = load_config(None, [
        f"model.name={tiny_clip_dir}", "data.source=parquet", f"data.train={tiny_dataset['train']}",
        f"data.test={tiny_dataset['test']}", "data.num_clients=2", "data.shots=2", "data.test_per_client=4",
        "train.rounds=2", "train.local_epochs=1", "train.batch_size=8", "adapter.rank=4", "algorithm=fedavg",
        f"output_dir={out / 'runs'}"])
    return run_experiment(cfg, progress=False, stop_after_round=1).run_dir


@pytest.mark.parametrize("case, message", [
    ("no run", "is not a run directory"),
    ("unfinished", "has not finished: 1 of its 2 rounds"),
    ("no data", "is not a folder"),
    ("bad layout", "holds neither train/ + test/"),
    ("taken out", "exists and is not an empty folder"),
])
def test_personalize_refuses_bad_input_with_exit_2_and_writes_nothing(case, message, finished_run, unfinished_run,
                                                                       own_folder, tmp_path, capsys):
    run_dir, data, extra = finished_run, own_folder, []
    if case == "no run":
        run_dir = tmp_path / "nowhere"
    elif case == "unfinished":
        run_dir = unfinished_run
    elif case == "no data":
        data = tmp_path / "missing"
    elif case == "bad layout":
        data = own_folder / "train"  # class folders, but no train/ and test/
    else:
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "file.txt").write_text("mine")
        extra = ["--out", str(tmp_path / "taken")]
    before = tree_digest(run_dir) if run_dir.exists() else None
    assert main(["personalize", str(run_dir), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if before is not None:
        assert tree_digest(run_dir) == before
    if case == "taken out":
        assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file.txt"]
    else:
        assert not (run_dir / "personalized" / data.name).exists()
