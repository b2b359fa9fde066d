"""Client splits computed from labels alone: partitioning, few-shot sampling, test draws.

Every function returns row ids of the source split (never decoded images) and draws its
random numbers from generators derived from the run seed, so the same labels, settings
and seed always give the same rows in the same order.
"""

from __future__ import annotations

import warnings

import numpy as np

from fedlrm.config import DataConfig
from fedlrm.errors import DataError

# Purposes of the derived random streams (the spawn key keeps them independent).
_FEW_SHOT, _CLIENT_TEST, _GLOBAL_TEST = 1, 2, 3


def rng_for(seed: int, purpose: int, client: int = 0) -> np.random.Generator:
    """An independent generator for one purpose (and client) of a run seed."""
    return np.random.default_rng(np.random.SeedSequence(_u64(seed), spawn_key=(purpose, client)))


def _u64(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def partition(labels: np.ndarray, rows: np.ndarray, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Split the train rows `rows` (with `labels`) among `cfg.num_clients` clients with the
    Flower Datasets partitioner named by `cfg.partition`; returns each client's rows."""
    import datasets
    from flwr_datasets.partitioner import (DirichletPartitioner, PathologicalPartitioner,
                                           ShardPartitioner)

    labels = np.asarray(labels, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n, k = len(labels), cfg.num_clients
    if n < k:
        raise DataError(
            f"the train split has {n} images for {k} clients: some client would be left with "
            f"no training images; lower data.num_clients"
        )
    flwr_seed = _u64(seed) % (2**32)
    if cfg.partition == "shard":
        shards = k * cfg.shards_per_client
        if n < shards:
            raise DataError(
                f"data.partition=shard cuts the {n} train images into data.num_clients x "
                f"data.shards_per_client = {k} x {cfg.shards_per_client} shards; that leaves some "
                f"client with no training images. Lower data.num_clients or data.shards_per_client"
            )
        partitioner = ShardPartitioner(num_partitions=k, partition_by="label",
                                       num_shards_per_partition=cfg.shards_per_client,
                                       shuffle=True, seed=flwr_seed)
    elif cfg.partition == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=k, partition_by="label",
                                           alpha=float(cfg.dirichlet_alpha),
                                           min_partition_size=max(1, min(10, n // k)),
                                           self_balancing=False, shuffle=True, seed=flwr_seed)
    elif cfg.partition == "classes":
        present = len(np.unique(labels))
        if not 1 <= cfg.classes_per_client <= present:
            raise DataError(
                f"data.classes_per_client={cfg.classes_per_client} must be between 1 and the "
                f"{present} classes of the train split"
            )
        # "first-deterministic": client i always gets class i mod C, so with at least as many
        # clients as classes every class is used (the setting of Li et al., 2021).
        partitioner = PathologicalPartitioner(num_partitions=k, partition_by="label",
                                              num_classes_per_partition=cfg.classes_per_client,
                                              class_assignment_mode="first-deterministic",
                                              shuffle=True, seed=flwr_seed)
    else:
        raise DataError(f"data.partition={cfg.partition!r} is not one of shard, dirichlet, classes")

    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": rows})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dirichlet retries, unused classes: checked below
            parts = [np.asarray(partitioner.load_partition(i).with_format("arrow")[:]
                                .column("row").to_numpy(), dtype=np.int64)
                     for i in range(k)]
    except (ValueError, ZeroDivisionError) as err:
        raise DataError(f"cannot split the {n} train images among {k} clients with "
                        f"data.partition={cfg.partition}: {err}") from None
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(
                f"client {i} is left with no training images (data.partition={cfg.partition}, "
                f"{n} images, {k} clients); lower data.num_clients or change the partition settings"
            )
    return parts


def few_shot(rows: np.ndarray, labels: np.ndarray, shots: int, seed: int, client: int) -> np.ndarray:
    """`shots` rows of each class in `rows` (all of a class that has fewer), in their order.

    `labels[i]` is the label of `rows[i]`; `shots == 0` keeps every row."""
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if shots == 0:
        return rows.copy()
    rng = rng_for(seed, _FEW_SHOT, client)
    keep = np.zeros(len(rows), dtype=bool)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        if len(where) > shots:
            where = rng.choice(where, size=shots, replace=False)
        keep[where] = True
    return rows[keep]


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def proportional_counts(train_counts: np.ndarray, available: np.ndarray,
                        size: int | None) -> tuple[np.ndarray, int]:
    """Per-class test counts with the class proportions of `train_counts`, summing to `size`
    (None: the largest size that `available` allows), by the largest-remainder rule.

    Returns (counts, the largest size `available` allows)."""
    train_counts = np.asarray(train_counts, dtype=np.int64)
    available = np.asarray(available, dtype=np.int64)
    total = int(train_counts.sum())
    present = train_counts > 0
    # counts_c = size * n_c / N must stay <= available_c for every class the client has.
    largest = int(min((available[present] * total) // train_counts[present]))
    size = largest if size is None else min(int(size), largest)
    quota = train_counts * size
    counts = quota // total
    remainder = quota % total
    missing = size - int(counts.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder, then class id
    counts[order[:missing]] += 1
    return counts, largest


def client_test(train_labels: np.ndarray, test_labels: np.ndarray, size: int | None,
                seed: int, client: int, class_names: list[str]) -> tuple[np.ndarray, int]:
    """A client's test set: positions into `test_labels` (the test split's labels), drawn
    without replacement with the class proportions of the client's training partition
    (`train_labels`), in a seeded random order. Returns (positions, the largest size the
    test split allows with these proportions)."""
    num_classes = len(class_names)
    want = class_counts(train_labels, num_classes)
    have = class_counts(test_labels, num_classes)
    lacking = np.flatnonzero((want > 0) & (have == 0))
    if len(lacking):
        names = ", ".join(f"{class_names[c]!r} (id {c})" for c in lacking)
        raise DataError(
            f"the test split has no images of class {names}, which client {client} trains on; "
            f"add test images of that class or drop it with data.exclude_classes"
        )
    counts, largest = proportional_counts(want, have, size)
    rng = rng_for(seed, _CLIENT_TEST, client)
    chosen = []
    for c in np.flatnonzero(counts):
        pool = np.flatnonzero(test_labels == c)
        chosen.append(rng.choice(pool, size=int(counts[c]), replace=False))
    positions = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return rng.permutation(positions).astype(np.int64), largest


def global_test(n: int, size: int | None, seed: int) -> np.ndarray:
    """Positions 0..n-1 of the whole test split, or a seeded subsample of `size` (sorted)."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    rng = rng_for(seed, _GLOBAL_TEST)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
