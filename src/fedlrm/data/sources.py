"""Dataset sources: the labels of a train and a test split, and their images on demand.

A source is read without decoding its images: partitioning needs the labels only.
Images are decoded later, and only those that a client or the global test uses
(`Split.load`), so a corrupt file is reported with its row and path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image

from fedlrm import config as _config
from fedlrm.config import DataConfig
from fedlrm.errors import DataError

# The per-class train/test split made for torchvision's Caltech101 (which has none) is
# fixed, so that every run seed sees the same test images; only the client splits vary.
CALTECH_SPLIT_SEED = 0
TORCHVISION_NAMES = ("cifar10", "caltech101")


class Split:
    """One split of a source: `labels` (ids into the source's class names) for every row,
    and `load(rows)` that decodes those rows' images to RGB PIL images."""

    where: str  # human-readable origin, e.g. "train split (/data/cifar10-train.parquet)"
    labels: np.ndarray  # int64, one per row
    file: Path | None = None  # the one file the split was read from, where there is one

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, rows: np.ndarray) -> list[PIL.Image.Image]:
        raise NotImplementedError


class HFSplit(Split):
    """A `datasets.Dataset` split; images are read from its (memory-mapped) Arrow table."""

    def __init__(self, ds: Any, image_column: str, labels: np.ndarray, where: str) -> None:
        import datasets

        self.where = where
        self.labels = labels
        self._column = image_column
        self._feature = datasets.Image()
        self._raw = ds.select_columns([image_column])
        try:
            self._raw = self._raw.cast_column(image_column, datasets.Image(decode=False))
        except Exception as err:  # noqa: BLE001 - datasets raises many types here
            feature = ds.features[image_column]
            raise DataError(
                f"column {image_column!r} of the {where} holds {feature}, not images "
                f"(encoded bytes or file paths): {err}. Set data.image_column to the image column "
                f"(columns: {', '.join(ds.column_names)})"
            ) from None

    def load(self, rows: np.ndarray) -> list[PIL.Image.Image]:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return []
        records = self._raw[rows.tolist()][self._column]
        images = []
        for row, record in zip(rows.tolist(), records):
            try:
                image = self._feature.decode_example(record)
                images.append(to_rgb(image))
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                path = record.get("path") if isinstance(record, dict) else None
                what = f"row {row}" + (f" (path {path!r})" if path else "")
                raise DataError(
                    f"cannot decode the image at {what} of the {self.where}: {type(err).__name__}: "
                    f"{err}. Repair or remove that image, or exclude its class with "
                    f"data.exclude_classes"
                ) from None
        return images


