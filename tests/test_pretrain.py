"""The built-in backbone's pretraining recipe (fedlrm pretrain), the assets it ships, how they
join with the text package into a from_pretrained folder, and the rule that a federation never
trains on a pretraining image.

The recipe tests run on synthetic CIFAR-10- and Caltech101-like files built here (JPEG, Hugging
Face image parquet layout) with a miniature image tower, so they need neither ../shared/datasets
nor the committed assets; the tests of the committed assets skip when those are absent.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from PIL import Image  # noqa: E402

from fedlrm.config import DataConfig  # noqa: E402
from fedlrm.data import load_federated_data  # noqa: E402
from fedlrm.data.pretraining import PretrainedOn, decode_rows, encode_rows  # noqa: E402
from fedlrm.errors import DataError, FedLRMError  # noqa: E402
from fedlrm.models import builtin  # noqa: E402
from fedlrm.tools import pretrain  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CALTECH_NAMES = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "airplanes", "ant", "car_side", "yin_yang"]
TINY_ARGS = ["--epochs", "1", "--batch-size", "32", "--subset-train-per-class", "2", "--subset-test-per-class", "2",
             "--image-size", "16", "--patch-size", "8", "--vision-width", "32", "--vision-layers", "1",
             "--vision-heads", "2", "--projection-dim", "16", "--heldout-classes", "2", "--threads", "1",
             "--no-progress"]


def _write_split(path: Path, names: list[str], per_class: int, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(per_class * len(names)):
        label = i % len(names)
        colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256])
        pixels = np.clip(colour + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": f"{names[label]}/{i:04d}.jpg"})
        labels.append(label)
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}}}
    table = pa.table({"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_split(root / "cifar10-train.parquet", pretrain.CIFAR10_NAMES, 12, 1, (32, 32))
    _write_split(root / "cifar10-test.parquet", pretrain.CIFAR10_NAMES, 4, 2, (32, 32))
    _write_split(root / "caltech101-train.parquet", CALTECH_NAMES, 7, 3, (40, 30))
    _write_split(root / "caltech101-test.parquet", CALTECH_NAMES, 3, 4, (30, 40))
    return root


def _run(data: Path, out: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return pretrain.run(parser.parse_args(["--data", str(data), "--out", str(out), *TINY_ARGS, *extra]))


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    return out, _run(tiny_data, out)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDLRM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_asset_holds_only_what_was_trained_and_joins_into_a_dual_encoder(tiny_run, cache):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    out, record = tiny_run
    asset = out / "tiny-clip"
    assert not (asset / "model.safetensors").exists()  # from_pretrained on the bare asset fails, never half-loads
    trained = load_file(asset / builtin.TRAINED_FILE)
    assert trained and not any(k.startswith("text_model.") for k in trained)
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= set(trained)
    assert record["model"]["trained_parameters"] == sum(v.numel() for v in trained.values())
    assert json.loads((asset / "config.json").read_text())["text_pooling"] == "mean"

    joined = builtin.builtin_model_dir(asset)
    assert joined.parent.parent == cache and builtin.builtin_model_dir(asset) == joined  # made once, then reused
    model = VisionTextDualEncoderModel.from_pretrained(joined)
    text = load_file(builtin.text_model_dir() / "model.safetensors")
    state = model.state_dict()
    assert torch.equal(state["text_model.encoder.layer.0.attention.self.query.weight"],
                       text["encoder.layer.0.attention.self.query.weight"])
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    tokenizer = AutoTokenizer.from_pretrained(joined)
    assert tokenizer("a photo of a yin yang.")["input_ids"][0] == tokenizer.cls_token_id  # the text model's WordPiece
    assert record["reload_check"]["agree"] and record["reload_check"]["num_images"] == 20


def test_the_joined_folder_refuses_a_text_model_other_than_the_recorded_one(tiny_run, cache, tmp_path):
    import shutil

    out, _ = tiny_run
    asset = tmp_path / "asset"
    shutil.copytree(out / "tiny-clip", asset)
    record = json.loads((asset / "PRETRAIN.json").read_text())
    record["text_model"]["sha256"] = "0" * 64
    (asset / "PRETRAIN.json").write_text(json.dumps(record))
    with pytest.raises(FedLRMError, match="not the text encoder"):
        builtin.builtin_model_dir(asset)
    assert not list((cache / "builtin").glob("tiny-clip-*"))  # nothing joined


def test_an_unwritable_cache_is_a_clear_error(tiny_run, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FEDLRM_CACHE", str(blocked))
    with pytest.raises(FedLRMError, match="FEDLRM_CACHE"):
        builtin.builtin_model_dir(tiny_run[0] / "tiny-clip")


def test_pretraining_rows_hold_out_the_subset_the_held_out_classes_and_half_of_each_class(tiny_run, tiny_data):
    out, record = tiny_run
    source = json.loads((out / "cifar10-subset" / "SOURCE.json").read_text())
    on = PretrainedOn.read(out / "tiny-clip")
    cifar = on.rows_of(tiny_data / "cifar10-train.parquet")
    subset = np.array(source["train"]["indices"])
    assert len(subset) == 20 and not np.intersect1d(cifar, subset).size
    assert sorted(np.concatenate([cifar, subset]).tolist()) == list(range(120))  # every other CIFAR image

    caltech = on.rows_of(tiny_data / "caltech101-train.parquet")
    labels = pq.read_table(tiny_data / "caltech101-train.parquet").column("label").to_numpy()
    held = record["held_out_classes"]["names"]
    assert len(held) == 2 and not {"BACKGROUND_Google", "Faces_easy"} & set(held)
    counts = {CALTECH_NAMES[c]: n for c, n in zip(*np.unique(labels[caltech], return_counts=True))}
    pretrained = [n for n in CALTECH_NAMES if n not in held and n not in ("BACKGROUND_Google", "Faces_easy")]
    assert counts == {n: 3 for n in pretrained}  # int(0.5 * 7) of each, none of the others
    zs = record["zero_shot"]
    assert zs["caltech101_test"]["classes"] == 6 and zs["caltech101_held_out_classes"]["classes"] == held
    assert zs["cifar10_test"]["images"] == 40 and 0 <= zs["cifar10_test"]["accuracy"] <= 1


def test_federations_leave_out_every_pretraining_image(tiny_run, tiny_data):
    out, _ = tiny_run
    on = PretrainedOn.read(out / "tiny-clip")

    def used_rows(name: str, **kw) -> np.ndarray:
        cfg = DataConfig(source="parquet", train=str(tiny_data / f"{name}-train.parquet"),
                         test=str(tiny_data / f"{name}-test.parquet"), num_clients=2, shots=0,
                         test_per_client=None, **kw)
        data = load_federated_data(cfg, lambda images: torch.zeros(len(images), 3, 4, 4), 0, pretrained_on=on)
        return np.concatenate([c.train.rows for c in data.clients])

    for name in ("cifar10", "caltech101"):
        seen = on.rows_of(tiny_data / f"{name}-train.parquet")
        kept = used_rows(name, exclude_classes=["BACKGROUND_Google", "Faces_easy"] if name == "caltech101" else [])
        assert len(kept) and not np.intersect1d(kept, seen).size
        assert np.intersect1d(used_rows(name, exclude_pretraining=False), seen).size == len(seen)  # opt-out keeps them
    subset = json.loads((out / "cifar10-subset" / "SOURCE.json").read_text())["train"]["indices"]
    assert sorted(used_rows("cifar10").tolist()) == sorted(subset)


def test_a_file_named_like_a_pretraining_file_with_other_contents_gets_a_warning(tiny_run, tmp_path):
    out, _ = tiny_run
    on = PretrainedOn.read(out / "tiny-clip")
    other = tmp_path / "cifar10-train.parquet"
    _write_split(other, pretrain.CIFAR10_NAMES, 12, 99, (32, 32))
    _write_split(tmp_path / "test.parquet", pretrain.CIFAR10_NAMES, 2, 98, (32, 32))
    cfg = DataConfig(source="parquet", train=str(other), test=str(tmp_path / "test.parquet"), num_clients=2,
                     shots=0, test_per_client=None)
    with pytest.warns(UserWarning, match="name of a file the backbone was pretrained on"):
        load_federated_data(cfg, lambda images: torch.zeros(len(images), 3, 4, 4), 0, pretrained_on=on)


def test_row_bitmaps_round_trip():
    rows = np.array([0, 3, 8, 9, 1023])
    assert decode_rows(encode_rows(rows, 1024), 1024).tolist() == rows.tolist()
    assert decode_rows(encode_rows(np.zeros(0, dtype=np.int64), 5), 5).tolist() == []


def test_same_arguments_give_identical_weights_and_another_seed_others(tiny_run, tiny_data, tmp_path):
    out_a, _ = tiny_run
    _run(tiny_data, tmp_path / "b")
    _run(tiny_data, tmp_path / "c", "--seed", "1")
    name = builtin.TRAINED_FILE
    a, b, c = ((d / "tiny-clip" / name).read_bytes() for d in (out_a, tmp_path / "b", tmp_path / "c"))
    assert a == b and a != c
    for f in ("train.parquet", "test.parquet", "SOURCE.json"):
        assert (out_a / "cifar10-subset" / f).read_bytes() == (tmp_path / "b" / "cifar10-subset" / f).read_bytes()


def test_missing_files_and_bad_arguments_are_clear_errors_that_write_nothing(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="caltech101-train.parquet"):
        _run(empty, tmp_path / "out")
    for extra, message in ((["--image-size", "20"], "multiple of --patch-size"),
                           (["--caltech-fraction", "1"], "between 0 and 1"),
                           (["--heldout-classes", "6"], "no Caltech101 class")):
        with pytest.raises(FedLRMError, match=message):
            _run(tiny_data, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_command_line_exits_2_on_missing_data(tmp_path, capsys):
    from fedlrm.cli import main

    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cifar10-train.parquet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- committed assets


def _shipped():
    from fedlrm.config import BUILTIN_DATASET_DIR

    if not (builtin.ASSET_DIR / "PRETRAIN.json").is_file() or not (BUILTIN_DATASET_DIR / "SOURCE.json").is_file():
        pytest.skip("the committed assets are absent (run `fedlrm pretrain`)")
    return builtin.ASSET_DIR, BUILTIN_DATASET_DIR, json.loads((builtin.ASSET_DIR / "PRETRAIN.json").read_text())


def test_the_shipped_asset_is_small_and_records_its_recipe():
    model_dir, _, record = _shipped()
    assert sum(p.stat().st_size for p in model_dir.iterdir()) < 20e6
    assert record["recipe_version"] == 2 and record["reload_check"]["agree"]
    assert record["arguments"]["image_size"] == 64
    assert record["zero_shot"]["cifar10_test"]["images"] == 10_000
    assert record["zero_shot"]["caltech101_test"]["classes"] == 100


def test_the_shipped_subset_is_disjoint_from_pretraining():
    model_dir, subset_dir, record = _shipped()
    source = json.loads((subset_dir / "SOURCE.json").read_text())
    entry = next(e for e in record["pretrain_rows"] if e["source_file"] == "cifar10-train.parquet")
    assert entry["source_sha256"] == source["train"]["source_sha256"]
    used = set(decode_rows(entry["bitmap"], entry["num_rows"]).tolist())
    assert len(used) == entry["count"] == 47_000
    subset_train = source["train"]["indices"]
    assert len(subset_train) == len(set(subset_train)) == 3000 and not used & set(subset_train)
    for split, n in (("train", 3000), ("test", 2000)):
        assert pq.read_metadata(subset_dir / f"{split}.parquet").num_rows == n


@pytest.mark.parametrize("name", ["cifar10", "caltech101"])
def test_federations_on_the_shared_files_train_on_no_pretraining_image(name):
    model_dir, subset_dir, _ = _shipped()
    train, test = SHARED / f"{name}-train.parquet", SHARED / f"{name}-test.parquet"
    if not train.is_file():
        pytest.skip(f"{train} is not available")
    on = PretrainedOn.read(model_dir)
    seen = on.rows_of(train)
    assert seen is not None and len(seen) > 0  # recognised by content
    cfg = DataConfig(source="parquet", train=str(train), test=str(test), shots=16, test_per_client=None,
                     verify_images=False,
                     exclude_classes=["BACKGROUND_Google", "Faces_easy"] if name == "caltech101" else [])
    data = load_federated_data(cfg, lambda images: torch.zeros(len(images), 3, 4, 4), 0, pretrained_on=on)
    used = np.concatenate([c.train.rows for c in data.clients])
    assert len(used) and not np.intersect1d(used, seen).size
    if name == "cifar10":
        subset = json.loads((subset_dir / "SOURCE.json").read_text())["train"]["indices"]
        assert set(used.tolist()) <= set(subset)


def test_the_shipped_subset_rows_are_the_recorded_source_rows():
    _, subset_dir, _ = _shipped()
    source = json.loads((subset_dir / "SOURCE.json").read_text())
    for split in ("train", "test"):
        src = SHARED / source[split]["source_file"]
        if not src.is_file():
            pytest.skip(f"{src} is not available")
        rows = pq.read_table(src).take(pa.array(source[split]["indices"]))
        shipped = pq.read_table(subset_dir / f"{split}.parquet")
        assert rows.column("label").to_pylist() == shipped.column("label").to_pylist()
        assert rows.column("image").to_pylist() == shipped.column("image").to_pylist()
