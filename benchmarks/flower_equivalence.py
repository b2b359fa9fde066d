"""Every algorithm on Flower against the in-process runner: same config and seed, same accuracies?

One local deployment (a SuperLink and one SuperNode per client on 127.0.0.1) runs each
algorithm in turn; each is also run in-process. Prints and writes, per algorithm, the
largest per-client accuracy difference, the global accuracies, whether anything but
shared tensors crossed, and the wall time of both.

    python benchmarks/flower_equivalence.py                      # 3 clients, 2 rounds, 1 local epoch
    python benchmarks/flower_equivalence.py train.rounds=3 --algorithms fedlrm,fedlease
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedlrm.algorithms import ALGORITHMS, load_config
from fedlrm.experiment import run_experiment
from fedlrm.federation.flower import app_source
from fedlrm.tools.deployment import LocalDeployment

APP = app_source()  # the Flower app folder shipped in the package
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = ["data.num_clients=3", "train.rounds=2", "train.local_epochs=1", "fedlease.warmup_rounds=1"]


def gate_or_local_keys_crossed(run_dir: Path) -> list[str]:
    """Local-expert, gate and router tensors in any message. Only FedLEASE's warm-up sends
    a local LoRA, by design (the server clusters those); for every other method this must
    be empty."""
    crossed = set()
    for line in (run_dir / "messages.jsonl").read_text().splitlines():
        crossed |= set(json.loads(line).get("tensors", {}))
    return sorted(k for k in crossed if ".experts.local." in k or ".mixer." in k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="fedlrm config overrides (key=value)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", default=str(RESULTS / "flower_equivalence"), help="results file stem")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedlrm-flower-equivalence-"))
    base = [*DEFAULTS, *args.overrides, f"output_dir={work / 'runs'}"]
    n = load_config(None, base).data.num_clients
    rows = []
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / f"node{i}")} for i in range(n)]
    with LocalDeployment(work / "flower", n, nodes) as dep:
        for algorithm in args.algorithms.split(","):
            overrides = base + [f"algorithm={algorithm}"]
            t0 = time.perf_counter()
            run = dep.run(APP, {"overrides": " ".join(overrides + [f"name=flower-{algorithm}"]),
                                "node-wait-timeout": 300.0}, timeout=3600, poll=5.0)
            flower_s = time.perf_counter() - t0
            if not run.ok:
                rows.append({"algorithm": algorithm, "status": run.status, "error": run.logs[-1500:]})
                print(f"{algorithm}: Flower run {run.status}", flush=True)
                continue
            flower = json.loads((work / "runs" / f"flower-{algorithm}" / "summary.json").read_text())
            t0 = time.perf_counter()
            local = run_experiment(load_config(None, overrides + [f"name=local-{algorithm}"]), progress=False).summary
            local_s = time.perf_counter() - t0
            diff = max(abs(flower["per_client_accuracy"][str(c)] - a) for c, a in local["per_client_accuracy"].items())
            rows.append({"algorithm": algorithm, "status": run.status, "max_client_acc_diff": diff,
                         "acc_weighted_flower": flower["acc_weighted"], "acc_weighted_in_process": local["acc_weighted"],
                         "global_flower": flower.get("global_accuracy"), "global_in_process": local.get("global_accuracy"),
                         "local_or_gate_keys_crossed": gate_or_local_keys_crossed(
                             work / "runs" / f"flower-{algorithm}"),
                         "flower_s": flower_s, "in_process_s": local_s})
            print(f"{algorithm}: max per-client accuracy difference {diff:.2g}", flush=True)

    lines = [f"# Flower against in-process, {' '.join(base[:-1])}", "",
             "| algorithm | Flower status | max per-client acc diff | weighted acc Flower / in-process | "
             "global acc Flower / in-process | local-expert/gate tensors crossed | Flower s | in-process s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['status']} | - | - | - | - | - | - |")
            continue
        g = "-" if r["global_flower"] is None else f"{r['global_flower']:.4f} / {r['global_in_process']:.4f}"
        lines.append(f"| {r['algorithm']} | {r['status']} | {r['max_client_acc_diff']:.2g} | "
                     f"{r['acc_weighted_flower']:.4f} / {r['acc_weighted_in_process']:.4f} | {g} | "
                     f"{len(r['local_or_gate_keys_crossed'])} | {r['flower_s']:.0f} | {r['in_process_s']:.0f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
