"""Accuracy of every algorithm on real CIFAR-10 and Caltech101 in the FedLRM paper's protocol.

The paper's grid (10 clients, shard split, 1/4/16 shots, seeds 0-2) for every algorithm of
`fedlrm.algorithms.ALGORITHMS`, plus FedLRM's global-rank sweep (the paper's Figure 5) and the
effect of bf16 autocast. By default it runs on the CPU with the built-in backbone and fewer
rounds (10 rounds x 2 local epochs instead of 20 x 10; see PROFILES); `--paper` runs the paper's own setting (ViT-B/16, 20 rounds x 10
epochs) from the shipped configs paper/*, for a machine with a GPU and the OpenAI weights.

Every finished run appends a row to <out>/runs.csv at once; a restart skips the runs already
there, so an interrupted grid is continued by starting the same command again. A run that
raises is logged, written to <out>/failures.csv and retried on the next start. The report
(<out>/accuracy.md) and plots are rewritten whenever a job group ends.

    python benchmarks/accuracy.py --help
    python benchmarks/accuracy.py --quick            # smoke test (~1-2 min), into /tmp
    python benchmarks/accuracy.py                    # the CPU grid, into benchmarks/results/accuracy
    python benchmarks/accuracy.py --report-only      # tables and plots from runs.csv
    python benchmarks/accuracy.py --dry-run          # the plan and a time estimate, nothing run
    python benchmarks/accuracy.py --paper model.name=/path/to/clip-vit-base-patch16   # GPU

To run against a frozen copy of fedlrm instead of the installed one, put its src directory
first: PYTHONPATH=/path/to/src, or FEDLRM_SRC=/path/to/src.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

# Before any fedlrm import, so that worker processes (spawned, they re-import this file) see it too.
if os.environ.get("FEDLRM_SRC"):
    sys.path.insert(0, os.path.abspath(os.environ["FEDLRM_SRC"]))

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "accuracy"
PAPER_RESULTS = REPO / "benchmarks" / "results" / "accuracy-paper"
QUICK_RESULTS = Path("/tmp/fedlrm-accuracy-quick")
SCRATCH = Path("/tmp/fedlrm-accuracy-runs")

log = logging.getLogger("accuracy")

# ----------------------------------------------------------------------------- the protocol

# Per dataset: the parquet files in the datasets directory, the overrides of our CPU grid and the
# ones that also hold in --paper mode (the class list), and facts the report needs.
DATASETS = {
    "cifar10": {
        "title": "CIFAR-10", "files": ("cifar10-train.parquet", "cifar10-test.parquet"), "classes": 10,
        "always": [],
        "cpu": ["data.test_per_client=200", "data.global_test_size=1000"],
        "paper_config": "paper/cifar10",
    },
    "caltech101": {
        "title": "Caltech101", "files": ("caltech101-train.parquet", "caltech101-test.parquet"), "classes": 100,
        # CoOp-style: the 100 object classes, without the background and the duplicate face folder.
        "always": ["data.exclude_classes=[BACKGROUND_Google,Faces_easy]"],
        "cpu": ["data.test_per_client=null", "data.global_test_size=1000"],
        "paper_config": "paper/caltech101",
    },
}
BF16_METHODS = ("fedlrm", "fedavg")

# What the three modes run unless an option says otherwise. The CPU reduction: 10 rounds x 2 local
# epochs instead of 20 x 10 (5 x 2 before issue 18); FedLEASE's warm-up (5 by default) must end
# before the last round.
PROFILES = {
    "full": {"datasets": "cifar10,caltech101", "shots": "1,4,16", "seeds": "0,1,2", "algorithms": None,
             "rounds": 10, "local_epochs": 2, "warmup_rounds": 3, "threads": 1, "workers": 2,
             "ranks": "1,2,4,8,16,32", "rank_cells": "caltech101:1,cifar10:4", "bf16_cells": "cifar10:16,caltech101:4"},
    "quick": {"datasets": "cifar10,caltech101", "shots": "1", "seeds": "0",
              "algorithms": "zeroshot,local,fedavg,fedlrm,fedlease",
              "rounds": 1, "local_epochs": 1, "warmup_rounds": 1, "threads": 1, "workers": 2,
              "ranks": "4,16", "rank_cells": "caltech101:1", "bf16_cells": "cifar10:1,caltech101:1"},
    # None: keep the value of the shipped config paper/<dataset> (20 rounds x 10 epochs, fedlease default).
    "paper": {"datasets": "cifar10,caltech101", "shots": "1,4,16", "seeds": "0,1,2", "algorithms": None,
              "rounds": None, "local_epochs": None, "warmup_rounds": None, "threads": None, "workers": 1,
              "ranks": "1,2,4,8,16,32", "rank_cells": "caltech101:1", "bf16_cells": "cifar10:16,caltech101:4"},
}

# The paper's numbers (docs/DESIGN.md section 3): weighted mean client accuracy in %, CLIP ViT-B/16.
PAPER = {
    "cifar10": {"fedlrm": {1: 90.37, 4: 91.01, 16: 91.88}, "fedavg": {1: 89.56, 16: 90.89}, "fedprox": {16: 90.0}},
    "caltech101": {"fedlrm": {4: 95.76}, "fedprox": {4: 94.11}},
}
PAPER_NAMES = {"fedavg": "LoRAFL", "fedprox": "LoRAProx", "apfl": "LoRAAPFL", "fedlrm": "FedLRM"}
# Gains of FedLRM the paper states in words (points), by baseline and shots.
PAPER_GAINS = {"caltech101": {"apfl": {4: 1.3, 16: 1.1}}}
PAPER_RANK = {16: 91.08, 32: 91.16}  # Caltech101, Figure 5

# One row per finished run; fractions (not %) as fedlrm's summary gives them.
KEY = ("dataset", "shots", "seed", "method", "rank", "precision", "rounds", "local_epochs", "model")
FIELDS = (*KEY, "acc_weighted", "acc_mean", "acc_std", "global_accuracy", "wall_seconds", "run_seconds",
          "trainable", "uploaded", "mb_up_per_client_round", "mb_down_per_client_round", "rejected_updates",
          "warmup_rounds", "finished_at")
FAIL_FIELDS = (*KEY, "error", "finished_at")


@dataclass(frozen=True)
class Run:
    method: str
    rank: int
    precision: str


@dataclass
class Group:
    """The runs that share one data load: one (dataset, shots, seed)."""
    dataset: str
    shots: int
    seed: int
    overrides: list[str]
    config: str | None
    runs: list[Run] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # rounds, local_epochs, model, warmup of these runs

    def key(self, run: Run) -> tuple:
        s = self.settings
        return tuple(str(v) for v in (self.dataset, self.shots, self.seed, run.method, run.rank, run.precision,
                                      s["rounds"], s["local_epochs"], s["model"]))


# ----------------------------------------------------------------------------- options

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="extra fedlrm config overrides for every run, e.g. model.name=/path/to/weights")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="smoke test: seed 0, 1-shot, 1 round x 1 epoch, 5 algorithms, into /tmp")
    mode.add_argument("--paper", action="store_true",
                      help="the paper's setting from the shipped configs paper/* (ViT-B/16, 20 rounds x 10 epochs); "
                           "needs the OpenAI weights and, realistically, a GPU")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report and plots from runs.csv")
    p.add_argument("--dry-run", action="store_true", help="print the runs still to do and a time estimate")
    p.add_argument("--datasets", help="comma-separated, of: " + ", ".join(DATASETS))
    p.add_argument("--shots", help="comma-separated images per class per client (default 1,4,16)")
    p.add_argument("--seeds", help="comma-separated (default 0,1,2)")
    p.add_argument("--algorithms", help="comma-separated (default: every algorithm of fedlrm's registry)")
    p.add_argument("--rounds", type=int, help="federated rounds (CPU default 10; the paper 20)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (CPU default 2; the paper 10)")
    p.add_argument("--warmup-rounds", type=int, help="fedlease.warmup_rounds (CPU default 3)")
    p.add_argument("--threads", type=int, help="torch threads per worker (CPU default 1)")
    p.add_argument("--workers", type=int, help="worker processes (default 2; --paper 1)")
    p.add_argument("--ranks", help="global ranks of the FedLRM rank sweep (default 1,2,4,8,16,32)")
    p.add_argument("--rank-cells", help="dataset:shots cells of the rank sweep (default caltech101:1,cifar10:4: the "
                                        "paper's dataset, and one where the small backbone learns)")
    p.add_argument("--bf16-cells", help="dataset:shots cells run again with bf16 (default cifar10:16,caltech101:4)")
    p.add_argument("--datasets-dir", type=Path, default=REPO.parent / "shared" / "datasets",
                   help="directory of the parquet files (default: ../shared/datasets of the repository)")
    p.add_argument("--out", type=Path, help="results directory (CSV, report, plots)")
    p.add_argument("--run-dir", type=Path, help="scratch directory of the per-run outputs "
                                                "(default /tmp/fedlrm-accuracy-runs/<out name>)")
    args = p.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "paper" if args.paper else "full"]
    for name, default in profile.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.out = (args.out or (QUICK_RESULTS if args.quick else PAPER_RESULTS if args.paper else RESULTS)).resolve()
    args.run_dir = (args.run_dir or SCRATCH / args.out.name).resolve()
    args.datasets = split(args.datasets)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    args.shots, args.seeds, args.ranks = ints(args.shots), ints(args.seeds), ints(args.ranks)
    args.rank_cells = [cell(c) for c in split(args.rank_cells)]
    args.bf16_cells = [cell(c) for c in split(args.bf16_cells)]
    return args


def split(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in split(text)]


def cell(text: str) -> tuple[str, int]:
    dataset, shots = text.split(":")
    return dataset, int(shots)


# ----------------------------------------------------------------------------- the plan

def dataset_overrides(args: argparse.Namespace, dataset: str) -> list[str]:
    spec = DATASETS[dataset]
    train, test = (args.datasets_dir.resolve() / f for f in spec["files"])
    common = ["data.source=parquet", f"data.train={train}", f"data.test={test}", *spec["always"]]
    return common if args.paper else [*common, *spec["cpu"]]


def reduction_overrides(args: argparse.Namespace) -> list[str]:
    """The options that are set; in --paper mode the ones not given keep the YAML's values."""
    out = []
    if args.rounds is not None:
        # Evaluate only at the end: the per-round evaluations cost time and the report uses the last.
        out += [f"train.rounds={args.rounds}", f"train.eval_every={args.rounds}"]
    if args.local_epochs is not None:
        out.append(f"train.local_epochs={args.local_epochs}")
    if args.warmup_rounds is not None:
        out.append(f"fedlease.warmup_rounds={args.warmup_rounds}")
    if args.threads is not None:
        out.append(f"train.threads={args.threads}")
    return out


