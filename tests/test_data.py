"""Tests of fedlrm.data on tiny datasets written here (parquet files and image folders)."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fedlrm import config as fedlrm_config
from fedlrm.config import DataConfig
from fedlrm.data import (
    ClientSplit,
    FederatedData,
    ImageSet,
    load_federated_data,
    random_resized_crop_flip,
)
from fedlrm.errors import DataError

CLASSES = ["red_thing", "green", "blue", "yellow", "cyan", "magenta"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220),
           (220, 30, 220)]
N_TRAIN, N_TEST = 30, 12  # images per class
SIZE = 8  # side of the preprocessed images


def jpeg(colour: tuple[int, int, int], rng: np.random.Generator, side: int = 16) -> bytes:
    noise = rng.integers(-25, 26, size=(side, side, 3))
    pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_parquet(path: Path, per_class: int, classes=CLASSES, seed: int = 0,
                  corrupt_row: int | None = None, skip: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, name in enumerate(classes):
        if name in skip:
            continue
        for i in range(per_class):
            images.append({"bytes": jpeg(COLOURS[c % len(COLOURS)], rng),
                           "path": f"{name}/{i:03d}.jpg"})
            labels.append(c)
    if corrupt_row is not None:
        images[corrupt_row] = {"bytes": b"this is not a jpeg", "path": "broken/bad_image.jpg"}
    ds = datasets.Dataset.from_dict({"image": images, "label": labels})
    ds = ds.cast_column("image", datasets.Image())
    ds = ds.cast_column("label", datasets.ClassLabel(names=list(classes)))
    ds.to_parquet(str(path))
    return path


def preprocess(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR)) for im in images])
    x = torch.from_numpy(arr.astype(np.float32) / 255).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.25


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """Keep the datasets cache of these tiny files out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE",
                   Path(tmp_path_factory.mktemp("hf_cache")))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        yield
        if bars:
            datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_parquet(root / "train.parquet", N_TRAIN, seed=1),
            "test": write_parquet(root / "test.parquet", N_TEST, seed=2),
            "root": root}


def make_cfg(files, **overrides) -> DataConfig:
    settings = dict(source="parquet", train=str(files["train"]), test=str(files["test"]),
                    num_clients=3, partition="shard", shards_per_client=2, shots=4,
                    test_per_client=10)
    settings.update(overrides)
    return DataConfig(**settings)


@pytest.fixture(scope="module")
def source_labels(files) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "test"):
        ds = datasets.load_dataset("parquet", data_files=str(files[split]), split="train")
        out[split] = np.asarray(ds.with_format("numpy")[:]["label"])
    return out


@pytest.fixture(scope="module")
def shard_data(files) -> FederatedData:
    return load_federated_data(make_cfg(files), preprocess, seed=0)


def ids(data: FederatedData) -> list:
    return ([(c.train.rows.tolist(), c.test.rows.tolist()) for c in data.clients]
            + [data.global_test.rows.tolist()])


# --- splitting -------------------------------------------------------------------------

def test_types_and_summary(shard_data):
    assert isinstance(shard_data, FederatedData)
    assert shard_data.class_names == ["red thing", "green", "blue", "yellow", "cyan", "magenta"]
    assert len(shard_data.clients) == 3
    assert all(isinstance(c, ClientSplit) and isinstance(c.train, ImageSet)
               for c in shard_data.clients)
    assert [c.client_id for c in shard_data.clients] == [0, 1, 2]
    summary = shard_data.summary()
    assert [s["client"] for s in summary] == [0, 1, 2]
    for s, c in zip(summary, shard_data.clients):
        assert set(s) == {"client", "n_train", "n_test", "classes"}
        assert s["n_train"] == len(c.train) and s["n_test"] == len(c.test)
        assert s["classes"] == sorted(set(c.train.labels.tolist()))
    assert len(shard_data.global_test) == N_TEST * len(CLASSES)


def test_shard_clients_hold_few_classes_and_disjoint_images(files, source_labels):
    data = load_federated_data(make_cfg(files, shots=0), preprocess, seed=3)
    seen: set[int] = set()
    for client in data.clients:
        rows = client.train.rows.tolist()
        # 6 shards of 30 sorted images = one class each; 2 shards per client.
        assert 1 <= len(client.train.classes) <= 2
        assert not seen & set(rows), "clients share training images"
        seen |= set(rows)
        assert client.train.labels.tolist() == source_labels["train"][rows].tolist()
        assert len(rows) == 60  # shots=0 keeps the whole partition
    assert len(seen) == N_TRAIN * len(CLASSES)  # every shard is used


