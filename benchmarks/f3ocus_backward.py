"""What training only some blocks saves: F3OCUS training-step time by selected blocks.

Frozen adapters below the lowest selected block need no backward pass. This times a
training step (forward, backward, AdamW step) of the built-in tiny CLIP at batch 32 with
F3OCUS's adapters, training the adapters of several block selections as F3OCUS's clients
do (the others frozen), and writes the figures to benchmarks/results/f3ocus_backward.json.

    python benchmarks/f3ocus_backward.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedlrm.adapters import adapter_parameters, block_index
from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.federation.task import build_model
from fedlrm.models import load_backbone


def train_only(model, mask: list[int]) -> None:
    """Adapters of the blocks `mask` marks train; the others are frozen."""
    chosen = {b for b, on in enumerate(mask) if on}
    for key, p in adapter_parameters(model).items():
        p.requires_grad_(block_index(key) in chosen)


def step_times(model, mask, images, labels, steps):
    train_only(model, mask)
    params = [p for p in adapter_parameters(model).values() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:  # warm-up steps are not counted
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config(None, ["algorithm=f3ocus"])
    bundle = build_model(load_backbone(cfg.model), [f"class {i}" for i in range(10)], cfg, get_algorithm(cfg))
    n_blocks = len({block_index(k) for k in adapter_parameters(bundle.model)})
    torch.manual_seed(0)
    images, labels = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    selections = {"all blocks": [1] * n_blocks,
                  "top half": [0] * (n_blocks - n_blocks // 2) + [1] * (n_blocks // 2),
                  "bottom half": [1] * (n_blocks - n_blocks // 2) + [0] * (n_blocks // 2),
                  "top block": [0] * (n_blocks - 1) + [1]}
    results = {}
    for name, mask in selections.items():
        seconds = step_times(bundle.model, mask, images, labels, args.steps)
        results[name] = {"mask": mask, "median_step_ms": 1000 * seconds}
    base = results["all blocks"]["median_step_ms"]
    print(f"built-in tiny CLIP, batch {args.batch}, median of {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'selection':<12} {'blocks':<10} {'step ms':>8} {'vs all':>7}")
    for name, r in results.items():
        r["ratio_to_all"] = r["median_step_ms"] / base
        print(f"{name:<12} {str(r['mask']):<10} {r['median_step_ms']:8.1f} {r['ratio_to_all']:7.2f}")
    out = Path(__file__).parent / "results" / "f3ocus_backward.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"batch": args.batch, "steps": args.steps, "threads": torch.get_num_threads(),
                               "results": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