def config_path(args: argparse.Namespace, dataset: str) -> str | None:
    return DATASETS[dataset]["paper_config"] if args.paper else None  # a shipped config, by name


def plan(args: argparse.Namespace) -> list[Group]:
    """Every (dataset, shots, seed) with its runs: the main grid, the rank sweep, the bf16 cells."""
    from fedlrm.algorithms import ALGORITHMS
    from fedlrm.algorithms import load_config

    algorithms = split(args.algorithms) or list(ALGORITHMS)
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    groups = []
    for dataset in args.datasets:
        for shots in args.shots:
            for seed in args.seeds:
                overrides = [*dataset_overrides(args, dataset), *reduction_overrides(args),
                             f"data.shots={shots}", f"seed={seed}", *args.overrides]
                cfg = load_config(config_path(args, dataset), overrides)  # fails here on a bad override
                main_rank = cfg.adapter.rank
                runs = [Run(a, main_rank, "fp32") for a in algorithms]
                if (dataset, shots) in args.rank_cells and "fedlrm" in algorithms:
                    runs += [Run("fedlrm", r, "fp32") for r in args.ranks if r != main_rank]
                if (dataset, shots) in args.bf16_cells:
                    runs += [Run(a, main_rank, "bf16") for a in BF16_METHODS if a in algorithms]
                settings = {"rounds": cfg.train.rounds, "local_epochs": cfg.train.local_epochs,
                            "model": cfg.model.name, "warmup_rounds": cfg.methods["fedlease"].warmup_rounds,
                            "main_rank": main_rank}
                groups.append(Group(dataset, shots, seed, overrides, config_path(args, dataset), runs, settings))
    return groups


