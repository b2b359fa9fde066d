"""The command line: clear errors with no run directory left behind, params, compare."""

import numpy as np
import pytest
from conftest import CLASSES, jpeg_bytes

from fedlrm.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def no_run_dirs(tmp_path):
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.iterdir())


def test_params_prints_paper_table1(capsys):
    code, out, _ = run_cli(capsys, "params", "--layers", "12", "--dim", "256", "--global-rank", "1", "4", "16",
                           "--local-rank", "4", "--algorithm", "fedlrm")
    assert code == 0
    for figure in ("36,864", "55,296", "129,024", "786,432", "16.4 %"):
        assert figure in out


@pytest.mark.parametrize("override,message", [
    ("trian.rounds=3", "unknown config key"),
    ("algorithm=fedfoo", "unknown algorithm 'fedfoo'"),
    ("train.rounds=many", "train.rounds"),
    ("data.partition=iid", "data.partition"),
])
def test_bad_config_is_a_clear_error_without_run_dir(capsys, tiny_overrides, tmp_path, override, message):
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, override)
    assert code == 2 and message in err and "Traceback" not in err
    assert no_run_dirs(tmp_path)


def test_missing_dataset_path(capsys, tiny_overrides, tmp_path):
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, f"data.train={tmp_path}/missing.parquet")
    assert code == 2 and "missing.parquet" in err
    assert no_run_dirs(tmp_path)


def test_corrupt_image(capsys, tiny_overrides, tiny_dataset, tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [{"bytes": jpeg_bytes((10 * k, 0, 0), rng), "path": f"ok_{k}.jpg"} for k in range(24)]
    images[5] = {"bytes": b"this is not an image", "path": "broken_5.jpg"}
    labels = [k % len(CLASSES) for k in range(24)]
    path = tmp_path / "corrupt.parquet"
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, f"data.train={path}", "data.shots=0",
                           "data.num_clients=1")
    assert code == 2 and "broken_5.jpg" in err
    assert no_run_dirs(tmp_path)


def test_client_without_data(capsys, tiny_overrides, tmp_path):
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, "data.num_clients=40")
    assert code == 2 and "client" in err
    assert no_run_dirs(tmp_path)


def test_resume_rejects_non_run_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--resume", str(tmp_path))
    assert code == 2 and "not a run directory" in err


def test_compare_prints_one_table_and_writes_chart(capsys, tiny_overrides, tmp_path):
    code, out, _ = run_cli(capsys, "compare", "--no-progress", "--algorithms", "zeroshot,fedavg,fedlrm",
                           *tiny_overrides, "name=cmp")
    assert code == 0
    for word in ("zeroshot", "fedavg", "fedlrm", "acc (weighted)", "MB up/client/round", "trainable params"):
        assert word in out
    d = tmp_path / "runs" / "cmp"
    assert (d / "compare.md").is_file() and (d / "compare.png").is_file() and (d / "compare.csv").is_file()
    assert {p.name for p in d.iterdir() if p.is_dir()} == {"zeroshot", "fedavg", "fedlrm"}
    # identical split for every method
    summaries = [(d / a / "data_summary.json").read_text() for a in ("zeroshot", "fedavg", "fedlrm")]
    assert summaries[0] == summaries[1] == summaries[2]


def test_compare_over_seeds_runs_each_seed_and_tables_their_mean_and_spread(capsys, tiny_overrides, tmp_path):
    import csv
    import statistics

    code, out, _ = run_cli(capsys, "compare", "--no-progress", "--algorithms", "zeroshot,fedavg", "--seeds", "0,5",
                           *tiny_overrides, "train.rounds=2", "name=seeds")
    assert code == 0 and "mean ± std over seeds 0, 5" in out
    d = tmp_path / "runs" / "seeds"
    per_seed = {}
    for seed in (0, 5):
        with (d / f"seed-{seed}" / "compare.csv").open() as f:
            per_seed[seed] = {row["method"]: float(row["acc_weighted"]) for row in csv.DictReader(f)}
        data = (d / f"seed-{seed}" / "fedavg" / "data_summary.json").read_text()
        assert data == (d / f"seed-{seed}" / "zeroshot" / "data_summary.json").read_text()
    assert (d / "seed-0" / "fedavg" / "data_summary.json").read_text() != data  # another seed, another split
    with (d / "compare.csv").open() as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    for method in ("zeroshot", "fedavg"):
        values = [per_seed[s][method] for s in (0, 5)]
        assert float(rows[method]["acc_weighted/mean"]) == pytest.approx(statistics.mean(values))
        assert float(rows[method]["acc_weighted/std"]) == pytest.approx(statistics.stdev(values))
        assert float(rows[method]["acc_weighted/seed-5"]) == pytest.approx(values[1])
    table = (d / "compare.md").read_text()
    assert "| fedavg | " in table and "seed 5 %" in table and (d / "compare.png").is_file()


