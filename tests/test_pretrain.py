"""The tiny-CLIP pretraining recipe (fedlrm.pretrain) and the assets it ships.

The recipe tests run on a synthetic CIFAR-like data directory built here (JPEG 32x32,
Hugging Face image parquet layout), so they need neither ../shared/datasets nor the
committed assets; the tests of the committed assets skip when those are absent.
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

from fedlrm.errors import DataError  # noqa: E402
from fedlrm.tools import pretrain  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TINY_ARGS = ["--pretrain-images", "64", "--epochs", "1", "--batch-size", "32", "--subset-train-per-class", "2",
             "--subset-test-per-class", "2", "--threads", "1", "--no-progress"]


def _write_split(path: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = pretrain.CIFAR10_NAMES
    images, labels = [], []
    for i in range(per_class * len(names)):
        label = i % len(names)
        colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256])
        pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": f"{names[label]}/{i:04d}.jpg"})
        labels.append(label)
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"_type": "ClassLabel", "names": names}}}}
    table = pa.table({"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, type=pa.int64())})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_split(root / pretrain.TRAIN_FILE, per_class=12, seed=1)
    _write_split(root / pretrain.TEST_FILE, per_class=4, seed=2)
    return root


def _run(data: Path, out: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return pretrain.run(parser.parse_args(["--data", str(data), "--out", str(out), *TINY_ARGS, *extra]))


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    return out, _run(tiny_data, out)


def _load(model_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    return (CLIPModel.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir)),
            AutoImageProcessor.from_pretrained(str(model_dir)))


def _check_model_dir(model_dir: Path) -> None:
    model, tokenizer, processor = _load(model_dir)
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.image_size, vision.patch_size) == (32, 4)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 32
    assert text.vocab_size == len(tokenizer)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert text.eos_token_id != 2  # 2 selects transformers' legacy argmax pooling
    # the text tower pools at the eos of each (right-padded) prompt
    tokens = tokenizer(["a cat.", "a blurry photo of a automobile."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(**tokens)
    eos = (tokens["input_ids"] == tokenizer.eos_token_id).int().argmax(-1)
    assert eos[0] < tokens["input_ids"].shape[1] - 1  # the short prompt is padded after its eos
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])
    pixels = processor(images=[Image.new("RGB", (32, 32), (10, 200, 30))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert (model_dir / "model.safetensors").stat().st_size < 10_000_000


def test_output_directory_loads(tiny_run):
    out, record = tiny_run
    _check_model_dir(out / "tiny-clip")
    assert json.loads((out / "tiny-clip" / "PRETRAIN.json").read_text()) == json.loads(json.dumps(record))
    assert record["reload_check"]["agree"] and record["reload_check"]["pixel_max_abs_diff"] == 0
    for key in ("cifar10_test_full", "cifar10_subset_test"):
        assert 0 <= record["zero_shot"][key]["accuracy"] <= 1
    assert record["arguments"]["pretrain_images"] == 64 and record["versions"]["torch"]


def test_subset_layout_and_disjointness(tiny_run, tiny_data):
    import datasets

    out, record = tiny_run
    subset = out / "cifar10-subset"
    source = json.loads((subset / "SOURCE.json").read_text())
    for split, per_class in (("train", 2), ("test", 2)):
        ds = datasets.load_dataset("parquet", data_files=str(subset / f"{split}.parquet"), split="train",
                                   cache_dir=str(out / ".hf-cache"))
        assert ds.features["label"].names == pretrain.CIFAR10_NAMES
        assert sorted(ds["label"]) == sorted(list(range(10)) * per_class)
        assert ds[0]["image"].size == (32, 32)
        original = pq.read_table(tiny_data / source[split]["source_file"])
        rows = original.take(pa.array(source[split]["indices"]))
        assert rows.column("image").to_pylist() == pq.read_table(subset / f"{split}.parquet").column("image").to_pylist()
    used = pretrain.pretrain_indices(record)
    assert len(used) == 64
    assert not set(used.tolist()) & set(source["train"]["indices"])


def test_same_seed_same_weights(tiny_run, tiny_data, tmp_path):
    from safetensors.torch import load_file

    out_a, record_a = tiny_run
    _run(tiny_data, tmp_path / "b")
    _run(tiny_data, tmp_path / "c", "--seed", "1")
    a = load_file(out_a / "tiny-clip" / "model.safetensors")
    b = load_file(tmp_path / "b" / "tiny-clip" / "model.safetensors")
    c = load_file(tmp_path / "c" / "tiny-clip" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for name in ("train.parquet", "test.parquet", "SOURCE.json"):
        assert (out_a / "cifar10-subset" / name).read_bytes() == (tmp_path / "b" / "cifar10-subset" / name).read_bytes()
    for name in ("tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (out_a / "tiny-clip" / name).read_bytes() == (tmp_path / "b" / "tiny-clip" / name).read_bytes()


def test_tokenizer_class_names():
    tok = pretrain.build_tokenizer()
    unk = tok.unk_token_id

    def ids(name):
        return tok(pretrain.EVAL_TEMPLATE.format(name))["input_ids"]

    cifar = {tuple(ids(n)) for n in pretrain.CIFAR10_NAMES}
    assert len(cifar) == 10  # distinct prompts for distinct class names
    words = [tok(n, add_special_tokens=False)["input_ids"] for n in pretrain.CALTECH101_NAMES]
    assert all(w and unk not in w for w in words)
    normalised = {n.lower().replace("_", " ") for n in pretrain.CALTECH101_NAMES}
    assert len({tuple(w) for w in words}) == len(normalised)
    for unseen in ("xylophone", "zebra", "quokka", "great white shark"):
        w = tok(unseen, add_special_tokens=False)["input_ids"]
        assert w and unk not in w  # decomposes into sub-words, never one unknown token
    full = ids("airplane")
    assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
    assert tok.decode(full, skip_special_tokens=True).replace(" .", ".") == "a photo of a airplane."
    # the learner is deterministic
    assert pretrain.build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_preprocessing_matches_image_processor():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    processor = pretrain.build_image_processor()
    expected = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(pretrain.to_pixel_values(images), expected.float())


def test_index_bitmap_roundtrip():
    rows = np.array([0, 3, 7, 8, 49_999])
    assert np.array_equal(pretrain.decode_indices(pretrain.encode_indices(rows, 50_000), 50_000), rows)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="--data"):
        pretrain.resolve_data_dir(tmp_path)
    assert pretrain.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cifar10-train.parquet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_caltech_names_match_shared_metadata():
    path = SHARED / "caltech101-train.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    meta = json.loads(pq.read_schema(path).metadata[b"huggingface"])
    assert meta["info"]["features"]["label"]["names"] == pretrain.CALTECH101_NAMES


# ------------------------------------------------------------- committed assets


def _shipped():
    from fedlrm.config import ASSETS, BUILTIN_DATASET_DIR

    model_dir = ASSETS / "tiny-clip"
    if not (model_dir / "PRETRAIN.json").is_file() or not (BUILTIN_DATASET_DIR / "SOURCE.json").is_file():
        pytest.skip("the committed assets are absent (run `fedlrm pretrain`)")
    return model_dir, BUILTIN_DATASET_DIR


def test_shipped_model_loads():
    model_dir, _ = _shipped()
    _check_model_dir(model_dir)
    record = json.loads((model_dir / "PRETRAIN.json").read_text())
    assert record["reload_check"]["agree"]
    assert record["zero_shot"]["cifar10_test_full"]["images"] == 10_000
    assert record["zero_shot"]["cifar10_test_full"]["accuracy"] > 0.3


def test_shipped_subset_disjoint_from_pretraining(tmp_path):
    import datasets

    model_dir, subset_dir = _shipped()
    record = json.loads((model_dir / "PRETRAIN.json").read_text())
    source = json.loads((subset_dir / "SOURCE.json").read_text())
    used = set(pretrain.pretrain_indices(record).tolist())
    assert len(used) == record["pretrain_rows"]["count"]
    subset_train = source["train"]["indices"]
    assert len(subset_train) == len(set(subset_train)) == 3000 and len(source["test"]["indices"]) == 2000
    assert not used & set(subset_train)
    for split, n in (("train", 3000), ("test", 2000)):
        path = subset_dir / f"{split}.parquet"
        assert pq.read_metadata(path).num_rows == n
        names = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]["label"]["names"]
        assert names == pretrain.CIFAR10_NAMES
    ds = datasets.load_dataset("parquet", data_files={"train": str(subset_dir / "train.parquet")},
                               cache_dir=str(tmp_path))["train"]
    assert ds.features["label"].names == pretrain.CIFAR10_NAMES
    assert np.bincount(ds["label"]).tolist() == [300] * 10


def test_shipped_subset_rows_are_the_recorded_source_rows():
    _, subset_dir = _shipped()
    source = json.loads((subset_dir / "SOURCE.json").read_text())
    for split in ("train", "test"):
        src = SHARED / source[split]["source_file"]
        if not src.is_file():
            pytest.skip(f"{src} is not available")
        rows = pq.read_table(src).take(pa.array(source[split]["indices"]))
        shipped = pq.read_table(subset_dir / f"{split}.parquet")
        assert rows.column("label").to_pylist() == shipped.column("label").to_pylist()
        assert rows.column("image").to_pylist() == shipped.column("image").to_pylist()