def pending(groups: list[Group], done: set[tuple], workers: int = 1) -> list[Group]:
    """The runs not yet in runs.csv as job groups, longest first so that the workers end together.

    A group (one dataset, shots and seed) loads its data once for all its runs; one estimated at more
    than a share of the work (the total over 2 x workers) is cut into parts of at most about that share, so
    that a cell with few groups (3 seeds on 2 workers) does not leave a worker idle for the last
    group (each extra part loads its data once more: seconds). A run estimated above SLOW_SECONDS
    goes to a job group of its own at the end, so that a grid stopped before them has every other
    cell complete."""
    main, tail = [], []
    for g in groups:
        runs = [r for r in g.runs if g.key(r) not in done]
        fast = [r for r in runs if estimate(g, r) <= SLOW_SECONDS]
        if fast:
            main.append(replace(g, runs=fast))
        tail += [replace(g, runs=[r]) for r in runs if estimate(g, r) > SLOW_SECONDS]
    share = sum(group_cost(g) for g in main) / (2 * max(1, workers))
    main = [part for g in main for part in split_group(g, share)]
    return sorted(main, key=lambda g: -group_cost(g)) + sorted(tail, key=lambda g: -group_cost(g))


def group_cost(group: Group) -> float:
    return sum(estimate(group, r) for r in group.runs)


def split_group(group: Group, share: float) -> list[Group]:
    """`group` cut into parts of about `share` estimated seconds (greedy, longest run first, each to
    the cheapest part); the runs keep their order within a part."""
    parts = max(1, min(len(group.runs), math.ceil(group_cost(group) / share) if share > 0 else 1))
    if parts == 1:
        return [group]
    load, members = [0.0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(group.runs)), key=lambda i: -estimate(group, group.runs[i])):
        cheapest = load.index(min(load))
        members[cheapest].append(i)
        load[cheapest] += estimate(group, group.runs[i])
    return [replace(group, runs=[group.runs[i] for i in sorted(m)]) for m in members if m]


# Rough seconds of one run on this project's 2-core CPU box with one torch thread per worker,
# fitted to single runs of each method (built-in backbone of issue 18, 10 rounds x 2 epochs): a
# fixed part (model, evaluation, saving), a part per client and round (messages, optimizer), a part
# per training image pass and, for the prompt learners, a part per local step that encodes every
# class's prompt with the text model. Only for ordering the jobs and a first ETA; the ETA is
# rescaled by measured times.
CLASSES_PER_CLIENT = {"cifar10": 2, "caltech101": 11.5}  # classes per client of the shard split
# seconds per training image pass: Caltech101's 16-shot runs took ~400-500 s (fedavg, apfl, fedlrm),
# about 3.5 times what CIFAR-10's per-pass figure predicts
PASS_SECONDS = {"cifar10": 0.003, "caltech101": 0.0105}
CLASSES = {"cifar10": 10, "caltech101": 100}
BATCH = 32
METHOD_FACTOR = {"zeroshot": 0.0, "local": 1.0, "fedavg": 1.0, "fedprox": 1.3, "apfl": 2.3, "fedlrm": 1.3,
                 "fedlease": 1.9, "fedpia": 1.4, "f3ocus": 0.8, "promptfl": 0.5, "fedotp": 0.5, "pfedmoap": 0.5}
# the text side per local step: fixed + per class, for one prompt per class, and how many such
# encodings a method's step costs. Scaled to commit 35b7045 (the frozen text tower computes no weight
# gradients, pFedMoAP's received experts are encoded once a round) by steps timed before and after
# it on 100 classes: promptfl 1.42 -> 0.96 s, fedotp 2.78 -> 1.98 s, pfedmoap 5.16 -> 1.02 s.
TEXT_STEP_SECONDS = (0.029, 0.0025)
TEXT_PROMPTS = {"promptfl": 1.0, "fedotp": 2.1, "pfedmoap": 1.1}
# per client and round; Caltech101 measured on the built-in backbone of issue 18 (a 1-round run:
# 79 s, of which ~60 s the ten clients' NTKs), CIFAR-10 from its 10-round runs (~100 s against ~45 s)
F3OCUS_NTK_SECONDS = {"cifar10": 0.6, "caltech101": 6.0}
SLOW_SECONDS = 20 * 60


def estimate(group: Group, run: Run) -> float:
    s = group.settings
    factor = METHOD_FACTOR.get(run.method, 1.0)
    client_rounds = 10 * s["rounds"] if factor else 0
    images = group.shots * CLASSES_PER_CLIENT[group.dataset]
    passes = client_rounds * s["local_epochs"] * images
    seconds = 8.0 + 0.35 * client_rounds + PASS_SECONDS[group.dataset] * passes * factor
    if run.method in TEXT_PROMPTS:
        steps = client_rounds * s["local_epochs"] * math.ceil(images / BATCH)
        fixed, per_class = TEXT_STEP_SECONDS
        seconds += steps * (fixed + per_class * CLASSES[group.dataset]) * TEXT_PROMPTS[run.method]
    if run.method == "f3ocus":
        seconds += client_rounds * F3OCUS_NTK_SECONDS[group.dataset]
    return seconds * (0.5 if run.precision == "bf16" else 1.0)  # this CPU has AMX bf16 units


# ----------------------------------------------------------------------------- the workers

_QUEUE = None  # each worker's end of the result queue


def init_worker(results_queue, threads: int | None) -> None:
    global _QUEUE
    _QUEUE = results_queue
    if threads:
        import torch
        torch.set_num_threads(threads)  # also for the data load, before the config sets it