def test_the_table_over_seeds_is_the_mean_and_sample_deviation_of_each_figure():
    from fedlrm.reporting import over_seeds, seeds_markdown

    per_seed = {0: [{"method": "a", "acc_weighted": 0.5, "global_accuracy": None, "wall_seconds": 10.0}],
                1: [{"method": "a", "acc_weighted": 0.7, "global_accuracy": 0.4, "wall_seconds": 14.0}],
                2: [{"method": "a", "acc_weighted": 0.6, "global_accuracy": 0.6, "wall_seconds": 12.0}]}
    row, = over_seeds(per_seed)
    assert row["acc_weighted/mean"] == pytest.approx(0.6) and row["acc_weighted/std"] == pytest.approx(0.1)
    assert row["global_accuracy/mean"] == pytest.approx(0.5)  # the seed without the figure is left out
    assert row["acc_weighted/seed-1"] == 0.7 and row["seeds"] == 3
    line = seeds_markdown([row]).splitlines()[2]
    assert line.startswith("| a | 60.00 ± 10.00 |") and "| 12.0 ± 2.0 |" in line and line.endswith("| 50.00 | 70.00 | 60.00 |")


@pytest.mark.parametrize("seeds, message", [("0,x", "whole numbers"), ("1,1", "names a seed twice")])
def test_bad_seeds_are_refused_before_anything_runs(capsys, tiny_overrides, tmp_path, seeds, message):
    code, _, err = run_cli(capsys, "compare", "--no-progress", "--algorithms", "zeroshot", "--seeds", seeds,
                           *tiny_overrides, "name=bad")
    assert code == 2 and message in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_flower_command_refuses_a_bad_config_before_starting_any_process(capsys, tmp_path):
    work = tmp_path / "deployment"
    assert main(["flower", "--work-dir", str(work), "train.roundz=3"]) == 2
    assert "unknown config key 'train.roundz'" in capsys.readouterr().err
    assert not work.exists()


def test_compare_runs_an_algorithm_with_its_own_settings_as_its_own_entry(capsys, tiny_overrides, tmp_path):
    import yaml

    quick = ["train.rounds=2", "fedlease.warmup_rounds=1", "fedlease.max_clusters=2"]
    code, out, _ = run_cli(capsys, "compare", "--no-progress", "--algorithms", "fedlease,fedlease+variant=weighted",
                           *tiny_overrides, *quick, "name=variants")
    assert code == 0
    d = tmp_path / "runs" / "variants"
    assert "| fedlease+variant=weighted |" in (d / "compare.md").read_text()
    variants = {entry: yaml.safe_load((d / entry / "config.yaml").read_text())["fedlease"]["variant"]
                for entry in ("fedlease", "fedlease+variant=weighted")}
    assert variants == {"fedlease": "official", "fedlease+variant=weighted": "weighted"}
    rows = {row.split(",")[0] for row in (d / "compare.csv").read_text().splitlines()[1:]}
    assert rows == {"fedlease", "fedlease+variant=weighted"}


@pytest.mark.parametrize("entry, message", [
    ("fedlease+variant", "not of the form key=value"),
    ("fedlease+colour=red", "the keys of fedlease"),
    ("fedleese", "unknown algorithm 'fedleese'"),
    ("fedlease+variant=heavy", "fedlease.variant"),
])
def test_a_bad_compare_entry_is_refused_before_anything_runs(capsys, tiny_overrides, tmp_path, entry, message):
    code, _, err = run_cli(capsys, "compare", "--no-progress", "--algorithms", f"zeroshot,{entry}",
                           *tiny_overrides, "name=bad")
    assert code == 2 and message in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_compare_runs_fedleases_earlier_variant_by_default():
    from fedlrm.algorithms import ALGORITHMS, compare_entries

    entries = compare_entries()
    assert entries[:len(ALGORITHMS) + 1].count("fedlease+variant=weighted") == 1
    assert entries.index("fedlease+variant=weighted") == entries.index("fedlease") + 1
    assert set(ALGORITHMS) <= set(entries)
