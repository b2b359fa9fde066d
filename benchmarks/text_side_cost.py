"""What a text side that trains costs per training step, against the image-only step.

With only image-side adapters, the class text features are computed once and read from a cache;
when the text side trains (LoRA on the text encoder, `model.adapt_encoders=[image,text]`, or
CoOp prompt contexts: `promptfl`, `fedotp`, `pfedmoap`), every step runs the class prompts through the text encoder,
forward and backward. This times `train_step` (forward, backward, AdamW step) of the built-in
tiny CLIP at batch 32 over 10 classes for each setting, in one invocation, the settings
interleaved over several passes, and writes benchmarks/results/text_side_cost.{json,md}.

    python benchmarks/text_side_cost.py [--steps 20] [--passes 3] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedlrm.adapters import adapter_parameters
from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.federation.server import Server
from fedlrm.federation.task import build_model, initial_private, load_client, make_optimizer, train_step
from fedlrm.models import load_backbone

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SETTINGS = [  # (label, algorithm, overrides); the first of each algorithm is its image-only step
    ("fedavg, image LoRA", "fedavg", []),
    ("fedavg, image + text LoRA", "fedavg", ["model.adapt_encoders=[image,text]"]),
    ("fedlrm, image experts", "fedlrm", []),
    ("fedlrm, image + text experts", "fedlrm", ["model.adapt_encoders=[image,text]"]),
    ("promptfl, prompt context (4 vectors)", "promptfl", []),
    ("fedotp, two contexts, transport over 64 patches", "fedotp", []),
    ("fedotp, balanced transport", "fedotp", ["fedotp.transport=balanced"]),
    ("pfedmoap, own context + 3 experts, gate", "pfedmoap", []),
]


def prepare(algorithm_name: str, overrides: list[str], batch: int):
    cfg = load_config(None, [f"algorithm={algorithm_name}", *overrides])
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASSES, cfg, algorithm)
    state = Server(cfg, algorithm, bundle, cfg.data.num_clients, progress=False).initial_state()
    private = initial_private(bundle, algorithm, cfg, 0)
    ctx = load_client(bundle, algorithm, cfg, 0, private, algorithm.example_message(state, private, 0), 1)
    size = bundle.model.backbone.image_encoder.config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    params = [p for p in adapter_parameters(bundle.model).values() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    bundle.model.train()
    return cfg, algorithm, bundle, ctx, images, labels, optimizer, sum(p.numel() for p in params)


def time_steps(prepared, steps: int) -> list[float]:
    cfg, algorithm, bundle, ctx, images, labels, optimizer, _ = prepared
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(bundle.model, algorithm, images, labels, ctx, optimizer, cfg.train)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prepared = {label: prepare(algo, overrides, args.batch) for label, algo, overrides in SETTINGS}
    for label in prepared:  # warm-up: allocator and kernels
        time_steps(prepared[label], 3)
    times: dict[str, list[float]] = {label: [] for label in prepared}
    for _ in range(args.passes):  # interleaved, so drift of the machine touches every setting alike
        for label in prepared:
            times[label] += time_steps(prepared[label], args.steps)
    rows = []
    base = {}
    for label, algo, _ in SETTINGS:
        median = statistics.median(times[label])
        base.setdefault(algo, median)
        image_only = statistics.median(times["fedavg, image LoRA"])
        rows.append({"setting": label, "trainable": prepared[label][-1], "median_step_ms": 1000 * median,
                     "vs_image_only_same_method": median / base[algo], "vs_fedavg_image_lora": median / image_only})
    out = {"batch": args.batch, "classes": len(CLASSES), "threads": args.threads,
           "steps_per_setting": args.steps * args.passes, "model": "builtin:tiny-clip", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_side_cost.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Training step with a text side that trains (builtin:tiny-clip, batch {args.batch}, "
             f"{len(CLASSES)} classes, {args.threads} threads, median of {args.steps * args.passes} steps)", "",
             "| setting | trainable | median step ms | x image-only (same method) | x fedavg image LoRA |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['trainable']:,} | {r['median_step_ms']:.1f} | "
              f"{r['vs_image_only_same_method']:.2f} | {r['vs_fedavg_image_lora']:.2f} |" for r in rows]
    (RESULTS / "text_side_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
