"""A personalized model in a user's hands: fedlrm.load_personalized, `fedlrm predict`, `fedlrm evaluate`."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, COLOURS, jpeg_bytes
from PIL import Image

import fedlrm
from fedlrm.algorithms import load_config
from fedlrm.cli import main
from fedlrm.experiment import run_experiment
from fedlrm.federation.export import load_personalized as load_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_dir, tiny_dataset):
    out = tmp_path_factory.mktemp("inference")
    cfg = load_config(None, [
        f"model.name={tiny_clip_dir}", "data.source=parquet", f"data.train={tiny_dataset['train']}",
        f"data.test={tiny_dataset['test']}", "data.num_clients=2", "data.shards_per_client=3", "data.shots=2",
        "data.test_per_client=4", "train.rounds=1", "train.batch_size=8", "train.lr=0.05", "adapter.rank=4",
        "algorithm=fedavg", f"output_dir={out / 'runs'}", "seed=2"])
    return run_experiment(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """Three images per class, one subfolder per class (some nested, some PNG)."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for name, colour in zip(CLASSES, COLOURS):
        (root / name / "more").mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(colour, rng))
        Image.new("RGB", (20, 20), colour).save(root / name / "more" / "x.png")
    return root


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_import_fedlrm_stays_light():
    code = "import sys, fedlrm; assert callable(fedlrm.load_personalized); print('torch' in sys.modules)"
    lazy = "import sys, fedlrm; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True).stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_python_api_predicts_top_k_classes(run_dir, labelled_folder):
    model = fedlrm.load_personalized(run_dir, client=1)
    assert model.class_names == CLASSES and model.info["client"] == 1
    paths = [labelled_folder / c / "0.jpg" for c in CLASSES]
    images = [Image.open(p) for p in paths]
    predictions = model.predict(paths, top_k=3)
    assert model.predict(images, top_k=3) == predictions
    assert len(predictions) == len(paths)
    x = model.preprocess(images)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.logits(x), logits)
        torch.testing.assert_close(load_model(run_dir / "adapters" / "client_01")(x), logits)
    probs = torch.softmax(logits, dim=-1)
    for row, pred in zip(probs, predictions):
        assert len(pred) == 3 and all(isinstance(c, str) and isinstance(p, float) for c, p in pred)
        best = row.argsort(descending=True)[:3].tolist()
        assert [c for c, _ in pred] == [CLASSES[i] for i in best]
        assert [p for _, p in pred] == pytest.approx(row[best].tolist(), abs=1e-6)
    assert len(model.predict(paths[0], top_k=100)[0]) == len(CLASSES)  # one image; all classes at most
    # an adapter folder and the run directory with client= give the same model
    same = fedlrm.load_personalized(run_dir / "adapters" / "client_01")
    assert same.predict(paths, top_k=3) == predictions


def test_predict_command_on_files_folders_and_parquet(run_dir, labelled_folder, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "preds" / "p.csv"
    single = labelled_folder / "red" / "1.jpg"
    code, stdout, err = run_cli(capsys, "predict", run_dir, "--client", 0, single, labelled_folder / "blue",
                                tiny_dataset["test"], "--top-k", 2, "--out", out)
    assert code == 0, err
    rows = read_csv(out)
    n_parquet = 8 * len(CLASSES)
    assert len(rows) == 1 + 4 + n_parquet  # the folder search is recursive (3 JPEGs and a nested PNG)
    assert rows[0]["image"] == str(single) and rows[-1]["image"] == f"{tiny_dataset['test']}#{n_parquet - 1}"
    assert set(rows[0]) == {"image", "class_1", "prob_1", "class_2", "prob_2"}
    model = fedlrm.load_personalized(run_dir, client=0)
    expected = model.predict([single], top_k=2)[0]
    assert (rows[0]["class_1"], rows[0]["class_2"]) == (expected[0][0], expected[1][0])
    assert float(rows[0]["prob_1"]) == pytest.approx(expected[0][1], abs=1e-5)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)
    assert str(out.resolve()) in stdout.replace("\n", "") and "top-2" in stdout