def run_group(group: Group, run_root: str) -> None:
    """Load the data once, then run every run of the group; each result or failure goes to the queue."""
    import dataclasses

    from fedlrm.algorithms import load_config
    from fedlrm.data import load_federated_data
    from fedlrm.experiment import run_experiment
    from fedlrm.models import load_backbone

    try:
        cfg = load_config(group.config, group.overrides)
        backbone = load_backbone(cfg.model)
        # without the images the built-in backbone was pretrained on (data.exclude_pretraining)
        data = load_federated_data(cfg.data, backbone.preprocess, cfg.seed, pretrained_on=backbone.pretrained_on)
    except Exception:  # noqa: BLE001 - reported per run, the other groups go on
        error = traceback.format_exc()
        for run in group.runs:
            _QUEUE.put(("fail", group.key(run), error))
        return
    for run in group.runs:
        started = time.perf_counter()
        try:
            run_cfg = load_config(group.config, [*group.overrides, f"algorithm={run.method}",
                                                 f"adapter.rank={run.rank}", f"train.precision={run.precision}"])
            run_dir = Path(run_root) / group.dataset / f"{group.shots}shot-seed{group.seed}" / \
                f"{run.method}-r{run.rank}-{run.precision}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before has left a partial one
            result = run_experiment(dataclasses.replace(run_cfg, name=None), data=data, run_dir=run_dir,
                                    progress=False)
        except Exception:  # noqa: BLE001
            _QUEUE.put(("fail", group.key(run), traceback.format_exc()))
            continue
        s = result.summary
        row = dict(zip(KEY, group.key(run)))
        row.update({k: s.get(k) for k in ("acc_weighted", "acc_mean", "acc_std", "global_accuracy", "wall_seconds",
                                          "trainable", "uploaded", "mb_up_per_client_round",
                                          "mb_down_per_client_round", "rejected_updates")})
        row.update(run_seconds=round(time.perf_counter() - started, 2), warmup_rounds=group.settings["warmup_rounds"],
                   finished_at=now())
        _QUEUE.put(("row", group.key(run), row))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- CSV files

def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, fields: tuple, row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != fields:
            raise SystemExit(f"{path} has the columns {header}, not {list(fields)}; move it away to start anew")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k) for k in fields})


def done_keys(out: Path) -> set[tuple]:
    return {tuple(r[k] for k in KEY) for r in read_rows(out / "runs.csv")}


# ----------------------------------------------------------------------------- running

class Progress:
    """One log line per finished run: the cell, its accuracy, elapsed time and an ETA."""

    def __init__(self, groups: list[Group], workers: int):
        self.estimates = {g.key(r): estimate(g, r) for g in groups for r in g.runs}
        self.total = len(self.estimates)
        self.workers = workers
        self.started = time.perf_counter()
        self.done = 0
        self.failed = 0
        self.est_done = 0.0
        self.real_done = 0.0

    def eta(self) -> float:
        # The cost model times the measured/estimated ratio so far, shared by the workers.
        scale = self.real_done / self.est_done if self.est_done else 1.0
        left = sum(self.estimates.values()) - self.est_done
        return left * scale / self.workers

    def finished(self, key: tuple, seconds: float, text: str) -> None:
        self.done += 1
        self.est_done += self.estimates.get(key, 0.0)
        self.real_done += seconds
        name = "{} {}-shot seed {} {} r{} {}".format(*key)
        log.info("[%d/%d] %s: %s (%.0f s) | elapsed %s, ETA %s", self.done, self.total, name, text, seconds,
                 clock(time.perf_counter() - self.started), clock(self.eta()))


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_grid(args: argparse.Namespace, groups: list[Group]) -> int:
    """Run the groups on `args.workers` processes; returns the number of failed runs."""
    progress = Progress(groups, args.workers)
    ctx = mp.get_context("spawn")  # fresh interpreters: torch's thread pools do not survive a fork well
    results = ctx.Queue()
    pool = ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=init_worker,
                               initargs=(results, args.threads))
    futures = {pool.submit(run_group, g, str(args.run_dir)): g for g in groups}  # FIFO: longest first
    reported = set()
    try:
        while True:
            try:
                handle(results.get(timeout=2.0), args, progress)
                continue
            except queue.Empty:
                pass
            for future, group in futures.items():
                if future.done() and future not in reported:
                    reported.add(future)
                    if future.exception() is not None:  # a worker died (e.g. out of memory)
                        log.error("the worker of %s %d-shot seed %d ended abnormally: %r", group.dataset,
                                  group.shots, group.seed, future.exception())
                    write_report_safely(args)
            if len(reported) == len(futures):
                break
        while True:  # messages that arrived after the last group ended
            try:
                handle(results.get(timeout=0.5), args, progress)
            except queue.Empty:
                break
    finally:
        pool.shutdown(cancel_futures=True)
    return progress.failed


def handle(message: tuple, args: argparse.Namespace, progress: Progress) -> None:
    kind, key, payload = message
    if kind == "row":
        append_row(args.out / "runs.csv", FIELDS, payload)
        text = f"acc {float(payload['acc_weighted']) * 100:.2f}%"
        progress.finished(key, float(payload["run_seconds"]), text)
    else:
        progress.failed += 1
        append_row(args.out / "failures.csv", FAIL_FIELDS,
                   {**dict(zip(KEY, key)), "error": payload.strip().splitlines()[-1], "finished_at": now()})
        log.error("FAILED %s:\n%s", " ".join(key), payload)
        progress.finished(key, 0.0, "FAILED")


# ----------------------------------------------------------------------------- the report

def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def fmt(values: list[float], full: int, bold: bool = False) -> str:
    """'mean ± std' in %, with n when fewer seeds than planned are in."""
    if not values:
        return ""
    m, sd = mean_std([v * 100 for v in values])
    text = f"{m:.2f} ± {sd:.2f}"
    text = f"**{text}**" if bold else text
    return text + (f" (n={len(values)})" if len(values) < full else "")