def test_few_shot_counts_per_class(files):
    data = load_federated_data(make_cfg(files, shots=4), preprocess, seed=0)
    for client in data.clients:
        counts = Counter(client.train.labels.tolist())
        assert all(n == 4 for n in counts.values()), counts
        assert len(set(client.train.rows.tolist())) == len(client.train)
    # More shots than a class has in the partition: all of them.
    many = load_federated_data(make_cfg(files, shots=50), preprocess, seed=0)
    for client in many.clients:
        assert all(n == N_TRAIN for n in Counter(client.train.labels.tolist()).values())


def test_few_shot_with_unequal_partitions(files):
    from fedlrm.data.partition import few_shot

    rows = np.arange(100, 130)
    labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
    chosen = few_shot(rows, labels, 5, seed=0, client=1)
    counts = Counter(labels[chosen - 100].tolist())
    assert counts == {0: 5, 1: 3, 2: 5}
    assert np.array_equal(chosen, few_shot(rows, labels, 5, seed=0, client=1))
    assert not np.array_equal(chosen, few_shot(rows, labels, 5, seed=0, client=2))
    assert np.array_equal(few_shot(rows, labels, 0, seed=0, client=1), rows)


def test_client_test_sets_follow_partition_proportions(files, source_labels):
    cfg = make_cfg(files, partition="dirichlet", dirichlet_alpha=0.5, shots=2,
                   test_per_client=17)
    data = load_federated_data(cfg, preprocess, seed=5)
    from fedlrm.data import partition as part

    train_rows = np.arange(N_TRAIN * len(CLASSES))
    parts = part.partition(source_labels["train"], train_rows, cfg, 5)
    for client, rows in zip(data.clients, parts):
        want = np.bincount(source_labels["train"][rows], minlength=6)
        got = np.bincount(client.test.labels.numpy(), minlength=6)
        assert got.sum() == 17
        assert np.all(np.abs(got - 17 * want / want.sum()) < 1), (got, want)
        assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))
        assert len(set(client.test.rows.tolist())) == len(client.test)  # no replacement
        assert client.test.labels.tolist() == source_labels["test"][client.test.rows].tolist()
        # the few-shot train set has the partition's classes
        assert client.train.classes == np.flatnonzero(want).tolist()


def test_client_test_size_none_is_largest_with_proportions():
    from fedlrm.data.partition import client_test

    train = np.array([0] * 30 + [1] * 10)  # 3:1
    test = np.array([0] * 12 + [1] * 12 + [2] * 5)
    positions, largest = client_test(train, test, None, seed=0, client=0,
                                     class_names=["a", "b", "c"])
    assert largest == 16 and len(positions) == 16
    assert Counter(test[positions].tolist()) == {0: 12, 1: 4}
    # asking for more than possible gives the largest possible
    positions, _ = client_test(train, test, 100, seed=0, client=0, class_names=["a", "b", "c"])
    assert len(positions) == 16


def test_same_seed_same_split_other_seed_other_split(files, shard_data):
    again = load_federated_data(make_cfg(files), preprocess, seed=0)
    assert ids(again) == ids(shard_data)
    assert torch.equal(next(again.clients[1].train.batches(64))[0],
                       next(shard_data.clients[1].train.batches(64))[0])
    other = load_federated_data(make_cfg(files), preprocess, seed=1)
    assert ids(other) != ids(shard_data)


@pytest.mark.parametrize("partition", ["dirichlet", "classes"])
def test_other_partitioners_deterministic(files, partition):
    cfg = make_cfg(files, partition=partition, classes_per_client=2, shots=3)
    a = load_federated_data(cfg, preprocess, seed=0)
    b = load_federated_data(cfg, preprocess, seed=0)
    c = load_federated_data(cfg, preprocess, seed=7)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    if partition == "classes":
        assert all(len(client.train.classes) == 2 for client in a.clients)


def test_global_test_subsample(files):
    data = load_federated_data(make_cfg(files, global_test_size=20), preprocess, seed=0)
    again = load_federated_data(make_cfg(files, global_test_size=20), preprocess, seed=0)
    other = load_federated_data(make_cfg(files, global_test_size=20), preprocess, seed=1)
    assert len(data.global_test) == 20
    assert len(set(data.global_test.rows.tolist())) == 20
    assert data.global_test.rows.tolist() == again.global_test.rows.tolist()
    assert data.global_test.rows.tolist() != other.global_test.rows.tolist()


