"""Start-up and per-round overhead of the Flower runtime against the in-process runner.

Runs the same config and seed (by default the built-in default: FedLRM, 10 clients,
20 rounds) once in-process and once on a local Flower deployment (a SuperLink and one
SuperNode per client on 127.0.0.1), in one invocation on one machine, then prints and
writes the timings and checks that the per-client accuracies agree.

    python benchmarks/flower_overhead.py                       # the built-in default
    python benchmarks/flower_overhead.py train.rounds=2        # any fedlrm overrides
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from fedlrm.algorithms import load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.flower import app_source
from fedlrm.tools.deployment import LocalDeployment

APP = app_source()  # the Flower app folder shipped in the package
RESULTS = Path(__file__).resolve().parent / "results"


def round_walls(run_dir: Path) -> list[float]:
    with (run_dir / "rounds.csv").open() as f:
        return [float(row["wall_seconds"]) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="fedlrm config overrides (key=value)")
    parser.add_argument("--out", default=str(RESULTS / "flower_overhead"), help="results file stem")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedlrm-flower-overhead-"))
    overrides = [*args.overrides, f"output_dir={work / 'runs'}"]
    cfg = load_config(None, overrides)
    n = cfg.data.num_clients

    t0 = time.perf_counter()
    local = run_experiment(load_config(None, overrides + ["name=in-process"]), progress=False)
    local_total = time.perf_counter() - t0
    local_rounds = round_walls(work / "runs" / "in-process")

    t0 = time.perf_counter()
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / f"node{i}")} for i in range(n)]
    with LocalDeployment(work / "flower", n, nodes) as dep:
        deploy_start = time.perf_counter() - t0
        result = dep.run(APP, {"overrides": " ".join(overrides + ["name=flower"]), "node-wait-timeout": 300.0},
                         timeout=4 * 3600, poll=5.0)
        if not result.ok:
            raise SystemExit(f"the Flower run failed ({result.status}): {result.logs[-3000:]}")
    flower_rounds = round_walls(work / "runs" / "flower")
    flower = json.loads((work / "runs" / "flower" / "summary.json").read_text())
    differences = [abs(flower["per_client_accuracy"][str(c)] - a) for c, a in local.summary["per_client_accuracy"].items()]

    report = {
        "config": " ".join(args.overrides) or "built-in default",
        "algorithm": cfg.algorithm, "clients": n, "rounds": len(local_rounds),
        "in_process": {"total_s": local_total, "rounds_s": sum(local_rounds),
                       "startup_s": local_total - sum(local_rounds),
                       "mean_round_s": sum(local_rounds) / len(local_rounds)},
        "flower": {"deployment_start_s": deploy_start, "run_s": result.elapsed_s, "rounds_s": sum(flower_rounds),
                   "run_startup_s": result.elapsed_s - sum(flower_rounds),
                   "mean_round_s": sum(flower_rounds) / len(flower_rounds)},
        "max_per_client_accuracy_difference": max(differences),
        "acc_weighted": {"in_process": local.summary["acc_weighted"], "flower": flower["acc_weighted"]},
    }
    f, p = report["flower"], report["in_process"]
    report["per_round_overhead_s"] = f["mean_round_s"] - p["mean_round_s"]
    report["startup_overhead_s"] = f["deployment_start_s"] + f["run_startup_s"] - p["startup_s"]
    lines = [
        f"# Flower runtime against in-process: {report['config']} ({cfg.algorithm}, {n} clients, "
        f"{report['rounds']} rounds)", "",
        "| | in-process | Flower (SuperLink + SuperNodes on 127.0.0.1) |", "| --- | --- | --- |",
        f"| start-up (s) | {p['startup_s']:.1f} | {f['deployment_start_s']:.1f} deployment + "
        f"{f['run_startup_s']:.1f} run |",
        f"| mean round (s) | {p['mean_round_s']:.1f} | {f['mean_round_s']:.1f} |",
        f"| total (s) | {p['total_s']:.1f} | {f['deployment_start_s'] + f['run_s']:.1f} |",
        f"| weighted client accuracy | {report['acc_weighted']['in_process']:.4f} | "
        f"{report['acc_weighted']['flower']:.4f} |", "",
        f"Per-round overhead: {report['per_round_overhead_s']:.1f} s; start-up overhead: "
        f"{report['startup_overhead_s']:.1f} s; largest per-client accuracy difference: "
        f"{report['max_per_client_accuracy_difference']:.2g}.",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