def number(value: str | None) -> float | None:
    return None if value in (None, "", "None") else float(value)


class Results:
    """runs.csv, filtered to the settings of this invocation, indexed for the tables."""

    def __init__(self, rows: list[dict], args: argparse.Namespace, settings: dict):
        keep = lambda r: (r["rounds"] == str(settings["rounds"]) and r["local_epochs"] == str(settings["local_epochs"])
                          and r["model"] == str(settings["model"]))
        self.rows = [r for r in rows if keep(r)]
        self.main_rank = str(settings["main_rank"])
        self.seeds = len(args.seeds)

    def values(self, metric: str, dataset: str, shots: int, method: str, rank: str | None = None,
               precision: str = "fp32") -> dict[str, float]:
        """seed -> value of the runs of one cell."""
        rank = rank or self.main_rank
        out = {}
        for r in self.rows:
            if (r["dataset"], r["shots"], r["method"], r["rank"], r["precision"]) == \
                    (dataset, str(shots), method, str(rank), precision) and number(r[metric]) is not None:
                out[r["seed"]] = number(r[metric])
        return out

    def methods(self, dataset: str, order: list[str]) -> list[str]:
        present = {r["method"] for r in self.rows if r["dataset"] == dataset}
        return [m for m in order if m in present]

    def mean(self, *args, **kwargs) -> float | None:
        v = list(self.values(*args, **kwargs).values())
        return sum(v) / len(v) * 100 if v else None


def paired_gain(res: Results, dataset: str, shots: int, method: str, other: str) -> str:
    """FedLRM minus `other` in points, paired by seed (same split and images)."""
    a, b = res.values("acc_weighted", dataset, shots, method), res.values("acc_weighted", dataset, shots, other)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return ""
    m, sd = mean_std([(a[s] - b[s]) * 100 for s in seeds])
    return f"{m:+.2f} ± {sd:.2f}" + (f" (n={len(seeds)})" if len(seeds) < res.seeds else "")


def label(method: str) -> str:
    return f"{method} ({PAPER_NAMES[method]})" if method in PAPER_NAMES else method


def dataset_section(res: Results, args: argparse.Namespace, dataset: str, order: list[str]) -> list[str]:
    spec = DATASETS[dataset]
    methods = res.methods(dataset, order)
    if not methods:
        return []
    shots = args.shots
    lines = [f"### {spec['title']} ({spec['classes']} classes)", "",
             ("Weighted mean client accuracy (%; the paper's metric), mean ± std over seeds; "
             "**bold**: the best mean of a column. *paper*: the paper's number (ViT-B/16), blank where it gives none."), "",
             "| method | " + " | ".join(f"{k}-shot | paper" for k in shots) + " |",
             "|---|" + "---:|---:|" * len(shots)]
    best = {k: max((res.mean("acc_weighted", dataset, k, m) or -1, m) for m in methods)[1] for k in shots}
    for m in methods:
        cells = []
        for k in shots:
            cells.append(fmt(list(res.values("acc_weighted", dataset, k, m).values()), res.seeds, best[k] == m))
            paper = PAPER.get(dataset, {}).get(m, {}).get(k)
            cells.append("" if paper is None else f"{paper:.2f}")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")

    with_global = [m for m in methods if any(res.values("global_accuracy", dataset, k, m) for k in shots)]
    if with_global:
        lines += ["", ("Accuracy of the global model on a random subsample of the test split (%), where a method has "
                      "one (zeroshot: the unadapted model; apfl/fedlrm: their global expert alone):"), "",
                  "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---:|" * len(shots)]
        for m in with_global:
            lines.append(f"| {label(m)} | " + " | ".join(
                fmt(list(res.values("global_accuracy", dataset, k, m).values()), res.seeds) for k in shots) + " |")

    baselines = [b for b in ("fedavg", "fedprox", "apfl", "local") if b in methods and "fedlrm" in methods]
    if baselines:
        lines += ["", ("FedLRM minus a baseline (points, paired by seed: same split and images), with the paper's "
                      "difference (\\* computed from its two numbers above; unmarked: a gain it states):"), "",
                  "| FedLRM minus | " + " | ".join(f"{k}-shot | paper" for k in shots) + " |",
                  "|---|" + "---:|---:|" * len(shots)]
        for b in baselines:
            cells = []
            for k in shots:
                cells.append(paired_gain(res, dataset, k, "fedlrm", b))
                cells.append(paper_gain(dataset, b, k))
            lines.append(f"| {label(b)} | " + " | ".join(cells) + " |")
    return lines + [""]


def paper_gain(dataset: str, baseline: str, shots: int) -> str:
    stated = PAPER_GAINS.get(dataset, {}).get(baseline, {}).get(shots)
    if stated is not None:
        return f"+{stated:.2f}"
    ours, theirs = (PAPER.get(dataset, {}).get(m, {}).get(shots) for m in ("fedlrm", baseline))
    return "" if ours is None or theirs is None else f"{ours - theirs:+.2f}\\*"


def rank_section(res: Results, args: argparse.Namespace) -> list[str]:
    return [line for rank_cell in args.rank_cells for line in rank_cell_section(res, args, *rank_cell)]


def rank_cell_section(res: Results, args: argparse.Namespace, dataset: str, shots: int) -> list[str]:
    ranks = sorted(set(args.ranks) | {int(res.main_rank)})
    if not any(res.values("acc_weighted", dataset, shots, "fedlrm", str(r)) for r in ranks):
        return []
    figure = "the paper's Figure 5" if dataset == "caltech101" else "as the paper's Figure 5, on another dataset"
    lines = [f"### FedLRM's global rank ({DATASETS[dataset]['title']}, {shots}-shot; {figure})", "",
             (f"The personal expert keeps rank {local_rank(args)}. r={res.main_rank} is the main grid's cell. "
              + ("The paper does not state the shots of its sweep; its r=16 figure (91.08) is below its 4-shot "
                 f"result (95.76), so we guess {shots}-shot." if dataset == "caltech101" else
                 "The paper sweeps on Caltech101 only; this cell is ours, a second dataset for the same question.")), "",
             "| global rank r | weighted accuracy (%) | paper (ViT-B/16) |", "|---:|---:|---:|"]
    for r in ranks:
        ours = fmt(list(res.values("acc_weighted", dataset, shots, "fedlrm", str(r)).values()), res.seeds)
        paper = PAPER_RANK.get(r) if dataset == "caltech101" else None
        lines.append(f"| {r} | {ours} | {'' if paper is None else f'{paper:.2f}'} |")
    return lines + [""]