def test_exclude_classes_relabels(files, source_labels):
    data = load_federated_data(make_cfg(files, exclude_classes=["red_thing", "blue"], shots=0,
                                        num_clients=2),
                               preprocess, seed=0)
    assert data.class_names == ["green", "yellow", "cyan", "magenta"]
    new_id = {1: 0, 3: 1, 4: 2, 5: 3}
    for imageset in [c.train for c in data.clients] + [c.test for c in data.clients] + [
            data.global_test]:
        split = "train" if imageset in [c.train for c in data.clients] else "test"
        original = source_labels[split][imageset.rows]
        assert not set(original.tolist()) & {0, 2}
        assert imageset.labels.tolist() == [new_id[o] for o in original.tolist()]
    assert len(data.global_test) == 4 * N_TEST
    # the readable spelling works too
    spaced = load_federated_data(make_cfg(files, exclude_classes=["red thing"]), preprocess, 0)
    assert spaced.class_names[0] == "green"


# --- image sets ------------------------------------------------------------------------

def test_batches_shapes_and_dtypes(shard_data):
    imageset = shard_data.clients[0].train
    batches = list(imageset.batches(3))
    assert [len(y) for _, y in batches] == [3, 3, 2]  # 8 images: 2 classes x 4 shots
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE)
        assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, imageset.labels)
    assert imageset.labels.dtype == torch.int64
    assert imageset.cached
    assert list(shard_data.global_test.batches(1000))[0][0].shape == (len(shard_data.global_test), 3,
                                                                     SIZE, SIZE)


def test_images_match_their_rows(files, shard_data):
    ds = datasets.load_dataset("parquet", data_files=str(files["test"]), split="train")
    imageset = shard_data.clients[2].test
    x, _ = next(imageset.batches(4))
    expected = preprocess([ds[int(r)]["image"].convert("RGB") for r in imageset.rows[:4]])
    assert torch.allclose(x, expected)


def test_shuffle_reproducible_with_generator(shard_data):
    imageset = shard_data.global_test

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return [(x, y) for x, y in imageset.batches(16, shuffle=True, generator=g)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    la, lc = torch.cat([y for _, y in a]), torch.cat([y for _, y in c])
    assert not torch.equal(la, lc)
    assert not torch.equal(la, imageset.labels)
    assert torch.equal(la.sort().values, imageset.labels.sort().values)


def test_augment_keeps_shape_and_is_deterministic(shard_data):
    imageset = shard_data.clients[0].train

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([x for x, _ in imageset.batches(5, shuffle=True, generator=g,
                                                            augment=True)])

    plain = torch.cat([x for x, _ in imageset.batches(5)])
    a, b, c = epoch(0), epoch(0), epoch(1)
    assert a.shape == plain.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_function():
    g = torch.Generator().manual_seed(0)
    constant = torch.full((4, 3, 10, 12), 0.7)
    out = random_resized_crop_flip(constant, g)
    assert out.shape == constant.shape
    assert torch.allclose(out, constant)  # crops of a constant image are constant
    ramp = torch.linspace(0, 1, 12).expand(64, 3, 10, 12).contiguous()
    out = random_resized_crop_flip(ramp, torch.Generator().manual_seed(1))
    assert out.min() >= 0 and out.max() <= 1  # resampling stays inside the image
    slopes = out[:, 0, 5, -1] - out[:, 0, 5, 0]
    assert (slopes > 0).any() and (slopes < 0).any()  # some images are flipped


def test_lazy_mode_matches_cached(files, shard_data):
    lazy = load_federated_data(make_cfg(files), preprocess, seed=0, cache_limit_bytes=0)
    assert not lazy.global_test.cached and not lazy.clients[0].train.cached
    assert ids(lazy) == ids(shard_data)
    for a, b in [(lazy.clients[1].train, shard_data.clients[1].train),
                 (lazy.global_test, shard_data.global_test)]:
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for (xa, ya), (xb, yb) in zip(a.batches(7, shuffle=True, generator=ga, augment=True),
                                      b.batches(7, shuffle=True, generator=gb, augment=True)):
            assert torch.allclose(xa, xb) and torch.equal(ya, yb)
    # Train fits the budget, test does not: train stays cached.
    per_image = 3 * SIZE * SIZE * 4
    n_train = sum(len(c.train) for c in shard_data.clients)
    half = load_federated_data(make_cfg(files), preprocess, seed=0,
                               cache_limit_bytes=n_train * per_image)
    assert half.clients[0].train.cached and not half.global_test.cached



def test_a_clients_images_are_preprocessed_when_first_used_and_only_theirs(files):
    calls = []

    def counting(images):
        calls.append(len(images))
        return preprocess(images)

    data = load_federated_data(make_cfg(files), counting, seed=0)
    pool = data.clients[0].train._pool
    assert calls == [1] and pool.prepared == 0  # one probe of the output shape; nothing kept yet
    first = torch.cat([x for x, _ in data.clients[1].train.batches(5)])
    assert pool.prepared == len(data.clients[1].train) and sum(calls) == 1 + len(data.clients[1].train)
    again = torch.cat([x for x, _ in data.clients[1].train.batches(5)])
    assert torch.equal(first, again) and sum(calls) == 1 + len(data.clients[1].train)  # kept, not redone


def test_unchecked_images_fail_when_first_met_naming_the_file(files, tmp_path):
    bad = write_parquet(tmp_path / "bad-train.parquet", N_TRAIN, seed=4, corrupt_row=37)
    cfg = make_cfg(files, train=str(bad), num_clients=1, shards_per_client=1, shots=0, verify_images=False)
    data = load_federated_data(cfg, preprocess, 0)  # not decoded at start-up
    with pytest.raises(DataError, match="row 37.*bad_image.jpg"):
        list(data.clients[0].train.batches(8))

# --- other sources ---------------------------------------------------------------------

def write_folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg(COLOURS[c], rng))
    return root


