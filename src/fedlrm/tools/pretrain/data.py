"""The recipe's data: the CIFAR-10 and Caltech101 Parquet files, the shipped subset, the held-out
classes and the pretraining rows."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlrm.data.pretraining import encode_rows, file_sha256
from fedlrm.data.sources import readable
from fedlrm.errors import DataError

CIFAR_TRAIN, CIFAR_TEST = "cifar10-train.parquet", "cifar10-test.parquet"
CALTECH_TRAIN, CALTECH_TEST = "caltech101-train.parquet", "caltech101-test.parquet"
FILES = (CIFAR_TRAIN, CIFAR_TEST, CALTECH_TRAIN, CALTECH_TEST)
#: the CoOp-style Caltech101 protocol's 100 object classes: these two folders are dropped
CALTECH_DROPPED = ("BACKGROUND_Google", "Faces_easy")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def default_data_dir() -> Path:
    return (Path.cwd() / ".." / "shared" / "datasets").resolve()


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    path = default_data_dir() if data is None else Path(data).expanduser().resolve()
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        where = "the default ../shared/datasets (relative to the current directory)" if data is None else "--data"
        raise DataError(
            f"{', '.join(missing)} not found in {path} ({where}). Pass --data DIR pointing at the directory "
            f"that holds {', '.join(FILES)} (Hugging Face image parquet: columns image, label)."
        )
    return path


@dataclass
class Split:
    """One Parquet split: its table, labels (int64), class names, path and sha256."""

    table: object
    labels: np.ndarray
    names: list
    path: Path
    sha256: str

    def decode(self, rows) -> list:
        """The RGB PIL images of `rows`."""
        from PIL import Image

        column = self.table.column("image").combine_chunks().field("bytes")
        out = []
        for r in rows:
            try:
                with Image.open(io.BytesIO(column[int(r)].as_py())) as im:
                    out.append(im.convert("RGB"))
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                raise DataError(f"cannot decode row {r} of {self.path}: {type(err).__name__}: {err}") from None
        return out


def read_split(path: Path) -> Split:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if "image" not in table.column_names or "label" not in table.column_names:
        raise DataError(f"{path} needs columns `image` and `label`, has {table.column_names}")
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta is None:
        raise DataError(f"{path} has no `huggingface` schema metadata with the class names")
    names = list(json.loads(meta)["info"]["features"]["label"]["names"])
    return Split(table, table.column("label").to_numpy().astype(np.int64), names, path, file_sha256(path))


def select_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int, stream: int,
                  split: str) -> np.ndarray:
    """Sorted row indices: `per_class` rows of each class, the first of a seeded permutation."""
    rng = np.random.default_rng([seed, stream])
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            raise DataError(f"the {split} split has {len(rows)} images of class {c}; the subset needs {per_class}")
        chosen.append(rng.permutation(rows)[:per_class])
    return np.sort(np.concatenate(chosen))


def cifar_pretrain_rows(num_rows: int, subset: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Sorted train rows outside the subset: all of them, or a seeded `count` of them."""
    pool = np.setdiff1d(np.arange(num_rows), subset)
    if count is None:
        return pool
    if count > len(pool):
        raise DataError(f"--cifar-images {count} is more than the {len(pool)} train images outside the subset")
    return np.sort(np.random.default_rng([seed, 3]).permutation(pool)[:count])


def caltech_classes(names: list[str]) -> list[int]:
    """The label ids of Caltech101's 100 object classes (the two dropped folders left out)."""
    missing = [n for n in CALTECH_DROPPED if n not in names]
    if missing:
        raise DataError(f"the Caltech101 file has no class {', '.join(missing)}; expected the 102 folders of "
                        "101_ObjectCategories (see ../shared/datasets/README.md)")
    return [i for i, n in enumerate(names) if n not in CALTECH_DROPPED]


def held_out_classes(classes: list[int], count: int, seed: int) -> list[int]:
    """`count` of the object classes, kept out of pretraining altogether (a seeded choice)."""
    if count >= len(classes):
        raise DataError(f"--heldout-classes {count} leaves no Caltech101 class to pretrain on ({len(classes)})")
    return sorted(np.random.default_rng([seed, 5]).permutation(classes)[:count].tolist())


def caltech_pretrain_rows(labels: np.ndarray, classes: list[int], held_out: list[int], fraction: float,
                          seed: int) -> np.ndarray:
    """Sorted train rows: `fraction` of each pretrained class's rows, the first of a seeded
    permutation (classes in label order); the rest of every class is left for federations."""
    rng = np.random.default_rng([seed, 4])
    chosen = []
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        if c not in held_out:
            chosen.append(rows[:int(len(rows) * fraction)])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def rows_record(split: Split, rows: np.ndarray, rule: str) -> dict:
    """One `pretrain_rows` entry of PRETRAIN.json (fedlrm.data.pretraining reads it)."""
    return {"source_file": split.path.name, "source_sha256": split.sha256, "num_rows": len(split.labels),
            "count": len(rows), "rule": rule,
            "encoding": "base64 of numpy.packbits(bitmap, bitorder='little'); "
                        "fedlrm.data.pretraining.decode_rows(bitmap, num_rows) decodes it",
            "bitmap": encode_rows(rows, len(split.labels))}


def prompt_names(names: list[str]) -> list[str]:
    """Class names as fedlrm's prompts spell them (underscores as spaces)."""
    return [readable(n) for n in names]


def write_subset(split: Split, rows: np.ndarray, path: Path) -> None:
    """The given rows, in the source's layout and schema metadata (HF ClassLabel names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sub = split.table.take(pa.array(rows, type=pa.int64()))
    sub = sub.replace_schema_metadata(split.table.schema.metadata)
    pq.write_table(sub, path)
