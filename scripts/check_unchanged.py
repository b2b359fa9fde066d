"""Every algorithm on the built-in default, on a short schedule, against results recorded
before a change that must not move them (a refactor): the same per-client accuracies to
the last digit, and the same evaluation losses.

    python scripts/check_unchanged.py --record   # before the change: write scripts/recorded_results.json
    python scripts/check_unchanged.py            # after it: compare, exit 1 on any difference

Floating-point results depend on the CPU's kernels (AVX-512 against AMX, say) and the thread
count, so compare on the machine that recorded; the file names it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "recorded_results.json"
ALGORITHMS = ("zeroshot", "local", "fedavg", "fedprox", "apfl", "fedlrm", "fedlease", "fedpia", "f3ocus")
# The built-in default (model, data, 10 clients, adapters, optimiser) with a short schedule:
# two rounds of one local epoch, FedLEASE clustering after the first.
SCHEDULE = ["train.rounds=2", "train.local_epochs=1", "fedlease.warmup_rounds=1", "train.threads=2"]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def run_all(out_dir: Path) -> dict:
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import run_experiment

    results = {}
    for algorithm in ALGORITHMS:
        t0 = time.perf_counter()
        cfg = load_config(None, [f"algorithm={algorithm}", f"output_dir={out_dir}", f"name={algorithm}", *SCHEDULE])
        result = run_experiment(cfg, progress=False)
        last = max(row["round"] for row in result.client_rows)
        results[algorithm] = {str(row["client"]): {"accuracy": row["accuracy"], "loss": row["loss"]}
                              for row in result.client_rows if row["round"] == last}
        print(f"{algorithm}: {result.summary['acc_weighted']:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return results


def differences(before: dict, after: dict) -> list[str]:
    found = []
    for algorithm in ALGORITHMS:
        b, a = before[algorithm], after[algorithm]
        if a.keys() != b.keys():
            found.append(f"{algorithm}: clients {sorted(b)} before, {sorted(a)} after")
            continue
        for client in b:
            for key in ("accuracy", "loss"):
                if a[client][key] != b[client][key]:
                    found.append(f"{algorithm} client {client} {key}: {b[client][key]!r} before, {a[client][key]!r} after")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the recorded results anew")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp))
    if args.record:
        RECORDED.write_text(json.dumps({"schedule": SCHEDULE, "machine": machine(), "results": results}, indent=1)
                            + "\n")
        print(f"wrote {RECORDED}")
        return 0
    recorded = json.loads(RECORDED.read_text())
    if recorded["schedule"] != SCHEDULE:
        print(f"the schedule changed since recording: {recorded['schedule']} then, {SCHEDULE} now")
        return 1
    if recorded["machine"] != machine():
        print(f"note: recorded on {recorded['machine']}, compared on {machine()}")
    found = differences(recorded["results"], results)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) in {sum(len(r) for r in results.values())} client results of "
          f"{len(ALGORITHMS)} algorithms")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
