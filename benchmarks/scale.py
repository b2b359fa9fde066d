"""What a round costs as the federation grows: N = 10, 100 and 1000 clients, 10 of them a round.

FedLRM in-process on the whole CIFAR-10 train split (../shared/datasets, or FEDLRM_DATASETS),
split among N clients (2 shards each, 16 shots per class), 10 clients trained and 10 evaluated
per round (train.client_fraction = train.eval_fraction = 10/N), 1 local epoch, every client
evaluated in the last round. Each N runs in a process of its own, so each peak RSS is its own.

Reported per N: start-up (data read, split and checked; model built), the mean round before the
last (training, the sampled evaluation, the checkpoint), the last round's training and its full
evaluation apart, peak RSS, what the checkpoints hold on disk and what the last one wrote, and
the export of the trained clients' models. Targets, measured in one invocation: the mean round
before the last at N = 1000 at most 1.3 times that at N = 10, and peak RSS at N = 1000 at most
1.3 times that at N = 10.

    python benchmarks/scale.py                 # N = 10, 100, 1000; 4 rounds
    python benchmarks/scale.py --n 10 100 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Children, CpuWatch, Report, child_main, fmt, machine_info, peak_kib, rss_kib

RESULTS = Path(__file__).resolve().parent / "results"
PER_ROUND = 10
TARGET = 1.3


def datasets_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("FEDLRM_DATASETS", here.parent / "shared" / "datasets"))


def overrides(n: int, rounds: int, out: Path) -> list[str]:
    data = datasets_dir()
    fraction = min(1.0, PER_ROUND / n)
    return ["algorithm=fedlrm", "data.source=parquet", f"data.train={data / 'cifar10-train.parquet'}",
            f"data.test={data / 'cifar10-test.parquet'}", f"data.num_clients={n}", f"train.rounds={rounds}",
            "train.local_epochs=1", f"train.client_fraction={fraction}", f"train.eval_fraction={fraction}",
            "report.export_adapters=trained", f"output_dir={out}", f"name=n{n}"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measure(spec: dict) -> dict:
    """In a child: one run of N clients."""
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import finish
    from fedlrm.federation.rundir import new_run_dir, write_config
    from fedlrm.federation.simulation import Simulation

    out = Path(spec["out"])
    cfg = load_config(None, overrides(spec["n"], spec["rounds"], out))
    t0 = time.perf_counter()
    sim = Simulation(cfg, progress=False)
    startup = time.perf_counter() - t0
    rss_after_startup = rss_kib()
    run_dir = new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    result = sim.run(run_dir)
    t1 = time.perf_counter()
    finish(sim, result, run_dir)
    export = time.perf_counter() - t1
    with (run_dir / "rounds.csv").open() as f:
        rounds = [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]
    last = max(int(r["round"]) for r in rounds)
    states = run_dir / "client_states"
    return {
        "n": spec["n"], "startup_s": startup, "rss_after_startup_gib": rss_after_startup / 2 ** 20,
        "peak_rss_gib": peak_kib() / 2 ** 20,
        "round_wall_s": [r["wall_seconds"] for r in rounds],
        "round_train_s": [r["train_seconds"] for r in rounds],
        "last_round_eval_s": rounds[-1]["wall_seconds"] - rounds[-1]["train_seconds"],
        "acc_weighted": result.summary.get("acc_weighted"),
        "per_client_accuracy": result.summary["per_client_accuracy"],
        "checkpoint_bytes": folder_bytes(run_dir / "checkpoint"), "client_states_bytes": folder_bytes(states),
        "client_state_files": len(list(states.iterdir())) if states.is_dir() else 0,
        "last_checkpoint_wrote_states": len(list(states.glob(f"*-round{last}.safetensors"))),
        "exported": len(list((run_dir / "adapters").iterdir())) if (run_dir / "adapters").is_dir() else 0,
        "export_s": export, "export_bytes": folder_bytes(run_dir / "adapters"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000], help="numbers of clients")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the last evaluates every client)")
    parser.add_argument("--out", default=str(RESULTS / "scale"), help="results file stem")
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, {"scale": measure})
    work = Path(tempfile.mkdtemp(prefix="fedlrm-scale-"))
    children = Children(__file__)
    with CpuWatch() as watch:
        runs = [children.run({"kind": "scale", "n": n, "rounds": args.rounds, "out": str(work)}, f"N = {n}")
                for n in args.n]
    failed = [r for r in runs if "error" in r]
    if failed:
        raise SystemExit(f"a run failed: {failed[0]['error']}")

    report = Report()
    report.heading(f"FedLRM in-process, whole CIFAR-10 train split, {PER_ROUND} clients trained and "
                   f"{PER_ROUND} evaluated per round, {args.rounds} rounds x 1 local epoch")
    rows = []
    for r in runs:
        before = r["round_wall_s"][:-1]
        r["mean_round_before_last_s"] = sum(before) / len(before) if before else None
        rows.append([r["n"], fmt(r["startup_s"]), fmt(r["mean_round_before_last_s"], ".2f"),
                     " / ".join(fmt(x, ".2f") for x in before), fmt(r["round_train_s"][-1], ".2f"),
                     fmt(r["last_round_eval_s"], ".1f"), fmt(r["peak_rss_gib"], ".2f"),
                     fmt(r["rss_after_startup_gib"], ".2f"), f"{r['checkpoint_bytes'] / 1e6:.2f}",
                     f"{r['client_states_bytes'] / 1e6:.2f} ({r['client_state_files']} files)",
                     r["last_checkpoint_wrote_states"], f"{r['exported']} ({r['export_bytes'] / 1e6:.1f} MB, "
                                                         f"{r['export_s']:.1f} s)",
                     fmt(100 * r["acc_weighted"], ".2f")])
    report.table(["clients N", "start-up s", "mean round before last s", "rounds before last s",
                  "last round train s", "final full evaluation s", "peak RSS GiB", "RSS after start-up GiB",
                  "checkpoint/ MB", "client_states/ MB", "states the last checkpoint wrote",
                  "exported (trained clients)", "final acc %"], rows)
    small, large = runs[0], runs[-1]
    checks = [("mean round before the last", small["mean_round_before_last_s"], large["mean_round_before_last_s"]),
              ("peak RSS", small["peak_rss_gib"], large["peak_rss_gib"])]
    report.table([f"target (N = {large['n']} against N = {small['n']})", "ratio", "target", "met"],
                 [[what, fmt(b / a, ".2f"), f"<= {TARGET}", "yes" if b / a <= TARGET else "no"]
                  for what, a, b in checks])
    info = machine_info(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    report.text(f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}; other "
                f"processes used {100 * watch.others_share:.0f} % of its CPU during the {watch.seconds:.0f} s "
                f"of this benchmark.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "rounds": args.rounds, "runs": runs,
                                                    "others_cpu_share": watch.others_share}, indent=1))
    out.with_suffix(".md").write_text("\n".join(report.md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
