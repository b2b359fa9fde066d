"""What differential privacy and SecAgg+ cost against a plain round, measured in one run.

On one local Flower deployment (a SuperLink and one SuperNode per client on 127.0.0.1)
it runs the same config three times: plain, with client-side DP (clipping + Gaussian
noise), and with SecAgg+; then the plain and DP runs in-process. It prints and writes
the mean round time, the training phase of a round (from sending the training messages
to the new server state) and the accuracy of each.

    python benchmarks/privacy_cost.py                                  # fedavg, 3 clients, 3 rounds
    python benchmarks/privacy_cost.py algorithm=fedlrm train.rounds=5  # any fedlrm overrides
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
DEFAULTS = ["algorithm=fedavg", "data.num_clients=3", "train.rounds=3", "train.local_epochs=2"]
VARIANTS = {"plain": [], "dp": ["privacy.clip=0.1", "privacy.noise_multiplier=1.0"],
            "secagg": ["privacy.secagg=true"]}


def timings(run_dir: Path) -> dict:
    with (run_dir / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"mean_round_s": sum(float(r["wall_seconds"]) for r in rows) / len(rows),
            "mean_train_phase_s": sum(float(r["train_seconds"]) for r in rows) / len(rows),
            "acc_weighted": summary["acc_weighted"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="fedlrm config overrides (key=value)")
    parser.add_argument("--out", default=str(RESULTS / "privacy_cost"), help="results file stem")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedlrm-privacy-cost-"))
    base = [*DEFAULTS, *args.overrides, f"output_dir={work / 'runs'}"]
    cfg = load_config(None, base)
    n = cfg.data.num_clients
    results: dict[str, dict] = {}
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / f"node{i}")} for i in range(n)]
    with LocalDeployment(work / "flower", n, nodes) as dep:
        for name, extra in VARIANTS.items():
            t0 = time.perf_counter()
            run = dep.run(APP, {"overrides": " ".join(base + extra + [f"name=flower-{name}"]),
                                "node-wait-timeout": 300.0}, timeout=4 * 3600, poll=5.0)
            if not run.ok:
                raise SystemExit(f"the Flower {name} run failed ({run.status}): {run.logs[-3000:]}")
            results[f"flower {name}"] = {**timings(work / "runs" / f"flower-{name}"),
                                         "run_s": time.perf_counter() - t0}
    for name in ("plain", "dp"):
        t0 = time.perf_counter()
        run_experiment(load_config(None, base + VARIANTS[name] + [f"name=local-{name}"]), progress=False)
        results[f"in-process {name}"] = {**timings(work / "runs" / f"local-{name}"),
                                         "run_s": time.perf_counter() - t0}

    title = f"{cfg.algorithm}, {n} clients, {cfg.train.rounds} rounds, {cfg.train.local_epochs} local epochs"
    lines = [f"# Cost of DP and SecAgg+: {title}", "",
             "| runtime, variant | mean round (s) | training phase (s) | vs plain | weighted accuracy |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        plain = results[name.rsplit(" ", 1)[0] + " plain"]
        lines.append(f"| {name} | {r['mean_round_s']:.2f} | {r['mean_train_phase_s']:.2f} | "
                     f"{r['mean_round_s'] / plain['mean_round_s']:.2f}x | {r['acc_weighted']:.4f} |")
    lines += ["", f"DP: {' '.join(VARIANTS['dp'])}; SecAgg+: the settings privacy.secagg_* of `fedlrm config`."]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": base[:-1], "results": results}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
