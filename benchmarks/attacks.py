"""What attacking clients do to a federation, against each of the server's defences.

For fedavg and fedlrm on the built-in default data (10 clients, shorter runs), with 1 and
with 3 of the 10 clients attacking, every attack of `fedlrm.federation.attacks` (inflated
example counts, the takeover, sign flips and noise scaled just under the outlier bound,
colluding zero uploads, label-flipped local data) meets every defence:

  none       no check beyond the upload's form and that it is a change (claims trusted, no outlier test)
  counts     claims bounded by the client's data, a client's share of a round capped at 0.2
  outlier    the norm outlier test (federation.max_norm_ratio=10, upper-median reference)
  clip       server-side norm clipping at the honest run's median update norm
  median     coordinate-wise median            trimmed  trimmed mean, 30 % cut at each end
  krum       Krum (f=3)                        multikrum  multi-Krum (f=3, keeps 7)

(fedlrm's defaults are `counts` without the share cap plus `outlier`.)

Each cell is the final mean accuracy of the honest clients (attackers excluded) and the
global model's accuracy on the whole test split, beside the honest run with the same
defence. Accuracy does not depend on the machine's load, so runs go two at a time (each
on one thread).

    python benchmarks/attacks.py              # the whole grid (27 min on 2 cores)
    python benchmarks/attacks.py --quick      # 2 rounds, 1 attack, 3 defences: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import CHILD_ENV, Report, child_main, fmt, machine_info

RESULTS = Path(__file__).resolve().parent / "results"
BASE = ["train.rounds=5", "train.local_epochs=1", "train.eval_every=5", "data.global_test_size=1000",
        "data.test_per_client=100", "train.threads=1"]
# Everything off, so each defence below is measured alone.
NONE = ["federation.bound_examples=false", "federation.max_norm_ratio=null"]
DEFENCES = {
    "none": NONE,
    "counts": ["federation.max_norm_ratio=null", "federation.max_weight_share=0.2"],
    "outlier": ["federation.bound_examples=false"],
    "clip": NONE + ["federation.clip_update_norm={clip}"],
    "median": NONE + ["federation.aggregator=median"],
    "trimmed": NONE + ["federation.aggregator=trimmed_mean", "federation.trim_fraction=0.3"],
    "krum": NONE + ["federation.aggregator=krum", "federation.byzantine=3"],
    "multikrum": NONE + ["federation.aggregator=multikrum", "federation.byzantine=3"],
}
ALGORITHMS = ("fedavg", "fedlrm")
ATTACKERS = (1, 3)


def honest_mean(accuracy: dict[int, float], attackers) -> float:
    """Mean final accuracy of the clients that do not attack (the same clients in every row)."""
    return statistics.mean(a for c, a in accuracy.items() if c not in attackers)


def grid(spec: dict) -> dict:
    """In a child: every (attack, defence) cell of one algorithm and one number of attackers."""
    import torch

    from fedlrm.algorithms import load_config
    from fedlrm.federation.attacks import AttackingTransport, flip_labels
    from fedlrm.federation.simulation import InProcessTransport, Simulation

    torch.set_num_threads(1)
    attackers = list(range(spec["attackers"]))
    data, cells = None, []
    for attack, defence in spec["cells"]:
        overrides = [o.format(clip=spec.get("clip")) for o in DEFENCES[defence]]
        cfg = load_config(None, [*spec["base"], f"algorithm={spec['algorithm']}", *overrides])
        sim = Simulation(cfg, data=data, progress=False)
        data = sim.data
        transport = InProcessTransport(sim.clients)
        if attack != "honest":
            if attack == "labelflip":
                flip_labels(sim.clients, attackers, len(data.class_names))
            transport = AttackingTransport(transport, attackers, attack, seed=cfg.seed)
        result = sim.server.run(transport)
        final = result.round_rows[-1]["round"]
        accuracy = {row["client"]: row["accuracy"] for row in result.client_rows if row["round"] == final}
        norms = [row["update_norm_median"] for row in result.round_rows if row.get("update_norm_median")]
        cells.append({"attack": attack, "defence": defence, "client_accuracy": accuracy,
                      "honest_client_accuracy": honest_mean(accuracy, attackers),
                      "global_accuracy": result.summary["global_accuracy"],
                      "rejected": result.summary["rejected_updates"],
                      "clipped": sum(row.get("clients_clipped", 0) for row in result.round_rows),
                      "median_update_norm": statistics.median(norms) if norms else None})
        print(f"{spec['algorithm']} {len(attackers)} attacker(s) {attack:9s} vs {defence:9s}: "
              f"honest clients {cells[-1]['honest_client_accuracy']:.4f}, global {cells[-1]['global_accuracy']:.4f}, "
              f"rejected {cells[-1]['rejected']}", file=sys.stderr, flush=True)
    return {"cells": cells}


def run_child(spec: dict) -> dict:
    """One grid in a process of its own; its line per cell goes straight to this stderr."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, **CHILD_ENV}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the grid {spec['algorithm']} with {spec['attackers']} attacker(s) failed "
                         f"(exit {proc.returncode}); its traceback is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 rounds, one attack, three defences")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time (default 2)")
    parser.add_argument("--out", default=str(RESULTS / "attacks"), help="results file stem")
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, {"grid": grid})
    from fedlrm.federation.attacks import ATTACKS

    base, attacks, defences = list(BASE), list(ATTACKS), list(DEFENCES)
    if args.quick:
        base[0], attacks, defences = "train.rounds=2", ["takeover"], ["none", "counts", "median"]
    pool = ThreadPoolExecutor(args.jobs)
    # The honest runs first: the clip bound is the honest run's median update norm.
    honest = dict(zip(ALGORITHMS, pool.map(lambda a: run_child(
        {"kind": "grid", "algorithm": a, "attackers": 0, "base": base, "clip": None,
         "cells": [["honest", d] for d in defences if d != "clip"]}), ALGORITHMS)))
    clip = {a: next(c["median_update_norm"] for c in honest[a]["cells"] if c["defence"] == "none")
            for a in ALGORITHMS}
    if "clip" in defences:
        for a in ALGORITHMS:
            honest[a]["cells"] += run_child({"kind": "grid", "algorithm": a, "attackers": 0, "base": base,
                                             "clip": clip[a], "cells": [["honest", "clip"]]})["cells"]
    jobs = [(a, k) for a in ALGORITHMS for k in ATTACKERS]
    attacked = dict(zip(jobs, pool.map(lambda job: run_child(
        {"kind": "grid", "algorithm": job[0], "attackers": job[1], "base": base, "clip": clip[job[0]],
         "cells": [[x, d] for x in attacks for d in defences]}), jobs)))
    pool.shutdown()

    report = Report()
    report.heading("What attackers do, against each defence")
    report.text(f"`python benchmarks/attacks.py{' --quick' if args.quick else ''}`: built-in default data and "
                f"model, 10 clients, {' '.join(base)}; attackers are clients 0 (1 attacker) or 0-2 (3). A cell "
                f"is the final mean accuracy of the clients that do not attack (clients 1-9, or 3-9) / the global "
                f"model's accuracy, in %; the first row is the honest run with the same defence, over the same "
                f"clients. Clip bounds (the honest run's median "
                f"update norm): " + ", ".join(f"{a} {clip[a]:.3g}" for a in ALGORITHMS) + ".")
    table = {}
    for a in ALGORITHMS:
        for k in ATTACKERS:
            # the honest run's mean over the same clients as the attacked rows: those that do not attack
            baseline = [{**c, "honest_client_accuracy": honest_mean({int(i): x for i, x in c["client_accuracy"].items()},
                                                                    range(k))} for c in honest[a]["cells"]]
            cells = {(c["attack"], c["defence"]): c for c in baseline + attacked[(a, k)]["cells"]}
            rows = []
            for x in ["honest", *attacks]:
                rows.append([x] + [f"{fmt(100 * cells[(x, d)]['honest_client_accuracy'])} / "
                                   f"{fmt(100 * cells[(x, d)]['global_accuracy'])}" for d in defences])
            drops = []
            for d in defences:
                worst = max(attacks, key=lambda x: cells[("honest", d)]["honest_client_accuracy"]
                            - cells[(x, d)]["honest_client_accuracy"])
                drops.append(f"{fmt(100 * (cells[('honest', d)]['honest_client_accuracy'] - cells[(worst, d)]['honest_client_accuracy']))} ({worst})")
            rows.append(["worst drop, points (attack)"] + drops)
            report.heading(f"{a}, {k} of 10 clients attacking")
            report.table(["attack"] + defences, rows)
            table[f"{a}/{k}"] = [cells[key] for key in sorted(cells)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine_info(1), "base": base, "clip": clip,
                                                    "defences": {d: DEFENCES[d] for d in defences},
                                                    "results": table}, indent=2))
    out.with_suffix(".md").write_text("\n".join(report.md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