def test_predict_writes_beside_the_working_directory_by_default(run_dir, labelled_folder, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "predict", run_dir / "adapters" / "client_00", labelled_folder / "red")
    assert code == 0, err
    assert len(read_csv(tmp_path / "predictions.csv")) == 4 and "prob_3" in read_csv(tmp_path / "predictions.csv")[0]


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_evaluate_command_writes_accuracy_per_class_and_confusion(kind, run_dir, labelled_folder, tiny_dataset,
                                                                  tmp_path, capsys):
    data = labelled_folder if kind == "folder" else tiny_dataset["test"]
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "evaluate", run_dir, "--client", 1, data, "--out", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    per_image = read_csv(out / "predictions.csv")
    n = 4 * len(CLASSES) if kind == "folder" else 8 * len(CLASSES)
    assert metrics["images"] == len(per_image) == n
    assert metrics["accuracy"] == pytest.approx(sum(int(r["correct"]) for r in per_image) / n)
    assert {r["label"] for r in per_image} == set(CLASSES)
    # the command's predictions are the Python API's
    model = fedlrm.load_personalized(run_dir, client=1)
    if kind == "folder":
        paths = [r["image"] for r in per_image]
        assert [r["predicted"] for r in per_image] == [p[0][0] for p in model.predict(paths, top_k=1)]
    matrix = np.array(metrics["confusion"]["matrix"])
    classes = metrics["confusion"]["classes"]
    assert matrix.sum() == n and np.trace(matrix) == metrics["correct"]
    for row in metrics["per_class"]:
        i = classes.index(row["class"])
        assert row["images"] == matrix[i].sum() and row["accuracy"] == pytest.approx(matrix[i, i] / matrix[i].sum())
    assert [r["class"] for r in read_csv(out / "per_class.csv")] == [r["class"] for r in metrics["per_class"]]
    assert len(read_csv(out / "confusion_matrix.csv")) == len(classes)
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{100 * metrics['accuracy']:.2f}%" in stdout and "confusion matrix" in stdout


@pytest.fixture
def broken_inputs(tmp_path, run_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "unfinished").mkdir()
    shutil.copy(run_dir / "config.yaml", tmp_path / "unfinished" / "config.yaml")
    gap = tmp_path / "gap"
    (gap / "adapters").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", gap / "config.yaml")
    shutil.copytree(run_dir / "adapters" / "client_00", gap / "adapters" / "client_00")
    shutil.copytree(run_dir / "adapters" / "client_01", gap / "adapters" / "client_02")
    wrong = tmp_path / "wrong-classes"
    for name in ("red", "purple"):
        (wrong / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (120, 0, 120)).save(wrong / name / "a.png")
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["predict", "{run}", "--client", "0", "{tmp}/missing"], "no such image file, folder or Parquet file"),
    (["predict", "{run}", "--client", "0", "{tmp}/empty"], "holds no images"),
    (["predict", "{tmp}/gap", "--client", "1", "{images}"], "has no model of client 1"),
    (["predict", "{run}", "--client", "2", "{images}"], "client 2 is out of range"),
    (["predict", "{run}", "--client", "-1", "{images}"], "client -1 is out of range"),
    (["predict", "{run}", "{images}"], "say which client's model to use with --client"),
    (["predict", "{tmp}/unfinished", "--client", "0", "{images}"], "has no personalized models"),
    (["predict", "{tmp}/not-a-run", "{images}"], "neither a run directory"),
    (["predict", "{tmp}/nowhere", "{images}"], "no such run directory or adapter folder"),
    (["predict", "{run}", "--client", "0", "{images}", "--top-k", "0"], "--top-k must be at least 1"),
    (["evaluate", "{run}", "--client", "0", "{tmp}/wrong-classes"], "purple"),
    (["evaluate", "{run}", "--client", "0", "{tmp}/empty"], "holds no images"),
    (["evaluate", "{run}", "--client", "0", "{parquet}", "--label-column", "kind"], "no column 'kind'"),
    (["export", "{run}", "--client", "5", "--merged", "{tmp}/out"], "out of range"),
])
def test_bad_input_exits_2_and_writes_nothing(argv, message, broken_inputs, run_dir, labelled_folder, tiny_dataset,
                                              capsys, monkeypatch):
    tmp = broken_inputs
    monkeypatch.chdir(tmp)
    fill = {"{run}": str(run_dir), "{tmp}": str(tmp), "{images}": str(labelled_folder / "red"),
            "{parquet}": tiny_dataset["test"]}
    args = []
    for a in argv:
        for k, v in fill.items():
            a = a.replace(k, v)
        args.append(a)
    before = sorted(p.name for p in tmp.iterdir())
    code, _, err = run_cli(capsys, *args, *(["--out", tmp / "out"] if argv[0] != "export" else []))
    assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp.iterdir()) == before  # no out file or folder, no default predictions.csv