def test_imagefolder_source(tmp_path):
    names = ["apple_tree", "bus", "car"]
    train = write_folder(tmp_path / "train", names, 10, seed=0)
    test = write_folder(tmp_path / "test", ["apple_tree", "car"] + [], 4, seed=1)
    (test / "bus").mkdir()
    (test / "bus" / "0.jpg").write_bytes(jpeg(COLOURS[1], np.random.default_rng(5)))
    cfg = DataConfig(source="imagefolder", train=str(train), test=str(test), num_clients=2,
                     partition="classes", classes_per_client=1, shots=3, test_per_client=None)
    data = load_federated_data(cfg, preprocess, seed=0)
    assert data.class_names == ["apple tree", "bus", "car"]
    assert len(data.global_test) == 9
    assert sorted(data.global_test.labels.tolist()) == [0] * 4 + [1] + [2] * 4
    for client in data.clients:
        assert len(client.train.classes) == 1 and len(client.train) == 3
        assert client.test.classes == client.train.classes


def test_builtin_source(files, monkeypatch, tmp_path):
    folder = tmp_path / "builtin"
    folder.mkdir()
    shutil.copy(files["train"], folder / "train.parquet")
    shutil.copy(files["test"], folder / "test.parquet")
    monkeypatch.setattr(fedlrm_config, "BUILTIN_DATASET_DIR", folder)
    # The default test_per_client=200 is more than 72 test images allow: sets shrink, warned.
    with pytest.warns(UserWarning, match="test_per_client=200.*smaller"):
        data = load_federated_data(DataConfig(num_clients=2, shots=1), preprocess, seed=0)
    assert len(data.class_names) == 6 and len(data.clients) == 2
    for client in data.clients:  # each client has 3 classes of 12 test images
        assert len(client.test) == 36


def test_hub_source_uses_splits(files, monkeypatch):
    dd = datasets.DatasetDict({
        "train": datasets.load_dataset("parquet", data_files=str(files["train"]), split="train"),
        "validation": datasets.load_dataset("parquet", data_files=str(files["test"]),
                                            split="train")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or dd)
    with pytest.raises(DataError, match="no 'test' split"):
        load_federated_data(DataConfig(source="hub", train="someone/tiny"), preprocess, 0)
    data = load_federated_data(DataConfig(source="hub", train="someone/tiny", name="cfg",
                                          test="validation", num_clients=2, shots=2,
                                          test_per_client=6),
                               preprocess, 0)
    assert calls[-1] == ("someone/tiny", "cfg")
    assert len(data.global_test) == N_TEST * len(CLASSES)


def test_string_label_column(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        rows = [(jpeg(COLOURS[c], rng), name) for c, name in enumerate(["b", "a"]) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b, _ in rows],
                                         "species": [s for _, s in rows]})
        ds.cast_column("img", datasets.Image()).to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = DataConfig(source="parquet", train=str(tmp_path / "train.parquet"),
                     test=str(tmp_path / "test.parquet"), image_column="img",
                     label_column="species", num_clients=1, shards_per_client=1, shots=0,
                     test_per_client=None)
    data = load_federated_data(cfg, preprocess, 0)
    assert data.class_names == ["a", "b"]
    assert Counter(data.clients[0].train.labels.tolist()) == {0: 6, 1: 6}
    assert Counter(data.clients[0].test.labels.tolist()) == {0: 3, 1: 3}