def local_rank(args: argparse.Namespace) -> int:
    from fedlrm.algorithms import load_config
    return load_config(config_path(args, args.datasets[0]) if args.datasets else None,
                       [o for o in args.overrides]).methods["fedlrm"].local_rank


def bf16_section(res: Results, args: argparse.Namespace) -> list[str]:
    rows = []
    for dataset, shots in args.bf16_cells:
        for m in BF16_METHODS:
            fp32 = res.values("acc_weighted", dataset, shots, m)
            bf16 = res.values("acc_weighted", dataset, shots, m, precision="bf16")
            if not bf16:
                continue
            seeds = sorted(set(fp32) & set(bf16))
            diff = ""
            if seeds:
                d, sd = mean_std([(bf16[s] - fp32[s]) * 100 for s in seeds])
                diff = f"{d:+.2f} ± {sd:.2f}"
            t32 = res.values("wall_seconds", dataset, shots, m)
            t16 = res.values("wall_seconds", dataset, shots, m, precision="bf16")
            speed = f"{mean_std(list(t16.values()))[0] / mean_std(list(t32.values()))[0]:.2f}" if t32 and t16 else ""
            rows.append(f"| {DATASETS[dataset]['title']} | {shots} | {m} | {fmt(list(fp32.values()), res.seeds)} | "
                        f"{fmt(list(bf16.values()), res.seeds)} | {diff} | {speed} |")
    if not rows:
        return []
    return ["### bf16 autocast against fp32", "",
            ("Same seeds, splits and images; `train.precision=bf16` autocasts the forward passes (training and "
            "evaluation). The difference is paired by seed. Time ratio: mean time of the rounds (training and evaluation), "
            "bf16 / fp32, on this machine's CPU."), "",
            "| dataset | shots | method | fp32 (%) | bf16 (%) | bf16 − fp32 (points) | time ratio |",
            "|---|---:|---|---:|---:|---:|---:|", *rows, ""]


def findings(res: Results, args: argparse.Namespace, order: list[str], failures: list[dict]) -> list[str]:
    """Neutral sentences computed from the numbers."""
    out = []
    for dataset in args.datasets:
        methods = res.methods(dataset, order)
        title = DATASETS[dataset]["title"]
        for k in args.shots:
            means = {m: res.mean("acc_weighted", dataset, k, m) for m in methods}
            means = {m: v for m, v in means.items() if v is not None}
            if not means:
                continue
            ranked = sorted(means, key=means.get, reverse=True)
            # Methods whose means agree to the printed precision share a place.
            top = [m for m in ranked if round(means[m], 2) == round(means[ranked[0]], 2)]
            if len(top) == len(ranked) > 1:
                text = f"{title} {k}-shot: every method has the same mean ({means[top[0]]:.2f}%)"
            else:
                text = f"{title} {k}-shot: the best mean is {' = '.join(top)} ({means[top[0]]:.2f}%)"
                rest = [m for m in ranked if m not in top]
                if rest:
                    text += f", then {rest[0]} ({means[rest[0]]:.2f}%)"
                if "fedlrm" in rest[1:]:
                    place = 1 + sum(1 for m in ranked if round(means[m], 2) > round(means["fedlrm"], 2))
                    text += f"; fedlrm places {place} of {len(ranked)} ({means['fedlrm']:.2f}%)"
            if "zeroshot" in means:
                text += (f"; zero-shot gives {means['zeroshot']:.2f}% "
                         f"(chance with logits over {DATASETS[dataset]['classes']} classes: "
                         f"{100 / DATASETS[dataset]['classes']:.0f}%)")
            out.append(f"- {text}.")
    for dataset, shots in args.rank_cells:
        sweep = {r: res.mean("acc_weighted", dataset, shots, "fedlrm", str(r))
                 for r in sorted(set(args.ranks) | {int(res.main_rank)})}
        sweep = {r: v for r, v in sweep.items() if v is not None}
        if len(sweep) > 1:
            best = max(sweep, key=sweep.get)
            out.append(f"- Rank sweep ({DATASETS[dataset]['title']} {shots}-shot): the best mean is at r={best} ({sweep[best]:.2f}%); the means span "
                       f"{max(sweep.values()) - min(sweep.values()):.2f} points over r in {sorted(sweep)}.")
    diffs = []
    for dataset, shots in args.bf16_cells:
        for m in BF16_METHODS:
            a, b = res.values("acc_weighted", dataset, shots, m), res.values("acc_weighted", dataset, shots, m, precision="bf16")
            diffs += [abs(b[s] - a[s]) * 100 for s in set(a) & set(b)]
    if diffs:
        out.append(f"- bf16 vs fp32: the largest difference of a single seed is {max(diffs):.2f} points "
                   f"(mean absolute {sum(diffs) / len(diffs):.2f}) over {len(diffs)} pairs.")
    if failures:
        out.append(f"- {len(failures)} run(s) failed; see failures.csv.")
    return out


