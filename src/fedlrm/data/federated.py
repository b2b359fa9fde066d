"""Build the clients' few-shot train sets, their test sets and the global test set."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedlrm.config import DataConfig
from fedlrm.data import partition as part
from fedlrm.data.imageset import (ClientSplit, Domain, FederatedData, ImagePool, ImageSet, Preprocess,
                                  preprocess_images)
from fedlrm.data.pretraining import PretrainedOn
from fedlrm.data.sources import Split, _short, load_source, readable
from fedlrm.errors import DataError

log = logging.getLogger(__name__)

# Preprocessed images are kept in memory (each once it is first used) when all of them
# together would take at most this much; otherwise test images (and, if still too large,
# train images) are decoded and preprocessed again for every batch.
CACHE_LIMIT_BYTES = 1 << 30
_CHUNK = 256  # images decoded and preprocessed at a time


def load_federated_data(cfg: DataConfig, preprocess: Preprocess, seed: int, *,
                        cache_limit_bytes: int | None = None,
                        pretrained_on: PretrainedOn | None = None) -> FederatedData:
    """Read `cfg`'s dataset, split its train split among the clients (seeded by `seed`),
    draw each client's test set and the global test set, and (with `data.verify_images`)
    decode every image used once, so a bad file is named before a run writes anything.

    Images are preprocessed when first used, not here: a round costs what its sampled clients
    cost, not what all of them would. Preprocessed images are kept in memory if all of them
    would fit the budget. With `pretrained_on` (the backbone's record of its pretraining images) and
    `data.exclude_pretraining`, the train rows the backbone was pretrained on are never used."""
    cfg.check()  # the settings themselves; what depends on the data is checked where it is used
    limit = CACHE_LIMIT_BYTES if cache_limit_bytes is None else cache_limit_bytes
    if not cfg.domains:
        return _load_one(cfg, preprocess, seed, limit, pretrained_on)
    # every domain gets its share of the memory budget; each is split with the run's seed, as it
    # would be alone, so a domain's clients are those of a federation of that source only
    loaded = []
    for label, domain_cfg in cfg.domain_configs():
        try:
            loaded.append((label, _load_one(domain_cfg, preprocess, seed, limit // len(cfg.domains), pretrained_on)))
        except DataError as err:
            raise DataError(f"data.domains ({label}): {err}") from None
    return merge_domains(loaded)


def one_client_folder(data: DataConfig, folder: Path) -> DataConfig:
    """`data` pointed at one client's own folder, all of which is that client's: `train/` and `test/`
    image folders (one subfolder per class) or `train.parquet` and `test.parquet` (a SuperNode's
    `data-dir`, a user's new client). One client, one source: no domains, no held-out clients."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give a folder with train/ and test/ image folders (one "
                        f"subfolder per class) or train.parquet and test.parquet")
    if (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
        source, train, test = "parquet", folder / "train.parquet", folder / "test.parquet"
    elif (folder / "train").is_dir() and (folder / "test").is_dir():
        source, train, test = "imagefolder", folder / "train", folder / "test"
    else:
        raise DataError(f"{folder} holds neither train/ + test/ image folders (one subfolder per class) nor "
                        f"train.parquet + test.parquet; put the client's training images in {folder / 'train'} "
                        f"and its test images in {folder / 'test'}")
    return replace(data, source=source, train=str(train.resolve()), test=str(test.resolve()), num_clients=1,
                   partition="dirichlet", dirichlet_alpha=1.0, new_clients=0, new_client_epochs=None, domains=[])


def merge_domains(loaded: list[tuple[str, FederatedData]]) -> FederatedData:
    """One federation of several domains' clients, numbered on in domain order. The federation's
    classes are every domain's classes in turn (names may repeat across domains: a client only
    ever classifies over its own domain's); each client's class list is its domain's (or, with
    data.client_classes=own, its partition's), its labels positions in that list."""
    names: list[str] = []
    clients: list[ClientSplit] = []
    domains: list[Domain] = []
    for label, data in loaded:
        offset, first = len(names), len(clients)
        names += data.class_names
        for split in data.clients:
            own = range(data.num_classes) if split.classes is None else split.classes
            clients.append(replace(split, client_id=len(clients), classes=[offset + c for c in own]))
        domains.append(Domain(label, list(range(first, len(clients))), list(range(offset, len(names))),
                              data.global_test))
    return FederatedData(names, clients, None, domains)


def _load_one(cfg: DataConfig, preprocess: Preprocess, seed: int, limit: int,
              pretrained_on: PretrainedOn | None) -> FederatedData:
    started = time.perf_counter()
    source = load_source(cfg)
    names, train_labels, test_labels = _exclude(source.class_names, source.train.labels,
                                                source.test.labels, cfg.exclude_classes)
    if cfg.exclude_pretraining and pretrained_on is not None:
        train_labels = _drop_pretraining(train_labels, source.train, pretrained_on)
    train_rows = np.flatnonzero(train_labels >= 0)
    test_rows = np.flatnonzero(test_labels >= 0)
    if len(train_rows) == 0:
        raise DataError(f"the {source.train.where} has no images (after data.exclude_classes)")
    if len(test_rows) == 0:
        raise DataError(f"the {source.test.where} has no images (after data.exclude_classes)")

    parts = part.partition(train_labels[train_rows], train_rows, cfg, seed)
    client_train, client_test = [], []
    shrunk = []
    for cid, rows in enumerate(parts):
        client_train.append(part.few_shot(rows, train_labels[rows], cfg.shots, seed, cid))
        positions, largest = part.client_test(train_labels[rows], test_labels[test_rows],
                                              cfg.test_per_client, seed, cid, names)
        if cfg.test_per_client is not None and largest < cfg.test_per_client:
            shrunk.append((cid, largest))
        client_test.append(test_rows[positions])
    if shrunk:
        warnings.warn(
            f"data.test_per_client={cfg.test_per_client} is more than the test split allows with "
            f"the class proportions of some clients' partitions; their test sets are smaller "
            f"(client: size) {', '.join(f'{c}: {n}' for c, n in shrunk)}",
            stacklevel=2,
        )
    global_rows = test_rows[part.global_test(len(test_rows), cfg.global_test_size, seed)]

    train_needed = np.unique(np.concatenate(client_train))
    test_needed = np.unique(np.concatenate(client_test + [global_rows]))
    probe = preprocess_images(preprocess, source.train.load(train_needed[:1]))
    per_image = probe[0].numel() * 4
    train_bytes, test_bytes = len(train_needed) * per_image, len(test_needed) * per_image
    cache_train = train_bytes <= limit
    cache_test = train_bytes + test_bytes <= limit
    if cfg.verify_images:
        _verify(source.train, train_needed)
        _verify(source.test, test_needed)
    train_pool = ImagePool(source.train, train_needed, preprocess, None, keep=cache_train)
    test_pool = ImagePool(source.test, test_needed, preprocess, None, keep=cache_test)

    def imageset(pool: ImagePool, rows: np.ndarray, labels: np.ndarray) -> ImageSet:
        return ImageSet(pool, rows, labels[rows])

    def client_split(cid: int, train_rows: np.ndarray, test_rows_: np.ndarray) -> ClientSplit:
        if cfg.client_classes == "all":
            return ClientSplit(cid, imageset(train_pool, train_rows, train_labels),
                               imageset(test_pool, test_rows_, test_labels))
        # the classes of its partition, its labels positions in that list (a client's test set follows
        # its partition's class proportions, so no test image is left without a column)
        classes = sorted(set(train_labels[parts[cid]].tolist()))
        test_rows_ = test_rows_[np.isin(test_labels[test_rows_], classes)]
        return ClientSplit(cid, ImageSet(train_pool, train_rows, np.searchsorted(classes, train_labels[train_rows])),
                           ImageSet(test_pool, test_rows_, np.searchsorted(classes, test_labels[test_rows_])),
                           classes)

    clients = [client_split(cid, tr, te) for cid, (tr, te) in enumerate(zip(client_train, client_test))]
    data = FederatedData([readable(n) for n in names], clients,
                         imageset(test_pool, global_rows, test_labels))
    log.info("data: %d classes, %d clients, %d train + %d test images %s (%s, %s) in %.1f s",
             len(names), len(clients), len(train_needed), len(test_needed),
             "checked" if cfg.verify_images else "not checked",
             "train kept once preprocessed" if cache_train else "train decoded per batch",
             "test kept once preprocessed" if cache_test else "test decoded per batch",
             time.perf_counter() - started)
    return data


def _exclude(names: list[str], train: np.ndarray, test: np.ndarray,
             exclude: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Drop the classes named in `exclude` (as spelled in the source or with spaces for
    underscores); the others are renumbered 0..K-1 in their order. Dropped rows get -1."""
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        lookup.setdefault(str(name), i)
        lookup.setdefault(readable(name), i)
    unknown = [e for e in exclude if str(e) not in lookup]
    if unknown:
        raise DataError(
            f"data.exclude_classes names classes the dataset does not have: "
            f"{', '.join(map(repr, unknown))} (its classes: {_short(names, 30)})"
        )
    dropped = {lookup[str(e)] for e in exclude}
    kept = [i for i in range(len(names)) if i not in dropped]
    if not kept:
        raise DataError("data.exclude_classes excludes every class of the dataset")
    new_id = np.full(len(names), -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    return [names[i] for i in kept], new_id[train], new_id[test]


def _drop_pretraining(labels: np.ndarray, split: Split, pretrained_on: PretrainedOn) -> np.ndarray:
    """`labels` with -1 (unused) at the rows of `split` the backbone was pretrained on."""
    if split.file is None:
        return labels
    rows = pretrained_on.rows_of(split.file)
    if rows is None:
        if pretrained_on.same_name(split.file):
            warnings.warn(f"the {split.where} has the name of a file the backbone was pretrained on, but other "
                          f"contents, so no image is recognised as a pretraining image; if it is a copy of that "
                          f"file (re-encoded or reordered), the federation may train on images the backbone has "
                          f"seen", stacklevel=3)
        return labels
    if len(rows) and rows.max() >= len(labels):
        raise DataError(f"the backbone's record of its pretraining images names row {rows.max()} of the "
                        f"{split.where}, which has {len(labels)} rows; the record does not fit the file")
    labels = labels.copy()
    labels[rows] = -1
    log.info("data: %d train images of %s left out: the backbone was pretrained on them "
             "(data.exclude_pretraining=false keeps them)", len(rows), split.file.name)
    return labels


def _verify(split: Split, rows: np.ndarray) -> None:
    """Decode every image of `rows` once; a bad file raises a DataError naming it."""
    for start in range(0, len(rows), _CHUNK):
        for image in split.load(rows[start:start + _CHUNK]):
            image.close()
