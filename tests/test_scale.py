"""A round costs what its sampled clients cost: private states of clients not training live on
disk, a checkpoint writes only the states that changed, and the export can be limited."""

from __future__ import annotations

import pytest

from fedlrm.algorithms import load_config
from fedlrm.cli import main
from fedlrm.errors import ConfigError
from fedlrm.experiment import resume_experiment, run_experiment
from fedlrm.federation.simulation import Simulation
from fedlrm.seeding import sample_clients

SAMPLED = ["algorithm=fedlrm", "data.num_clients=6", "data.shards_per_client=1", "train.client_fraction=0.34",
           "train.rounds=3", "seed=0"]  # seed 0: client 1 trains in round 1 only, 2 and 5 never


def trained_in(cfg) -> dict[int, int]:
    """client -> the last round it was sampled for training."""
    last = {}
    for r in range(1, cfg.train.rounds + 1):
        for c in sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.train.client_fraction):
            last[c] = r
    return last


def states_folder(run_dir):
    return sorted(p.name for p in (run_dir / "client_states").iterdir())


def test_private_states_live_on_disk_one_file_per_client_from_the_round_it_last_trained(tiny_overrides):
    cfg = load_config(None, tiny_overrides + SAMPLED + ["name=disk"])
    last = trained_in(cfg)
    assert len(last) < 6, "the test needs a client that never trains"
    result = run_experiment(cfg, progress=False)
    run_dir, states = result.run_dir, result.client_states
    assert states.in_memory == 0, "after a checkpoint no client state is held in memory"
    assert states.stored() == sorted(last)
    assert states_folder(run_dir) == sorted(f"client{c}-round{r}.safetensors" for c, r in last.items())
    # the same run without a run directory (every state in memory) gives the same results
    again = Simulation(cfg, progress=False).run()
    strip = lambda rows: [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]
    assert strip(again.client_rows) == strip(result.client_rows)


def test_a_checkpoint_rewrites_no_state_of_a_client_that_did_not_train(tiny_overrides):
    cfg = load_config(None, tiny_overrides + SAMPLED + ["name=inc"])
    cut = run_experiment(cfg, progress=False, stop_after_round=1)
    folder = cut.run_dir / "client_states"
    first = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert sorted(first) == [f"client{c}-round1.safetensors" for c in sample_clients(cfg.seed, 1, 6, 0.34)]
    resume_experiment(cut.run_dir, progress=False)
    last = trained_in(cfg)
    kept = {f"client{c}-round1.safetensors" for c, r in last.items() if r == 1}
    after = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert kept and all(after[name] == first[name] for name in kept), "an unchanged state was written again"
    assert sorted(after) == sorted(f"client{c}-round{r}.safetensors" for c, r in last.items())


@pytest.mark.parametrize("setting,expected", [("trained", None), ("0,2", [0, 2]), ("none", [])])
def test_the_export_can_be_limited(tiny_overrides, setting, expected):
    cfg = load_config(None, tiny_overrides + SAMPLED + [f"report.export_adapters={setting}", "name=export"])
    result = run_experiment(cfg, progress=False)
    expected = sorted(trained_in(cfg)) if expected is None else expected
    adapters = result.run_dir / "adapters"
    written = sorted(int(p.name.removeprefix("client_")) for p in adapters.iterdir()) if adapters.exists() else []
    assert written == expected


@pytest.mark.parametrize("setting,message", [("0,x", "not all, trained, none or a list"),
                                             ("7", "names client 7, but the run has clients 0..5")])
def test_a_bad_export_setting_is_refused_before_anything_runs(tiny_overrides, tmp_path, capsys, setting, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(load_config(None, tiny_overrides + SAMPLED + [f"report.export_adapters={setting}"]),
                       progress=False)
    assert main(["run", "--no-progress", *tiny_overrides, *SAMPLED, f"report.export_adapters={setting}"]) == 2
    assert message.split(",")[0] in capsys.readouterr().err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())
