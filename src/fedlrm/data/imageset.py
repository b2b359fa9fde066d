"""Labelled image sets of clients and splits, and the federated data they make up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import PIL.Image
import torch

from fedlrm.data.augment import random_resized_crop_flip
from fedlrm.data.sources import Split

Preprocess = Callable[[list[PIL.Image.Image]], torch.Tensor]


def preprocess_images(preprocess: Preprocess, images: list[PIL.Image.Image]) -> torch.Tensor:
    """`preprocess(images)` as float32, refused (TypeError) unless it is one (n, 3, H, W) tensor."""
    out = preprocess(images)
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != len(images):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"preprocess must map {len(images)} images to a tensor "
                        f"({len(images)}, 3, H, W); it returned {shape}")
    return out.float()


class ImagePool:
    """The images of one source split that some ImageSet uses (`rows`, sorted, unique).

    Either every image is preprocessed when first asked for and kept (`keep`, or a `tensor`
    given whole), or images are decoded and preprocessed again for every batch (when the kept
    tensors would be too large). A kept image costs memory only once it has been asked for: the
    pool's tensor is allocated unfilled, and the pages of images never used are never touched."""

    def __init__(self, split: Split | None, rows: np.ndarray, preprocess: Preprocess | None,
                 tensor: torch.Tensor | None, keep: bool = False) -> None:
        self.split = split
        self.rows = np.asarray(rows, dtype=np.int64)
        self.preprocess = preprocess
        self.tensor = tensor
        self.keep = keep or tensor is not None
        self._ready = torch.ones(len(self.rows), dtype=torch.bool) if tensor is not None else \
            torch.zeros(len(self.rows), dtype=torch.bool)

    @property
    def cached(self) -> bool:
        return self.keep

    @property
    def prepared(self) -> int:
        """How many of the pool's images have been preprocessed and kept so far."""
        return int(self._ready.sum())

    def positions(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows, np.asarray(rows, dtype=np.int64))

    def images(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.keep:
            return self._decode(positions)
        if len(positions) == 0:
            return torch.empty((0, *(self.tensor.shape[1:] if self.tensor is not None else (3, 1, 1))))
        missing = torch.unique(positions[~self._ready[positions]])
        if len(missing):
            batch = self._decode(missing)
            if self.tensor is None:
                self.tensor = torch.empty((len(self.rows), *batch.shape[1:]), dtype=torch.float32)
            if batch.shape[1:] != self.tensor.shape[1:]:
                raise TypeError(f"preprocess returned images of shape {tuple(batch.shape[1:])} "
                                f"after {tuple(self.tensor.shape[1:])}; it must give one fixed size")
            self.tensor[missing] = batch
            self._ready[missing] = True
        return self.tensor[positions]

    def _decode(self, positions: torch.Tensor) -> torch.Tensor:
        images = self.split.load(self.rows[positions.numpy()])
        try:
            return preprocess_images(self.preprocess, images)
        finally:
            for image in images:
                image.close()

    @property
    def where(self) -> str:
        return self.split.where if self.split is not None else "given tensors"


class ImageSet:
    """Labelled images of one client or split, preprocessed for the backbone.

    `labels` are the federation's class ids, or for a client with classes of its own
    (`ClientSplit.classes`) positions in its class list; `rows` are the images'
    row numbers in the source split as read (before exclude_classes), for provenance."""

    def __init__(self, pool: ImagePool, rows: np.ndarray, labels: np.ndarray) -> None:
        self._pool = pool
        self.rows = np.asarray(rows, dtype=np.int64)
        self._positions = torch.from_numpy(pool.positions(self.rows))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.rows) != len(self.labels):
            raise ValueError("rows and labels differ in length")

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> "ImageSet":
        """An ImageSet of already preprocessed images (n, 3, H, W), e.g. for tests."""
        images = torch.as_tensor(images, dtype=torch.float32)
        rows = np.arange(len(images), dtype=np.int64)
        return cls(ImagePool(None, rows, None, images), rows, np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        mode = "cached" if self.cached else "decoded per batch"
        return f"ImageSet({len(self)} images of the {self._pool.where}, {mode})"

    @property
    def cached(self) -> bool:
        """Whether the preprocessed images are held in memory (else decoded per batch)."""
        return self._pool.cached

    @property
    def classes(self) -> list[int]:
        """The sorted class ids present."""
        return sorted(set(self.labels.tolist()))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float32 (b, 3, H, W), labels int64 (b,)).

        `shuffle` permutes with `generator` (torch's global generator if None); `augment`
        applies a random resized crop (scale 0.5-1) and horizontal flip, with random numbers
        from `generator` too, so a seeded generator makes the whole epoch reproducible."""
        for index in self.index_batches(batch_size, shuffle=shuffle, generator=generator):
            images = self._pool.images(self._positions[index])
            if augment:
                images = random_resized_crop_flip(images, generator)
            yield images, self.labels[index]

    def index_batches(self, batch_size: int, *, shuffle: bool = False,
                      generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the positions (into this set) of each batch `batches` would yield, in the same
        order and drawing the same random numbers, e.g. to batch features cached per image."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


@dataclass
class ClientSplit:
    client_id: int
    train: ImageSet
    test: ImageSet
    #: the federation's class ids this client classifies over, in the order of its logits (its
    #: labels are positions in this list); None: every class of the federation
    classes: list[int] | None = None

    def class_names(self, federation_names: list[str]) -> list[str]:
        return list(federation_names) if self.classes is None else [federation_names[i] for i in self.classes]


@dataclass
class Domain:
    """One data source of a multi-domain federation (`data.domains`)."""

    label: str
    clients: list[int]  # the federation's ids of its clients
    classes: list[int]  # the federation's class ids of its classes
    global_test: ImageSet  # its test split (or a sample of it); labels are positions in `classes`


@dataclass
class GlobalTest:
    """A test set the server-side model is evaluated on, over `classes` (None: every class)."""

    label: str
    classes: list[int] | None
    images: ImageSet


@dataclass
class FederatedData:
    class_names: list[str]  # readable names used in prompts (underscores -> spaces)
    clients: list[ClientSplit]
    # the whole test split, or a seeded subsample of global_test_size; None with several domains,
    # whose test splits are each their own (`domains`)
    global_test: ImageSet | None
    domains: list[Domain] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def global_tests(self) -> list[GlobalTest]:
        """What a global model is evaluated on: the global test set, or each domain's over its classes."""
        if not self.domains:
            return [GlobalTest("", None, self.global_test)] if self.global_test is not None else []
        return [GlobalTest(d.label, d.classes, d.global_test) for d in self.domains]

    def domain_of(self) -> dict[int, str]:
        """Client id -> the label of its domain (empty for a single source)."""
        return {c: d.label for d in self.domains for c in d.clients}

    def summary(self) -> list[dict]:
        """One dict per client: client, (its domain,) n_train, n_test, classes (sorted label ids)."""
        domain_of = self.domain_of()
        return [{"client": c.client_id, **({"domain": domain_of[c.client_id]} if domain_of else {}),
                 "n_train": len(c.train), "n_test": len(c.test),
                 "classes": c.train.classes if c.classes is None else [c.classes[i] for i in c.train.classes],
                 **({} if c.classes is None else {"classifies_over": list(c.classes)})} for c in self.clients]