class CallableSplit(Split):
    """A split whose image `i` comes from `get(i)` (used for torchvision datasets)."""

    def __init__(self, get: Callable[[int], PIL.Image.Image], labels: np.ndarray, where: str) -> None:
        self.where = where
        self.labels = labels
        self._get = get

    def load(self, rows: np.ndarray) -> list[PIL.Image.Image]:
        images = []
        for row in np.asarray(rows, dtype=np.int64).tolist():
            try:
                images.append(to_rgb(self._get(row)))
            except Exception as err:  # noqa: BLE001
                raise DataError(
                    f"cannot decode image {row} of the {self.where}: {type(err).__name__}: {err}. "
                    f"Delete the download directory (data.root) to fetch it again"
                ) from None
        return images


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB image. PIL's own convert("RGB") clips 16-bit and 32-bit grayscale (modes
    I;16*, I) to 0..255 instead of scaling it, so a 16-bit PNG turns almost white; these modes
    are scaled from 0..65535 first, and float images (mode F) from 0..1 (or 0..255 when their
    values go beyond 1, as in images saved from 8-bit data)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if np.nanmax(values, initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0  # I;16 holds 0..65535; so does mode I as PIL opens a 16-bit PNG
        gray = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


@dataclass
class Source:
    class_names: list[str]  # as the source spells them (underscores kept)
    train: Split
    test: Split
    #: False when the data has only class ids and `class_names` are made up ("0", "1", ...)
    named: bool = True


def load_source(cfg: DataConfig) -> Source:
    """Read the train and test splits named by `cfg.source` (labels only; no image decoding);
    `data.class_names`, when given, names the class ids."""
    source = _read_source(cfg)
    if cfg.class_names:
        return _named(source, cfg.class_names)
    if not source.named:
        warnings.warn(
            f"the {source.train.where} has integer labels but no class names (no ClassLabel feature in its "
            f"Hugging Face metadata), so the classes are called {_short(source.class_names, 4)} and the "
            f"prompts read like 'a photo of a {(source.class_names or ['0'])[0]}.'; the classifier is built from the "
            f"prompts, so give the real names, in label order, with data.class_names=[cat,dog,...] "
            f"({len(source.class_names)} names)",
            stacklevel=2)
    return source


def _named(source: Source, names: list[str]) -> Source:
    """The source with `names` for its class ids 0..K-1."""
    have = len(source.class_names)
    if source.named and len(names) != have:
        raise DataError(f"data.class_names has {len(names)} names, but the data has {have} classes "
                        f"({_short(source.class_names)}); give one name per class, in label order")
    if len(names) < have:  # integer labels: the ids present must have a name
        raise DataError(f"data.class_names has {len(names)} names, but the labels of the data go up to "
                        f"{have - 1} ({have} classes); give one name per class id 0..{have - 1}, in label order")
    return Source([str(n) for n in names], source.train, source.test, True)


def _read_source(cfg: DataConfig) -> Source:
    kind = cfg.source
    if kind == "builtin":
        folder = Path(_config.BUILTIN_DATASET_DIR)
        train, test = folder / "train.parquet", folder / "test.parquet"
        for path in (train, test):
            if not path.is_file():
                raise DataError(
                    f"the built-in dataset file {path} is missing; the fedlrm installation is "
                    f"incomplete (reinstall it), or use your own data with data.source=parquet "
                    f"data.train=... data.test=..."
                )
        return _parquet(train, test, cfg)
    if kind == "parquet":
        return _parquet(_existing(cfg.train, "data.train", "parquet file"),
                        _existing(cfg.test, "data.test", "parquet file"), cfg)
    if kind == "imagefolder":
        return _imagefolder(_existing(cfg.train, "data.train", "image folder", folder=True),
                            _existing(cfg.test, "data.test", "image folder", folder=True), cfg)
    if kind == "hub":
        return _hub(cfg)
    if kind == "torchvision":
        return _torchvision(cfg)
    raise DataError(
        f"data.source={kind!r} is not one of builtin, parquet, hub, imagefolder, torchvision"
    )


def _existing(value: str | None, key: str, what: str, folder: bool = False) -> Path:
    if not value:
        raise DataError(f"{key} is not set: give the path of the {what} of that split")
    path = Path(value).expanduser()
    if folder and not path.is_dir():
        raise DataError(f"{key}={value!r}: no such {what} ({path.resolve()} is not a directory)")
    if not folder and not path.is_file():
        raise DataError(f"{key}={value!r}: no such {what} ({path.resolve()} does not exist)")
    return path.resolve()


def _load(builder: str, data_files: Any, where: str, **kwargs: Any) -> Any:
    import datasets

    datasets.disable_progress_bars()  # our own bars show progress; its per-file bars are noise
    try:
        return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as err:  # noqa: BLE001 - anything from a bad file
        raise DataError(f"cannot read the {where} with the datasets {builder!r} loader: "
                        f"{type(err).__name__}: {err}") from None


def _parquet(train: Path, test: Path, cfg: DataConfig) -> Source:
    tr = _load("parquet", str(train), f"train split ({train})", split="train")
    te = _load("parquet", str(test), f"test split ({test})", split="train")
    source = _from_hf(tr, te, cfg.image_column, cfg.label_column,
                      f"train split ({train})", f"test split ({test})")
    source.train.file, source.test.file = train, test
    return source


def _imagefolder(train: Path, test: Path, cfg: DataConfig) -> Source:
    # One builder call for both splits, so the class indexing (sorted folder names) is shared.
    dd = _load("imagefolder", {"train": str(train / "**"), "test": str(test / "**")},
               f"image folders {train} and {test}")
    # The imagefolder builder always names its columns `image` and `label`.
    return _from_hf(dd["train"], dd["test"], "image", "label",
                    f"train image folder ({train})", f"test image folder ({test})")


def _hub(cfg: DataConfig) -> Source:
    import datasets

    if not cfg.train:
        raise DataError("data.train is not set: give the hub dataset id (e.g. uoft-cs/cifar10)")
    test_split = cfg.test or "test"
    try:
        dd = datasets.load_dataset(cfg.train, cfg.name)
    except Exception as err:  # noqa: BLE001 - network, auth, missing dataset
        raise DataError(
            f"cannot load the hub dataset {cfg.train!r} (config {cfg.name!r}): "
            f"{type(err).__name__}: {err}. Check the id and config name and the network, or "
            f"download it and use data.source=parquet"
        ) from None
    for split in ("train", test_split):
        if split not in dd:
            raise DataError(
                f"the hub dataset {cfg.train!r} has no {split!r} split (it has: {', '.join(dd)}); "
                f"set data.test to the split to test on"
            )
    name = f"{cfg.train}" + (f"/{cfg.name}" if cfg.name else "")
    return _from_hf(dd["train"], dd[test_split], cfg.image_column, cfg.label_column,
                    f"train split of hub dataset {name}", f"{test_split} split of hub dataset {name}")


def _check_columns(ds: Any, image_column: str, label_column: str, where: str) -> None:
    for key, column in (("data.label_column", label_column), ("data.image_column", image_column)):
        if column not in ds.column_names:
            raise DataError(
                f"the {where} has no column {column!r} (its columns: {', '.join(ds.column_names)}); "
                f"set {key} to the right one"
            )


def _from_hf(tr: Any, te: Any, image_column: str, label_column: str,
             where_train: str, where_test: str) -> Source:
    import datasets

    _check_columns(tr, image_column, label_column, where_train)
    _check_columns(te, image_column, label_column, where_test)
    ftr, fte = tr.features[label_column], te.features[label_column]
    raw_tr, raw_te = _column(tr, label_column), _column(te, label_column)

    named = True
    if isinstance(ftr, datasets.ClassLabel):
        names = list(ftr.names)
        if isinstance(fte, datasets.ClassLabel) and list(fte.names) != names:
            raise DataError(
                f"the class names of the {where_test} ({_short(fte.names)}) differ from those of "
                f"the {where_train} ({_short(names)}); both splits need the same ClassLabel names"
            )
        if raw_te.dtype.kind in "US" or raw_te.dtype == object:
            raw_te = _encode(raw_te, names, where_test)
        labels_tr, labels_te = raw_tr.astype(np.int64), raw_te.astype(np.int64)
    elif raw_tr.dtype.kind in "US" or raw_tr.dtype == object:  # class names stored as strings
        names = sorted({str(v) for v in raw_tr.tolist()} | {str(v) for v in raw_te.tolist()})
        labels_tr, labels_te = _encode(raw_tr, names, where_train), _encode(raw_te, names, where_test)
    elif raw_tr.dtype.kind in "iu":
        labels_tr, labels_te = raw_tr.astype(np.int64), raw_te.astype(np.int64)
        top = max(int(labels_tr.max(initial=-1)), int(labels_te.max(initial=-1)))
        names = [str(i) for i in range(top + 1)]
        named = False
    else:
        raise DataError(
            f"the label column {label_column!r} of the {where_train} holds {ftr}; it must hold "
            f"class ids (a ClassLabel or integers) or class names (strings)"
        )
    for labels, where in ((labels_tr, where_train), (labels_te, where_test)):
        bad = (labels < 0) | (labels >= len(names))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{int(bad.sum())} rows of the {where} have a label outside 0..{len(names) - 1} "
                f"(first: row {row}, label {int(labels[row])}); unlabelled rows cannot be used"
            )
    return Source(names, HFSplit(tr, image_column, labels_tr, where_train),
                  HFSplit(te, image_column, labels_te, where_test), named)