def setting_text(args: argparse.Namespace, settings: dict, meta: dict) -> list[str]:
    rounds, epochs = settings["rounds"], settings["local_epochs"]
    if args.paper:
        return [(f"The paper's setting from `the shipped configs paper/*`: model `{settings['model']}`, {rounds} rounds x "
                f"{epochs} local epochs, 10 clients, shard split; Caltech101 without `BACKGROUND_Google` and "
                f"`Faces_easy` (CoOp-style, 100 classes).")]
    seeds = ", ".join(map(str, args.seeds))
    return [
        (f"10 clients, shard split (2 shards of the label-sorted training set per client), "
        f"{'/'.join(map(str, args.shots))} images per class per client (shots), seeds {seeds} (a seed sets the split, the images and the initialisation), "
        "batch 32, AdamW, lr 0.002 with cosine decay over the run, LoRA on the image encoder's q and v projections, "
        "global rank 16 (alpha 32), FedLRM's personal rank 4. Every algorithm in the tables sees the identical "
        "clients, images and test sets for a given dataset, shots and seed."),
        "",
        "Deviations from the paper (section 3.1), all forced by a 2-core CPU without network:",
        "",
        backbone_text(settings),
        (f"- **Training length**: {n(rounds, 'round')} x {n(epochs, 'local epoch')} = {n(rounds * epochs, 'local epoch')} "
        f"in all, instead of the paper's 20 x 10 = 200. The cosine schedule spans the shorter run. FedLEASE's warm-up "
        f"is {n(settings['warmup_rounds'], 'round')} (its default of 5 would fill the whole run)."),
        f"- **Evaluation only at the end** (`train.eval_every={rounds}`): the tables are the last round's accuracies.",
        ("- **Test sets**: CIFAR-10 clients get 200 test images each with their training label distribution; "
        "Caltech101 clients get every test image of their classes (`data.test_per_client=null`, the test split has "
        "few per class). The global model is tested on a random subsample of 1000 test images, not the whole split."),
        ("- **Caltech101**: the CoOp-style 100 object classes (`BACKGROUND_Google` and `Faces_easy` dropped) from "
        "the offline copy in `../shared/datasets` (a fixed 2:1 train/test list per class, images resized to a "
        "128 px shorter side, then by the backbone to 64x64). The paper does not say which class list it used."),
        ("- **Training images**: the clients draw their shots only from train images the built-in backbone was not "
        "pretrained on (`data.exclude_pretraining`, on by default): on CIFAR-10 the 3,000 images of the shipped "
        "subset (300 per class), on Caltech101 the half of each class's train images the recipe left out (all of "
        "a held-out class's). The test splits were never pretrained on."),
        "- Two worker processes with one torch thread each shared the 2 cores; this changes timings, not results.",
    ]


def backbone_text(settings: dict) -> str:
    """The backbone paragraph; for the built-in model, its recipe's own record (PRETRAIN.json)."""
    model = settings["model"]
    from fedlrm.config import BUILTIN_MODEL

    if model != BUILTIN_MODEL:
        return f"- **Backbone**: `{model}`, instead of OpenAI's CLIP ViT-B/16 at 224x224."
    from fedlrm.data.pretraining import RECORD_FILE
    from fedlrm.models.builtin import ASSET_DIR

    record = json.loads((ASSET_DIR / RECORD_FILE).read_text())
    m, zs = record["model"], record["zero_shot"]
    held = zs["caltech101_held_out_classes"]
    return (f"- **Backbone**: `{model}`, fedlrm's built-in dual encoder instead of OpenAI's CLIP ViT-B/16 at 224x224: "
            f"a CLIP ViT ({m['vision_layers']} blocks, width {m['vision_width']}, {m['image_size']}x{m['image_size']} "
            f"px, patch {m['patch_size']}) pretrained by `fedlrm pretrain` on CIFAR-10 and half of Caltech101's train "
            f"images, beside the frozen all-MiniLM-L6-v2 text encoder. Zero-shot: "
            f"{100 * zs['cifar10_test']['accuracy']:.2f} % on the CIFAR-10 test split, "
            f"{100 * zs['caltech101_test']['accuracy']:.2f} % on Caltech101's (100 classes); "
            f"{len(held['classes'])} Caltech101 classes ({', '.join(held['classes'])}) were held out of pretraining. "
            "Absolute accuracies are not comparable to the paper's.")


def n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def commands_text(args: argparse.Namespace, meta: dict) -> list[str]:
    from fedlrm.algorithms import ALGORITHMS

    algorithms = ",".join(ALGORITHMS)  # what `fedlrm compare` runs without the flag, spelt out
    lines = ["### Reproduce", "", "This report:", "", "```",
             meta.get("command", "python benchmarks/accuracy.py"), "```", ""]
    if meta.get("fedlrm_commit"):
        lines += [(f"fedlrm commit `{meta['fedlrm_commit']}`{' (with local changes)' if meta.get('fedlrm_dirty') else ''}, "
                  f"torch {meta.get('torch', '?')}, started {meta.get('started', '?')}."), ""]
    caltech = "data.exclude_classes=[BACKGROUND_Google,Faces_easy]"
    lines += [("The paper's setting (CLIP ViT-B/16 at 224 px, 20 rounds x 10 local epochs) on a machine with a GPU "
              "and the OpenAI weights (hub access, or a local copy given as `model.name=/path/to/clip-vit-base-patch16`), "
              "the whole grid with this script, or one (shots, seed) cell per `fedlrm compare`:"), "", "```",
              "python benchmarks/accuracy.py --paper",
              f"FEDLRM_DATASETS=../shared/datasets fedlrm compare --config paper/cifar10 --algorithms {algorithms} data.shots=1 seed=0",
              f"FEDLRM_DATASETS=../shared/datasets fedlrm compare --config paper/caltech101 --algorithms {algorithms} data.shots=4 seed=0 {caltech}",
              "```", "",
              "Both are run from the repository root (the YAML files name the data as `../shared/datasets/...`)."]
    return lines