def test_imageset_from_tensors():
    images = torch.randn(5, 3, 4, 4)
    imageset = ImageSet.from_tensors(images, [0, 1, 1, 0, 2])
    x, y = next(imageset.batches(10))
    assert torch.equal(x, images) and y.tolist() == [0, 1, 1, 0, 2]
    assert imageset.classes == [0, 1, 2] and len(imageset) == 5


# --- errors ----------------------------------------------------------------------------

def test_error_missing_file(files, tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="nope.parquet"):
        load_federated_data(make_cfg(files, test=str(missing)), preprocess, 0)
    with pytest.raises(DataError, match="data.train is not set"):
        load_federated_data(make_cfg(files, train=None), preprocess, 0)
    with pytest.raises(DataError, match="missing_dir"):
        load_federated_data(DataConfig(source="imagefolder", train=str(tmp_path / "missing_dir"),
                                       test=str(tmp_path)), preprocess, 0)


def test_error_builtin_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(fedlrm_config, "BUILTIN_DATASET_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="built-in dataset.*absent"):
        load_federated_data(DataConfig(), preprocess, 0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_error_corrupt_image(files, tmp_path, split):
    bad = write_parquet(tmp_path / f"bad-{split}.parquet", N_TRAIN if split == "train" else N_TEST,
                        seed=4, corrupt_row=37)
    cfg = make_cfg(files, **{split: str(bad)}, num_clients=1, shards_per_client=1, shots=0)
    with pytest.raises(DataError) as err:
        load_federated_data(cfg, preprocess, 0)
    message = str(err.value)
    assert "row 37" in message and "bad_image.jpg" in message and bad.name in message


def test_error_client_without_images(files):
    with pytest.raises(DataError, match="no training images"):
        load_federated_data(make_cfg(files, num_clients=100, shards_per_client=2), preprocess, 0)
    with pytest.raises(DataError, match="no training images"):
        load_federated_data(make_cfg(files, num_clients=1000), preprocess, 0)


def test_error_test_split_lacks_class(files, tmp_path):
    test = write_parquet(tmp_path / "test-no-cyan.parquet", N_TEST, seed=2, skip=("cyan",))
    cfg = make_cfg(files, test=str(test), num_clients=1, shards_per_client=1, shots=1)
    with pytest.raises(DataError, match="'cyan'.*client 0"):
        load_federated_data(cfg, preprocess, 0)
    # without that class it works
    data = load_federated_data(make_cfg(files, test=str(test), num_clients=1, shards_per_client=1,
                                        exclude_classes=["cyan"]), preprocess, 0)
    assert "cyan" not in data.class_names


def test_error_unknown_excluded_class(files):
    with pytest.raises(DataError, match="'purple'"):
        load_federated_data(make_cfg(files, exclude_classes=["green", "purple"]), preprocess, 0)


def test_error_missing_label_column(files):
    with pytest.raises(DataError, match="'target'.*data.label_column"):
        load_federated_data(make_cfg(files, label_column="target"), preprocess, 0)
    with pytest.raises(DataError, match="'picture'.*data.image_column"):
        load_federated_data(make_cfg(files, image_column="picture"), preprocess, 0)


def test_error_class_names_differ(files, tmp_path):
    other = write_parquet(tmp_path / "other.parquet", 3, classes=[f"k{i}" for i in range(6)])
    with pytest.raises(DataError, match="class names"):
        load_federated_data(make_cfg(files, test=str(other)), preprocess, 0)


def test_error_torchvision_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(DataError, match="torchvision"):
        load_federated_data(DataConfig(source="torchvision", name="cifar10"), preprocess, 0)
    with pytest.raises(DataError, match="mnist"):
        load_federated_data(DataConfig(source="torchvision", name="mnist"), preprocess, 0)


def test_caltech_split_is_two_to_one():
    from fedlrm.data.sources import caltech_split

    labels = np.array([0] * 30 + [1] * 9 + [2] * 1)
    train, test = caltech_split(labels, 0)
    assert Counter(labels[train].tolist()) == {0: 20, 1: 6, 2: 1}
    assert Counter(labels[test].tolist()) == {0: 10, 1: 3}
    assert not set(train) & set(test)
    again = caltech_split(labels, 0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
