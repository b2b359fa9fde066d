"""One short check of the CUDA path: the paper's ViT-B/16 configuration on a GPU, in bf16.

The paper's CIFAR-10 setting (`paper/cifar10`: CLIP ViT-B/16 at 224 px, rank-16 LoRA on q/v,
FedLRM, 10 clients, 16 shots) with random weights from a locally saved config (no hub), for
2 rounds of 1 local epoch on `--device` (cuda) with bf16 autocast. Prints and writes (to
$OUT, or benchmarks/results) the training images per second, the round times, peak GPU memory
and the accuracies, so that what the CUDA path breaks shows in one run.

    python benchmarks/gpu_check.py                        # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --smoke   # the same flow on CPU: 2 blocks, 2 clients
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cost import make_model_dir
from benchmarks.harness import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def datasets_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("FEDLRM_DATASETS", here.parent / "shared" / "datasets"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--smoke", action="store_true", help="2 encoder blocks, 2 clients, 2 shots (a CPU dry run)")
    args = parser.parse_args()
    import torch

    from fedlrm.algorithms import load_config
    from fedlrm.experiment import run_experiment

    work = Path(tempfile.mkdtemp(prefix="fedlrm-gpu-check-"))
    layers = 2 if args.smoke else 12
    model_dir = make_model_dir({"dir": str(work / "vit-b16"), "patch": 16, "layers": layers,
                                "text_layers": 1 if args.smoke else 12})["dir"]
    data = datasets_dir()
    overrides = [f"model.name={model_dir}", f"data.train={data / 'cifar10-train.parquet'}",
                 f"data.test={data / 'cifar10-test.parquet'}", "train.rounds=2", "train.local_epochs=1",
                 f"train.device={args.device}", f"train.precision={args.precision}", "data.test_per_client=200",
                 "data.global_test_size=1000", f"output_dir={work / 'runs'}", "name=gpu-check"]
    if args.smoke:
        overrides += ["data.num_clients=2", "data.shots=2", "data.test_per_client=16", "data.global_test_size=32"]
    os.environ.setdefault("FEDLRM_DATASETS", str(data))
    cfg = load_config("paper/cifar10", overrides)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_experiment(cfg, progress=False)
    total = time.perf_counter() - t0
    trained = sum(row["n_train"] for row in result.client_rows if row["sampled"] and row["round"] == 2)
    train_seconds = [row["train_seconds"] for row in result.round_rows]
    report = {
        "device": args.device, "precision": args.precision, "smoke": args.smoke, "encoder_blocks": layers,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "round_wall_s": [row["wall_seconds"] for row in result.round_rows], "round_train_s": train_seconds,
        "train_images_per_s_round2": trained * cfg.train.local_epochs / train_seconds[-1] if train_seconds else None,
        "total_s": total, "acc_weighted": result.summary.get("acc_weighted"),
        "global_accuracy": result.summary.get("global_accuracy"), "machine": machine_info(torch.get_num_threads()),
    }
    print(json.dumps(report, indent=1))
    out = Path(os.environ.get("OUT") or (work if args.smoke else RESULTS)) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