def write_report(args: argparse.Namespace) -> Path:
    from fedlrm.algorithms import ALGORITHMS

    meta_path = args.out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    groups = plan(args)
    settings = groups[0].settings if groups else {"rounds": args.rounds, "local_epochs": args.local_epochs,
                                                  "model": "", "warmup_rounds": args.warmup_rounds, "main_rank": 16}
    res = Results(read_rows(args.out / "runs.csv"), args, settings)
    failures = read_rows(args.out / "failures.csv")
    failed_now = {tuple(f[k] for k in KEY) for f in failures} - {tuple(r[k] for k in KEY) for r in res.rows}
    order = split(args.algorithms) or list(ALGORITHMS)
    title = "the paper's setting" if args.paper else f"{settings['model']} on CPU"
    lines = [f"## Accuracy against the FedLRM paper ({title})", "",
             (f"Written by `benchmarks/accuracy.py` from `{rel(args.out / 'runs.csv')}` "
             f"({len(res.rows)} runs of {sum(len(g.runs) for g in groups)} planned"
             f"{f', {len(failed_now)} failed' if failed_now else ''})."), "",
             *setting_text(args, settings, meta), ""]
    lines += ["### Findings", "", *(findings(res, args, order, list(failed_now)) or ["- No results yet."]), ""]
    for dataset in args.datasets:
        lines += dataset_section(res, args, dataset, order)
    if "caltech101" in args.datasets:
        lines += [("For Caltech101 the paper also states, per docs/DESIGN.md section 3, FedLRM gains of up to 1.64 and 1.74 "
                  "points over LoRAFL and LoRAProx, without saying at which shots."), ""]
    lines += rank_section(res, args) + bf16_section(res, args)
    plots = write_plots(res, args, order)
    if plots:
        lines += ["### Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    lines += commands_text(args, meta)
    path = args.out / "accuracy.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def write_report_safely(args: argparse.Namespace) -> None:
    """A broken report must not stop the grid; the error is logged and --report-only can retry."""
    try:
        write_report(args)
    except Exception:
        log.exception("writing the report failed (the runs go on)")


# ----------------------------------------------------------------------------- plots

def write_plots(res: Results, args: argparse.Namespace, order: list[str]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset in args.datasets:
        methods = res.methods(dataset, order)
        if not methods:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, m in enumerate(methods):
            points = [(k, list(res.values("acc_weighted", dataset, k, m).values())) for k in args.shots]
            points = [(k, mean_std([x * 100 for x in v])) for k, v in points if v]
            if points:
                # A small horizontal offset per method keeps the error bars apart.
                xs = [k * 1.04 ** (i - len(methods) / 2) for k, _ in points]
                ax.errorbar(xs, [p[1][0] for p in points], yerr=[p[1][1] for p in points], marker="o", capsize=3,
                            label=label(m), linestyle="--" if m in ("zeroshot", "local") else "-")
        finish_axes(ax, args.shots, "images per class per client (shots)",
                    f"{DATASETS[dataset]['title']}: weighted client accuracy, mean ± std over seeds")
        paths.append(save(fig, args.out / f"shots_{dataset}.png"))
    for dataset, shots in args.rank_cells:
        ranks = sorted(set(args.ranks) | {int(res.main_rank)})
        points = [(r, list(res.values("acc_weighted", dataset, shots, "fedlrm", str(r)).values())) for r in ranks]
        points = [(r, mean_std([x * 100 for x in v])) for r, v in points if v]
        if points:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.errorbar([r for r, _ in points], [p[0] for _, p in points], yerr=[p[1] for _, p in points],
                        marker="o", capsize=3, label="fedlrm, this grid")
            if dataset == "caltech101":
                # On another scale (ViT-B/16 reaches ~91%), so as text rather than points on these axes.
                ax.text(0.02, 0.02, "paper (ViT-B/16, 224 px): " + ", ".join(
                    f"r={r}: {v:.2f}%" for r, v in PAPER_RANK.items()), transform=ax.transAxes, fontsize=8)
            finish_axes(ax, ranks, "global LoRA rank r (personal rank fixed)",
                        f"{DATASETS[dataset]['title']} {shots}-shot: FedLRM vs global rank")
            paths.append(save(fig, args.out / f"rank_{dataset}.png"))
    return paths


def finish_axes(ax, ticks: list[int], xlabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)  # room for the offsets; sane with a single tick
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def fedlrm_version() -> dict:
    import torch

    import fedlrm

    src = Path(fedlrm.__file__).resolve().parent
    info = {"fedlrm_file": str(fedlrm.__file__), "torch": torch.__version__}
    try:
        git = ["git", "-C", str(src)]
        info["fedlrm_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                               check=True).stdout.strip()
        info["fedlrm_dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True,
                                                   text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def command_line() -> str:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "FEDLRM_SRC") if os.environ.get(k))
    argv = " ".join(shlex.quote(a) for a in ["python", rel(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    return f"{env} {argv}".strip()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = parse_args(argv)
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        log.info("report: %s", write_report(args))
        return 0
    version = fedlrm_version()
    log.info("fedlrm from %s (commit %s%s)", version["fedlrm_file"], version.get("fedlrm_commit", "?"),
             ", with local changes" if version.get("fedlrm_dirty") else "")
    for d in args.datasets:
        for f in DATASETS[d]["files"]:
            if not (args.datasets_dir / f).is_file():
                raise SystemExit(f"{args.datasets_dir / f} does not exist; give the directory with --datasets-dir")
    groups = plan(args)
    todo = pending(groups, done_keys(args.out), args.workers)
    n_todo, n_all = sum(len(g.runs) for g in todo), sum(len(g.runs) for g in groups)
    first_eta = sum(estimate(g, r) for g in todo for r in g.runs) / args.workers
    log.info("%d of %d runs to do in %d job groups on %d workers%s", n_todo, n_all, len(todo), args.workers,
             "" if args.paper else f"; rough estimate {clock(first_eta)} (fitted to a 2-core CPU)")
    if args.dry_run:
        for g in todo:
            log.info("  %s %d-shot seed %d: %d runs, ~%s", g.dataset, g.shots, g.seed, len(g.runs),
                     clock(sum(estimate(g, r) for r in g.runs)))
        return 0
    from fedlrm.algorithms import ALGORITHMS
    meta = {"command": command_line(), "started": now(), **version, "settings": {k: str(v) for k, v in vars(args).items()},
            "algorithms": ",".join(split(args.algorithms) or list(ALGORITHMS))}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    failed = run_grid(args, todo) if todo else 0
    log.info("report: %s", write_report(args))
    log.info("done: %d runs failed", failed) if failed else log.info("done")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
