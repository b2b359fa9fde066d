"""Start-up and per-round cost of Flower's two runtimes against the in-process runner.

Runs the same config and seed (by default the built-in default: FedLRM, 10 clients, 20
rounds; `train.rounds=3` keeps it short) in one invocation on one machine: in-process;
on Flower's Simulation Runtime (a SuperLink in simulation mode, virtual SuperNodes on Ray
actors of `--client-cpus` CPUs each); on Flower's deployment runtime (a SuperLink and one
SuperNode per client on 127.0.0.1). Round 1 (which builds models and preprocesses data)
is reported apart from the later rounds; the targets compare later rounds: deployment at
most 3 times and simulation at most 1.5 times an in-process round. It also checks that the
per-client accuracies agree.

    python benchmarks/flower_overhead.py train.rounds=3                 # both runtimes
    python benchmarks/flower_overhead.py --runtimes simulation train.rounds=3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from fedlrm.algorithms import load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.flower import app_source
from fedlrm.tools.deployment import LocalDeployment

APP = app_source()  # the Flower app folder shipped in the package
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"simulation": 1.5, "deployment": 3.0, "deployment-no-worker": 3.0}


def round_walls(run_dir: Path) -> list[float]:
    with (run_dir / "rounds.csv").open() as f:
        return [float(row["wall_seconds"]) for row in csv.DictReader(f)]


def timing(rounds: list[float], startup: float, total: float) -> dict:
    later, middle = rounds[1:], rounds[1:-1]  # the last round also evaluates every client on its own
    return {"startup_s": startup, "round1_s": rounds[0], "later_mean_s": sum(later) / len(later) if later else None,
            "middle_mean_s": sum(middle) / len(middle) if middle else None, "rounds_s": rounds, "total_s": total}


def on_flower(runtime: str, work: Path, overrides: list[str], n: int, client_cpus: int) -> tuple[dict, dict]:
    """`runtime`: simulation, deployment, or deployment-no-worker (each ClientApp process does its
    client's work itself, node config worker=false)."""
    name = f"flower-{runtime}"
    run_config = {"overrides": " ".join(overrides + [f"name={name}"]), "node-wait-timeout": 300.0}
    t0 = time.perf_counter()
    if runtime == "simulation":
        run_config["client-state-dir"] = str(work / "sim-clients")
        dep = LocalDeployment(work / runtime, n, simulation={"client-resources-num-cpus": client_cpus,
                                                             "client-resources-num-gpus": 0.0})
    else:
        nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / runtime / f"node{i}"),
                  "worker": runtime == "deployment"} for i in range(n)]
        # the SuperLink's state in memory: with its SQLite file, 10 replies at once on 2 cores timed
        # out the file's lock and two replies were lost (the round then waits out its timeout)
        dep = LocalDeployment(work / runtime, n, nodes, database=False)
    with dep:
        started = time.perf_counter() - t0
        result = dep.run(APP, run_config, timeout=4 * 3600, poll=2.0)
        if not result.ok:
            raise SystemExit(f"the {runtime} run failed ({result.status}): {result.logs[-3000:]}")
    total = time.perf_counter() - t0
    rounds = round_walls(work / "runs" / name)
    summary = json.loads((work / "runs" / name / "summary.json").read_text())
    return timing(rounds, started + result.elapsed_s - sum(rounds), total), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="fedlrm config overrides (key=value)")
    parser.add_argument("--runtimes", nargs="+", choices=("simulation", "deployment", "deployment-no-worker"),
                        default=["simulation", "deployment", "deployment-no-worker"])
    parser.add_argument("--client-cpus", type=int, default=1, help="Simulation Runtime: CPUs per ClientApp actor")
    parser.add_argument("--out", default=str(RESULTS / "flower_overhead"), help="results file stem")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedlrm-flower-overhead-"))
    overrides = [*args.overrides, f"output_dir={work / 'runs'}"]
    cfg = load_config(None, overrides)
    n = cfg.data.num_clients

    t0 = time.perf_counter()
    local = run_experiment(load_config(None, overrides + ["name=in-process"]), progress=False)
    total = time.perf_counter() - t0
    rounds = round_walls(work / "runs" / "in-process")
    results = {"in-process": timing(rounds, total - sum(rounds), total)}
    accuracy = {"in-process": local.summary}
    for runtime in args.runtimes:
        results[runtime], accuracy[runtime] = on_flower(runtime, work, overrides, n, args.client_cpus)

    base = results["in-process"]
    lines = [f"# Flower's runtimes against in-process: {' '.join(args.overrides) or 'built-in default'} "
             f"({cfg.algorithm}, {n} clients, {len(rounds)} rounds; {os.cpu_count()} CPUs)", "",
             "| runtime | start-up s | round 1 s | later rounds, mean s | later rounds / in-process | target | met | "
             "rounds 2..R-1, mean s | rounds 2..R-1 / in-process | total s | weighted accuracy | "
             "largest per-client difference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for runtime, t in results.items():
        ratio = t["later_mean_s"] / base["later_mean_s"] if t["later_mean_s"] and base["later_mean_s"] else None
        t["later_ratio"] = ratio
        target = TARGETS.get(runtime)
        diff = max(abs(float(accuracy[runtime]["per_client_accuracy"][str(c)] if str(c) in
                                 accuracy[runtime]["per_client_accuracy"] else
                                 accuracy[runtime]["per_client_accuracy"][c]) - a)
                   for c, a in local.summary["per_client_accuracy"].items())
        t["max_per_client_accuracy_difference"] = diff
        middle = t["middle_mean_s"] / base["middle_mean_s"] if t["middle_mean_s"] and base["middle_mean_s"] else None
        t["middle_ratio"] = middle
        lines.append(f"| {runtime} | {t['startup_s']:.1f} | {t['round1_s']:.1f} | "
                     f"{t['later_mean_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'-' if target is None else f'<= {target}'} | "
                     f"{'-' if target is None or ratio is None else ('yes' if ratio <= target else 'no')} | "
                     f"{'-' if t['middle_mean_s'] is None else format(t['middle_mean_s'], '.1f')} | "
                     f"{'-' if middle is None else f'{middle:.2f}'} | "
                     f"{t['total_s']:.1f} | {accuracy[runtime]['acc_weighted']:.4f} | {diff:.2g} |")
    if args.runtimes:
        lines += ["", f"Simulation Runtime: ClientApp actors of {args.client_cpus} CPU each. Deployment: one "
                      f"SuperNode per client, one flwr-clientapp process per message (a round's evaluation travels "
                      f"with the next round's training), one torch thread each; the ClientApp hands its work to its "
                      f"SuperNode's long-lived worker, or, in deployment-no-worker, does it itself. The last round "
                      f"also evaluates every client on its own, so 'rounds 2..R-1' leaves it out."]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": args.overrides, "clients": n, "runtimes": results},
                                                   indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
