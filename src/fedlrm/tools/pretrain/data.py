"""The recipe's data: the CIFAR-10 Parquet files, the shipped subset and the pretraining rows."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fedlrm.errors import DataError

TRAIN_FILE = "cifar10-train.parquet"
TEST_FILE = "cifar10-test.parquet"
IMAGE_SIZE = 32
# CIFAR-10 channel statistics (train split); what preprocessor_config.json normalises with.
IMAGE_MEAN = [0.4914, 0.4822, 0.4465]
IMAGE_STD = [0.2470, 0.2435, 0.2616]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def default_data_dir() -> Path:
    return (Path.cwd() / ".." / "shared" / "datasets").resolve()


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    path = default_data_dir() if data is None else Path(data).expanduser().resolve()
    missing = [f for f in (TRAIN_FILE, TEST_FILE) if not (path / f).is_file()]
    if missing:
        where = "the default ../shared/datasets (relative to the current directory)" if data is None else "--data"
        raise DataError(
            f"{', '.join(missing)} not found in {path} ({where}). Pass --data DIR pointing at the directory "
            f"that holds {TRAIN_FILE} and {TEST_FILE} (Hugging Face image parquet: columns image, label)."
        )
    return path


def _class_names(table) -> list[str]:
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta is None:
        raise DataError("parquet file has no `huggingface` schema metadata with the class names")
    return list(json.loads(meta)["info"]["features"]["label"]["names"])


def read_split(path: Path):
    """The pyarrow table, the labels (numpy int64) and the class names of a split."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if "image" not in table.column_names or "label" not in table.column_names:
        raise DataError(f"{path} needs columns `image` and `label`, has {table.column_names}")
    labels = table.column("label").to_numpy().astype(np.int64)
    return table, labels, _class_names(table)


def decode_images(table, rows: Iterable[int]) -> np.ndarray:
    """JPEG bytes of the given rows -> uint8 array (N, 32, 32, 3), RGB."""
    from PIL import Image

    column = table.column("image").combine_chunks().field("bytes")
    rows = list(rows)
    out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, r in enumerate(rows):
        with Image.open(io.BytesIO(column[int(r)].as_py())) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise DataError(f"row {r} is {im.size[0]}x{im.size[1]}; the recipe expects 32x32 CIFAR-10 images")
            out[i] = np.asarray(im)
    return out


def to_pixel_values(images: np.ndarray):
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W), bit for bit what the saved
    CLIPImageProcessor computes for a 32x32 RGB image (rescale in float64, then float32)."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64) * (1 / 255)
    x = x.to(torch.float32)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


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


def select_pretrain(num_rows: int, excluded: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted row indices of `count` train rows outside `excluded` (a seeded choice)."""
    pool = np.setdiff1d(np.arange(num_rows), excluded)
    if count > len(pool):
        raise DataError(f"--pretrain-images {count} is more than the {len(pool)} train images outside the subset")
    return np.sort(np.random.default_rng([seed, 3]).permutation(pool)[:count])


def encode_indices(indices: np.ndarray, num_rows: int) -> str:
    """A set of row indices as base64 of a little-endian bitmap (row i -> bit i)."""
    bits = np.zeros(num_rows, dtype=bool)
    bits[indices] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode()


def decode_indices(bitmap: str, num_rows: int) -> np.ndarray:
    """The inverse of `encode_indices`: sorted row indices."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(bitmap), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:num_rows])


def pretrain_indices(pretrain_json: dict) -> np.ndarray:
    """The pretraining train-row indices recorded in a PRETRAIN.json dict."""
    info = pretrain_json["pretrain_rows"]
    return decode_indices(info["bitmap"], info["num_rows"])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def write_subset(table, rows: np.ndarray, path: Path) -> None:
    """The given rows, in the source's layout and schema metadata (HF ClassLabel names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sub = table.take(pa.array(rows, type=pa.int64()))
    sub = sub.replace_schema_metadata(table.schema.metadata)
    pq.write_table(sub, path)
