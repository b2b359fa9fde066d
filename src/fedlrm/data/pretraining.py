"""Which images a backbone was pretrained on, so that a federation never trains on them.

The built-in backbone's recipe records, per source file (named and identified by its sha256),
the rows it pretrained on, in the model folder's `PRETRAIN.json` (`pretrain_rows`). A run
with `data.exclude_pretraining=true` (the default) drops those rows from the train split of
a file it recognises by content, so a benchmark on the same Parquet files measures
adaptation to images the backbone never saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

RECORD_FILE = "PRETRAIN.json"


def encode_rows(rows: np.ndarray, num_rows: int) -> str:
    """A set of row indices as base64 of a little-endian bitmap (row i -> bit i)."""
    bits = np.zeros(num_rows, dtype=bool)
    bits[np.asarray(rows, dtype=np.int64)] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode()


def decode_rows(bitmap: str, num_rows: int) -> np.ndarray:
    """The inverse of `encode_rows`: sorted row indices."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(bitmap), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:num_rows])


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (remembered per path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class PretrainedOn:
    """The rows a backbone was pretrained on, per source file: {sha256: (file name, rows)}."""

    files: dict

    @classmethod
    def from_record(cls, record: dict) -> PretrainedOn:
        files = {}
        for entry in record.get("pretrain_rows", []):
            rows = decode_rows(entry["bitmap"], entry["num_rows"])
            files[entry["source_sha256"]] = (entry["source_file"], rows)
        return cls(files)

    @classmethod
    def read(cls, model_dir: Path) -> PretrainedOn | None:
        """The record in `model_dir/PRETRAIN.json`, or None where the folder has none."""
        path = Path(model_dir) / RECORD_FILE
        if not path.is_file():
            return None
        return cls.from_record(json.loads(path.read_text()))

    def rows_of(self, path: Path) -> np.ndarray | None:
        """The rows of the file at `path` the backbone was pretrained on; None for a file it never saw."""
        entry = self.files.get(file_sha256(path))
        return None if entry is None else entry[1]

    def same_name(self, path: Path) -> str | None:
        """A recorded file name equal to `path`'s, where the content is not the recorded one."""
        names = {name for name, _ in self.files.values()}
        return Path(path).name if Path(path).name in names else None