def _column(ds: Any, column: str) -> np.ndarray:
    """One whole column as a NumPy array (read through Arrow, without per-row formatting)."""
    table = ds.select_columns([column]).with_format("arrow")[:]
    return table.column(column).to_numpy(zero_copy_only=False)


def _encode(values: np.ndarray, names: list[str], where: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values.tolist()):
        if str(value) not in index:
            raise DataError(f"row {i} of the {where} has the unknown class {value!r} "
                            f"(known: {_short(names)})")
        out[i] = index[str(value)]
    return out


def _short(names: list[str], limit: int = 12) -> str:
    names = [str(n) for n in names]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _torchvision(cfg: DataConfig) -> Source:
    name = (cfg.name or cfg.train or "").lower().replace("-", "")
    if name not in TORCHVISION_NAMES:
        raise DataError(f"data.name={cfg.name!r}: torchvision datasets supported here are "
                        f"{', '.join(TORCHVISION_NAMES)}")
    try:
        import torchvision
    except ImportError as err:
        raise DataError(
            f"data.source=torchvision needs torchvision, which cannot be imported ({err}). Install "
            f"it together with a torch build it supports (pip install 'fedlrm[torchvision]'), or "
            f"use data.source=parquet with exported files"
        ) from None
    root = Path(cfg.root).expanduser()
    try:
        if name == "cifar10":
            train = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
            test = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
            where = f"torchvision CIFAR10 in {root}"
            return Source(
                list(train.classes),
                CallableSplit(lambda i: PIL.Image.fromarray(train.data[i]),
                              np.asarray(train.targets, dtype=np.int64), f"train split of {where}"),
                CallableSplit(lambda i: PIL.Image.fromarray(test.data[i]),
                              np.asarray(test.targets, dtype=np.int64), f"test split of {where}"),
            )
        full = torchvision.datasets.Caltech101(str(root), target_type="category", download=True)
    except Exception as err:  # noqa: BLE001 - download and file errors
        raise DataError(
            f"cannot load torchvision {name} into {root}: {type(err).__name__}: {err}. Check the "
            f"network or data.root"
        ) from None
    labels = np.asarray(full.y, dtype=np.int64)
    train_rows, test_rows = caltech_split(labels, CALTECH_SPLIT_SEED)
    where = f"torchvision Caltech101 in {root}"
    get = lambda i: full[i][0]  # noqa: E731
    return Source(
        list(full.categories),
        _Subset(get, train_rows, labels, f"train split (2/3 of each class) of {where}"),
        _Subset(get, test_rows, labels, f"test split (1/3 of each class) of {where}"),
    )


def caltech_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded per-class 2:1 train/test split of row ids (each class keeps a train image)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = len(rows) // 3 if len(rows) > 1 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class _Subset(CallableSplit):
    """Rows `rows` of a split-less dataset, renumbered from 0."""

    def __init__(self, get: Callable[[int], PIL.Image.Image], rows: np.ndarray,
                 all_labels: np.ndarray, where: str) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        super().__init__(lambda i: get(int(rows[i])), all_labels[rows], where)


def readable(name: str) -> str:
    """The class name as used in prompts: underscores become spaces."""
    return " ".join(str(name).replace("_", " ").split())
