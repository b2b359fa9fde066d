"""What training costs on a CPU: step time, memory, runner overhead, FLOP/s, precision, caching.

One invocation measures, side by side (issue 7):

1. steps      the time of one training step (`train_step`, forward + backward + optimiser) of
              every training algorithm on the same batch, for the built-in model and for
              ViT-B/32 and ViT-B/16 CLIPs with random weights, at the runtime's defaults (fp32,
              checkpointing auto); ms/step, images/s, ratio to fedavg, peak memory.
2. overhead   the runner's share of a round's wall time (everything but forward, backward and
              optimiser steps) in the built-in default federation, from rounds.csv.
3. flops      achieved FLOP/s of a ViT-B/16 fedlrm step (FlopCounterMode / step time) against
              a plain matmul of the same shape, fp32 and bf16 autocast.
4. precision  fp32 vs bf16 autocast, activation checkpointing on and off, ViT-B/16: step time
              and peak memory of fedlrm and fedavg.
5. prefix     frozen-prefix caching: one client's local training with adapters on the top third
              of the blocks, cache on vs off (time, speed-up, identical results); and what
              activation checkpointing costs on the built-in model.

    python benchmarks/cost.py                  # everything (20-25 min on 2 idle cores); results/cost.{json,md}
    python benchmarks/cost.py --quick          # smoke test, tiny settings; results/cost-quick.{json,md}
    python benchmarks/cost.py --only overhead  # one section; results/cost-overhead.{json,md}
    python benchmarks/cost.py --steps 30 --vit-steps 5 --threads 2 --out /tmp/cost

Each measurement runs in its own process, one after the other, so that the peak memory
it reports is its own. Timings are only meaningful on an otherwise idle machine: the share of
the CPU other processes used during the run is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cost_report import write_report
from harness import Children, CpuWatch, child_main, machine_info, on_off, peak_kib, reset_peak, rss_kib

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("steps", "overhead", "flops", "precision", "prefix")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TARGET_OVERHEAD, TARGET_GIB, TARGET_SPEEDUP, TARGET_FEDLRM_RATIO = 0.05, 5.0, 2.0, 1.15


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Arch:
    name: str
    patch: int | None  # None: the built-in model
    layers: int = 12
    text_layers: int = 12
    warmup: int = 1
    steps: int = 3


@dataclass
class Plan:
    quick: bool
    threads: int
    batch: int
    archs: dict[str, Arch]
    rounds: int
    overhead_overrides: list[str]
    prefix: dict[str, tuple[int, int]]  # arch -> (images, local epochs)
    matmul_reps: int
    sections: list[str] = field(default_factory=list)
    profile: bool = False


def make_plan(args) -> Plan:
    """Full-size settings, or tiny ones for a smoke test (2-block ViTs, batch 8)."""
    if args.quick:
        archs = {"small": Arch("small", None, layers=4, text_layers=0, warmup=1, steps=2),
                 "ViT-B/32": Arch("ViT-B/32", 32, layers=2, text_layers=1, warmup=1, steps=2),
                 "ViT-B/16": Arch("ViT-B/16", 16, layers=2, text_layers=1, warmup=1, steps=2)}
        return Plan(quick=True, threads=args.threads, batch=8, archs=archs, rounds=1,
                    overhead_overrides=["train.local_epochs=2"], prefix={"small": (32, 3), "ViT-B/16": (8, 2)},
                    matmul_reps=3)
    # ViT steps take seconds each on 2 cores: few of them, one warm-up (the first step pays
    # for kernel selection and allocator growth)
    archs = {"small": Arch("small", None, layers=4, text_layers=0, warmup=3, steps=args.steps),
             "ViT-B/32": Arch("ViT-B/32", 32, warmup=1, steps=args.vit_steps),
             "ViT-B/16": Arch("ViT-B/16", 16, warmup=1, steps=args.vit_steps)}
    # local training for caching: 10 epochs of 128 images on the small model; ViT-B/16 gets 4
    # epochs of 32 images (one batch) to stay at a couple of minutes
    return Plan(quick=False, threads=args.threads, batch=32, archs=archs, rounds=args.rounds, overhead_overrides=[],
                prefix={"small": (128, 10), "ViT-B/16": (32, 10)}, matmul_reps=10)


# ------------------------------------------------------------------------------ child: models
def make_model_dir(spec: dict) -> dict:
    """A CLIPModel with the OpenAI ViT-B vision tower (random weights) saved like a checkpoint,
    with the built-in model's word-level tokenizer and a 224-pixel image processor."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from fedlrm.models.backbone import resolve_name

    builtin = resolve_name("builtin:tiny-clip")
    tiny_text = json.loads(Path(builtin, "config.json").read_text())["text_config"]
    torch.manual_seed(0)
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=spec["text_layers"],
                num_attention_heads=8, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                **{k: tiny_text[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")})
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": spec["layers"],
              "num_attention_heads": 12, "image_size": 224, "patch_size": spec["patch"], "hidden_act": "quick_gelu"}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(spec["dir"])
    AutoTokenizer.from_pretrained(builtin).save_pretrained(spec["dir"])
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(spec["dir"])
    return {"dir": spec["dir"]}


# ------------------------------------------------------------------------- child: one method
def setup_client(spec: dict):
    """The model of client 0 as the runtime prepares it for a typical training round: server
    state, private weights, the method's example message (FedLEASE's comes after clustering),
    `load_client`. Returns the config, the algorithm, the model bundle and the round context."""
    import torch

    from fedlrm.algorithms import get_algorithm, load_config
    from fedlrm.federation.server import Server
    from fedlrm.federation.task import build_model, initial_private, load_client
    from fedlrm.models import load_backbone

    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, [f"algorithm={spec['algorithm']}", f"model.name={spec['model']}", *spec["overrides"]])
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), CLASSES, cfg, algorithm)
    server_state = Server(cfg, algorithm, bundle, cfg.data.num_clients, progress=False).initial_state()
    private = initial_private(bundle, algorithm, cfg, 0)
    message = algorithm.example_message(server_state, private, 0)
    ctx = load_client(bundle, algorithm, cfg, 0, private, message, 1)
    return cfg, algorithm, bundle, ctx


def fixed_batch(bundle, batch: int):
    """The same random images of the model's input size, and labels, for every method."""
    import torch

    size = bundle.model.backbone.image_encoder.config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    return images, torch.randint(0, len(CLASSES), (batch,), generator=generator)


def describe(cfg, bundle) -> dict:
    """What trains, read off the model: parameter counts, the experts of an adapted layer and,
    where not every adapted block trains (F3OCUS's selection), which blocks do."""
    from fedlrm.adapters import adapted_layers, adapter_parameters, block_index

    params = adapter_parameters(bundle.model)
    info = {"trainable_params": sum(p.numel() for p in params.values() if p.requires_grad),
            "adapter_params": sum(p.numel() for p in params.values()), **checkpointing_info(bundle, cfg)}
    notes = []
    _, layer = next(adapted_layers(bundle.model))
    if len(layer.experts) > 2:
        notes.append(f"{len(layer.experts)} experts and a {type(layer.mixer).__name__} per adapted layer")
    adapted = sorted({block_index(k) for k in params})
    trained = sorted({block_index(k) for k, p in params.items() if p.requires_grad})
    if trained != adapted:
        notes.append(f"blocks {trained} of {adapted} train")
    if notes:
        info["note"] = "; ".join(notes)
    return info


def checkpointing_info(bundle, cfg) -> dict:
    """Whether this step checkpoints, what the default (auto) would choose, and the activation
    estimate auto decides on (to compare with the measured increment without checkpointing)."""
    from dataclasses import replace

    from fedlrm.federation.task import use_activation_checkpointing

    backbone = bundle.model.backbone
    estimate = backbone.activation_bytes(cfg.train.batch_size)
    layers = cfg.model.target_layers
    blocks = backbone.blocks() or []
    # what the model really does (HF layers carry the flag), not a recomputation of the rule
    actual = any(getattr(block, "gradient_checkpointing", False) for block in blocks)
    return {"checkpointing": actual,
            "auto_checkpointing": use_activation_checkpointing(
                backbone, replace(cfg.train, activation_checkpointing=None), layers),
            "activation_estimate_mib": None if estimate is None else estimate / 2**20}


def flop_mapping() -> dict:
    """FLOP formulas for CPU flash attention, which FlopCounterMode does not count by itself."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def step_child(spec: dict) -> dict:
    """Median time and peak memory of `train_step` on one fixed batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedlrm.adapters import adapter_parameters
    from fedlrm.federation.task import make_optimizer, train_step

    t0 = time.perf_counter()
    cfg, algorithm, bundle, ctx = setup_client(spec)
    model = bundle.model
    images, labels = fixed_batch(bundle, spec["batch"])
    optimizer = make_optimizer([p for p in adapter_parameters(model).values() if p.requires_grad], cfg.train)
    model.train()
    setup_s, setup_peak, before = time.perf_counter() - t0, peak_kib(), rss_kib()
    was_reset = reset_peak()
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        train_step(model, algorithm, images, labels, ctx, optimizer, cfg.train)
        times.append(time.perf_counter() - start)
    peak = peak_kib()
    result = {**describe(cfg, bundle), "setup_s": setup_s, "step_s": times[spec["warmup"]:],
              "warmup_s": times[:spec["warmup"]], "median_step_s": statistics.median(times[spec["warmup"]:]),
              "rss_before_train_mib": before / 1024, "setup_peak_mib": setup_peak / 1024,
              "train_peak_mib": peak / 1024, "peak_reset": was_reset,
              "process_peak_mib": max(peak, setup_peak) / 1024, "train_increment_mib": (peak - before) / 1024}
    if spec.get("flops"):  # counted after the memory reading: the counter holds its own records
        with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
            train_step(model, algorithm, images, labels, ctx, optimizer, cfg.train)
        result["flops"] = counter.get_total_flops()
    return result


# ------------------------------------------------------------------------ child: matmul peak
def matmul_child(spec: dict) -> dict:
    """FLOP/s torch reaches on one plain matmul of a ViT MLP's shape, fp32 and bf16."""
    import torch

    torch.set_num_threads(spec["threads"])
    m, k, n = spec["shape"]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        times = []
        for _ in range(spec["reps"] + 2):  # two warm-up calls (oneDNN picks and caches its kernel)
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[2:])
        out[name] = {"median_s": seconds, "flop_per_s": 2 * m * k * n / seconds}
    return out


# ---------------------------------------------------------------------- child: local training
def prefix_child(spec: dict) -> dict:
    """One client's local training (`train_locally`) on fixed random images; the trained
    adapter weights go to a file for the parent to compare across cache settings."""
    import torch

    from fedlrm.adapters import get_state
    from fedlrm.data.imageset import ImageSet
    from fedlrm.federation.task import train_locally

    cfg, algorithm, bundle, ctx = setup_client(spec)
    model = bundle.model
    images, labels = fixed_batch(bundle, spec["images"])
    warm_up(model, images[:8], labels[:8])
    train_set = ImageSet.from_tensors(images, labels)
    start = time.perf_counter()
    stats = train_locally(model, algorithm, train_set, ctx, cfg)
    wall = time.perf_counter() - start
    torch.save(get_state(model), spec["state_file"])
    return {**checkpointing_info(bundle, cfg), "wall_s": wall, "loss": stats.loss, "steps": stats.steps,
            "train_seconds": stats.seconds,
            "compute_seconds": stats.compute_seconds, "cached_from_block": stats.cached_from_block,
            "images": len(train_set), "epochs": cfg.train.local_epochs}


def warm_up(model, images, labels) -> None:
    """A forward and backward that leave the weights as they are, so that neither setting pays
    the process's first-call costs (kernel selection, allocator growth) inside the timing."""
    import torch.nn.functional as F

    model.train()
    F.cross_entropy(model(images), labels).backward()
    for p in model.parameters():
        p.grad = None


# ------------------------------------------------------------------------ child: federation
def overhead_child(spec: dict) -> dict:
    """The built-in default federation in-process; rounds.csv's compute and overhead per round.
    If the overhead is above target, one more run under cProfile breaks it down."""
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import run_experiment

    base = ["algorithm=fedlrm", "data.source=builtin", f"train.rounds={spec['rounds']}",
            f"train.threads={spec['threads']}", f"output_dir={spec['work']}", *spec["overrides"]]
    start = time.perf_counter()
    result = run_experiment(load_config(None, [*base, "name=overhead"]), progress=False)
    total = time.perf_counter() - start
    # the rows rounds.csv is written from
    rows = [{k: float(r[k]) for k in ("round", "wall_seconds", "compute_seconds", "overhead_share", "train_seconds")}
            for r in result.round_rows]
    shown = [o for o in base if not o.startswith("output_dir=")]  # a temporary directory
    out = {"config": shown, "rounds": rows, "run_s": total,
           "mean_overhead_share": statistics.mean(r["overhead_share"] for r in rows)}
    if out["mean_overhead_share"] > TARGET_OVERHEAD or spec.get("profile"):
        out["profile"] = profile_rounds(load_config(None, [*base, "name=profiled"]))
    return out


# (label, file suffix, function) of the runner's parts that cProfile can see
PROFILE_ITEMS = [
    ("local-training loop outside the steps (data batching, lr, bookkeeping)", "federation/task.py", "train_locally"),
    ("data batching (ImageSet.batches)", "data/imageset.py", "batches"),
    ("load_client (adapters, private state, receive)", "federation/task.py", "load_client"),
    ("initial_private", "federation/task.py", "initial_private"),
    ("message encode (safetensors)", "federation/wire.py", "encode"),
    ("message decode (safetensors)", "federation/wire.py", "decode"),
    ("upload checks (Server.accept)", "federation/server.py", "accept"),
    ("aggregation (Server.aggregate)", "federation/server.py", "aggregate"),
    ("checkpoint writing (save_checkpoint)", "federation/checkpoint.py", "save_checkpoint"),
    ("evaluation outside its forward passes", "federation/task.py", "evaluate"),
    ("rest of client_round (message decode, upload, report, encode)", "federation/task.py", "client_round"),
    ("optimiser construction (make_optimizer)", "federation/task.py", "make_optimizer"),
]


def profile_rounds(cfg) -> dict:
    """cProfile of `Simulation.run` (the rounds only, not start-up); cumulative seconds of the
    runner's parts, which nest and overlap (e.g. decode inside accept)."""
    import cProfile
    import pstats

    from fedlrm.federation.rundir import new_run_dir
    from fedlrm.federation.simulation import Simulation

    sim = Simulation(cfg, progress=False)
    run_dir = new_run_dir(cfg)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    sim.run(run_dir)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    steps = cumulative(stats, "federation/task.py", "train_step")
    eval_forward = edge(stats, "federation/task.py", "evaluate", "torch/nn/modules/module.py", "_wrapped_call_impl")
    items = {}
    for label, path, name in PROFILE_ITEMS:
        seconds = cumulative(stats, path, name)
        if name == "train_locally":
            seconds -= edge(stats, path, name, path, "train_step")
        elif name == "evaluate":
            seconds -= eval_forward
        elif name == "client_round":
            seconds -= cumulative(stats, path, "train_locally") + edge(stats, path, name, path, "load_client")
        items[label] = seconds
    return {"wall_s": wall, "train_steps_s": steps, "eval_forward_s": eval_forward,
            "overhead_s": wall - steps - eval_forward, "items_s": dict(sorted(items.items(), key=lambda kv: -kv[1])),
            "note": "cProfile slows Python-level code more than kernels: these shares overstate the runner's"}


def _key(stats, path: str, name: str):
    return next((k for k in stats if k[0].endswith(path) and k[2] == name), None)


def cumulative(stats, path: str, name: str) -> float:
    key = _key(stats, path, name)
    return stats[key][3] if key else 0.0


def edge(stats, caller_path: str, caller: str, callee_path: str, callee: str) -> float:
    """Cumulative seconds of `callee` when called directly from `caller`."""
    caller_key, callee_key = _key(stats, caller_path, caller), _key(stats, callee_path, callee)
    if caller_key is None or callee_key is None:
        return 0.0
    return stats[callee_key][4].get(caller_key, (0, 0, 0, 0.0))[3]


CHILDREN = {"model": make_model_dir, "step": step_child, "matmul": matmul_child, "prefix": prefix_child,
            "overhead": overhead_child}


# ---------------------------------------------------------------------------------- parent
class Runner:
    """The measurements of this plan, each in a child process (sections that need the same
    measurement, e.g. ViT-B/16 fedlrm fp32, share one)."""

    def __init__(self, plan: Plan, work: Path):
        self.plan, self.work = plan, work
        self.children = Children(__file__)
        self.models: dict[str, str] = {}

    def run(self, spec: dict, label: str) -> dict:
        return self.children.run(spec, label)

    def model(self, arch: str) -> str:
        """model.name for an architecture; the ViT checkpoints are written once per run."""
        a = self.plan.archs[arch]
        if a.patch is None:
            return "builtin:tiny-clip"
        if arch not in self.models:
            path = str(self.work / arch.replace("/", "-"))
            self.run({"kind": "model", "dir": path, "patch": a.patch, "layers": a.layers,
                      "text_layers": a.text_layers}, f"writing the {arch} checkpoint")
            self.models[arch] = path
        return self.models[arch]

    def step(self, arch: str, algorithm: str, precision: str = "fp32", checkpointing: bool | None = None) -> dict:
        """A step measurement; `checkpointing` None is the runtime's default (auto)."""
        if checkpointing is not None:
            auto = self.children.known(self._step_spec(arch, algorithm, precision, None))
            if auto and auto.get("checkpointing") == checkpointing:
                return auto  # the default already chose this setting: the same measurement
        ckpt = {None: "ckpt auto", True: "ckpt on", False: "ckpt off"}[checkpointing]
        return self.run(self._step_spec(arch, algorithm, precision, checkpointing),
                        f"{arch} {algorithm} {precision} {ckpt}")

    def _step_spec(self, arch: str, algorithm: str, precision: str, checkpointing: bool | None) -> dict:
        a = self.plan.archs[arch]
        # FLOPs are counted where section 3 needs them, so sections 1, 3 and 4 share children;
        # only in fp32: autocast runs the same operations (in bf16), so the count is the same
        spec = {"kind": "step", "model": self.model(arch), "algorithm": algorithm, "batch": self.plan.batch,
                "warmup": a.warmup, "steps": a.steps, "threads": self.plan.threads,
                "flops": arch == "ViT-B/16" and algorithm == "fedlrm" and precision == "fp32",
                # the batch size also sets what auto checkpointing chooses
                "overrides": [f"train.precision={precision}", f"train.batch_size={self.plan.batch}"]}
        if checkpointing is not None:
            spec["overrides"].append(f"train.activation_checkpointing={checkpointing}")
        return spec


def top_third(n_blocks: int) -> list[int]:
    k = max(1, round(n_blocks / 3))
    return list(range(n_blocks - k, n_blocks))


def training_algorithms() -> tuple[list[str], dict[str, str]]:
    from fedlrm.algorithms import ALGORITHMS

    trained = [n for n, cls in ALGORITHMS.items() if cls.trains]
    excluded = {n: "does not train (no adapters, no training step)" for n, cls in ALGORITHMS.items() if not cls.trains}
    return trained, excluded


def section_steps(runner: Runner) -> dict:
    trained, excluded = training_algorithms()
    out = {"excluded": excluded, "batch": runner.plan.batch, "by_arch": {}}
    for arch in runner.plan.archs:
        rows = {name: runner.step(arch, name) for name in trained}
        base = rows["fedavg"].get("median_step_s")
        for row in rows.values():
            if "median_step_s" in row:
                row["ms_per_step"] = 1000 * row["median_step_s"]
                row["images_per_s"] = runner.plan.batch / row["median_step_s"]
                row["vs_fedavg"] = row["median_step_s"] / base if base else None
                # how far apart the timed steps are: a large spread means a disturbed machine
                row["spread"] = (max(row["step_s"]) - min(row["step_s"])) / row["median_step_s"]
        out["by_arch"][arch] = rows
    return out


def section_overhead(runner: Runner) -> dict:
    work = runner.work / "overhead"
    spec = {"kind": "overhead", "rounds": runner.plan.rounds, "threads": runner.plan.threads, "work": str(work),
            "overrides": runner.plan.overhead_overrides, "profile": runner.plan.profile}
    return runner.run(spec, f"built-in federation, {runner.plan.rounds} rounds")


def section_flops(runner: Runner) -> dict:
    p = runner.plan
    tokens = (224 // p.archs["ViT-B/16"].patch) ** 2 + 1
    shape = [p.batch * tokens, 768, 3072]
    matmul = runner.run({"kind": "matmul", "shape": shape, "reps": p.matmul_reps, "threads": p.threads},
                        f"matmul {shape}")
    out = {"matmul_shape": shape, "matmul": matmul, "settings": {}}
    for precision in ("fp32", "bf16"):
        for ckpt in (True, False):
            counted = runner.step("ViT-B/16", "fedlrm", "fp32", ckpt).get("flops")
            r = runner.step("ViT-B/16", "fedlrm", precision, ckpt)
            out["settings"][f"{precision}, ckpt {'on' if ckpt else 'off'}"] = flop_rates(r, counted, matmul.get(precision))
    return out


def flop_rates(step: dict, flops: int | None, matmul: dict | None) -> dict:
    if "median_step_s" not in step or not flops or not matmul:
        return {"error": step.get("error", "not measured")}
    rate = flops / step["median_step_s"]
    return {"gflop_per_step": flops / 1e9, "step_s": step["median_step_s"], "gflop_per_s": rate / 1e9,
            "matmul_gflop_per_s": matmul["flop_per_s"] / 1e9, "fraction_of_matmul": rate / matmul["flop_per_s"]}


def section_precision(runner: Runner) -> dict:
    out = {}
    for algorithm in ("fedlrm", "fedavg"):
        for precision in ("fp32", "bf16"):
            for ckpt in (True, False):
                r = runner.step("ViT-B/16", algorithm, precision, ckpt)
                out[f"{algorithm}, {precision}, ckpt {'on' if ckpt else 'off'}"] = r
    return out


def section_prefix(runner: Runner) -> dict:
    out = {"caching": {}, "checkpointing_small": {}}
    for arch, (images, epochs) in runner.plan.prefix.items():
        out["caching"][arch] = caching_pair(runner, arch, images, epochs)
    for algorithm in ("fedlrm", "fedavg"):
        on, off = runner.step("small", algorithm, checkpointing=True), runner.step("small", algorithm, checkpointing=False)
        if "median_step_s" in on and "median_step_s" in off:
            out["checkpointing_small"][algorithm] = {
                "on_ms": 1000 * on["median_step_s"], "off_ms": 1000 * off["median_step_s"],
                "cost": on["median_step_s"] / off["median_step_s"] - 1,
                "on_increment_mib": on["train_increment_mib"], "off_increment_mib": off["train_increment_mib"],
                "auto": on["auto_checkpointing"], "estimate_mib": on["activation_estimate_mib"]}
    return out


def caching_pair(runner: Runner, arch: str, images: int, epochs: int) -> dict:
    """Local training with the frozen-prefix cache on and off; same seed, data and model."""
    import torch

    layers = top_third(runner.plan.archs[arch].layers)
    runs, files = {}, {}
    for cache in ("on", "off"):
        files[cache] = str(runner.work / f"prefix-{arch.replace('/', '-')}-{cache}.pt")
        spec = {"kind": "prefix", "model": runner.model(arch), "algorithm": "fedlrm", "images": images,
                "threads": runner.plan.threads, "state_file": files[cache],
                "overrides": [f"model.target_layers=[{','.join(map(str, layers))}]", f"train.local_epochs={epochs}",
                              f"train.cache_frozen_features={cache == 'on'}"]}
        runs[cache] = runner.run(spec, f"{arch} local training, cache {cache}")
    out = {"target_layers": layers, "images": images, "epochs": epochs, **runs}
    if "error" in runs["on"] or "error" in runs["off"]:
        return out
    a, b = torch.load(files["on"]), torch.load(files["off"])
    out["speedup"] = runs["off"]["wall_s"] / runs["on"]["wall_s"]
    out["weights_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out["max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else None
    out["loss_equal"] = runs["on"]["loss"] == runs["off"]["loss"]
    return out


SECTION_FUNCS = {"steps": section_steps, "overhead": section_overhead, "flops": section_flops,
                 "precision": section_precision, "prefix": section_prefix}


# ---------------------------------------------------------------------------------- targets
def verdict(what: str, met: bool, value: str, miss: str) -> str:
    return f"target {what}: " + (f"met ({value})" if met else f"missed by {miss} ({value})")


def target_lines(results: dict) -> list[str]:
    lines = [fedlrm_step_target(results.get("steps")), overhead_target(results.get("overhead")),
             memory_target(results)]
    caching = (results.get("prefix") or {}).get("caching")
    lines += caching_targets(caching)
    return lines


def fedlrm_step_target(steps: dict | None) -> str:
    what = f"a fedlrm training step costs <= {TARGET_FEDLRM_RATIO:g}x a fedavg step on the same batch"
    ratios = {arch: rows.get("fedlrm", {}).get("vs_fedavg") for arch, rows in ((steps or {}).get("by_arch") or {}).items()}
    ratios = {arch: r for arch, r in ratios.items() if r is not None}
    if not ratios:
        return f"target {what}: not measured in this run"
    parts = [f"{arch}: " + ("met" if r <= TARGET_FEDLRM_RATIO else f"missed by {r - TARGET_FEDLRM_RATIO:.2f}x")
             + f" ({r:.2f}x)" for arch, r in ratios.items()]
    return f"target {what}: " + "; ".join(parts)


def overhead_target(overhead: dict | None) -> str:
    what = f"runner overhead <= {TARGET_OVERHEAD:.0%} of a round"
    if not overhead or "mean_overhead_share" not in overhead:
        return f"target {what}: not measured in this run"
    share = overhead["mean_overhead_share"]
    return verdict(what, share <= TARGET_OVERHEAD, f"mean {share:.1%} over {len(overhead['rounds'])} rounds",
                   f"{100 * (share - TARGET_OVERHEAD):.1f} percentage points")


def vit16_peaks(results: dict) -> dict[str, float]:
    """Process peak RSS (GiB) of every ViT-B/16 step measured, by setting."""
    peaks = {}
    steps = ((results.get("steps") or {}).get("by_arch") or {}).get("ViT-B/16", {})
    for name, r in steps.items():
        if "process_peak_mib" in r:
            peaks[f"{name}, fp32, ckpt {on_off(r['checkpointing'])}"] = r["process_peak_mib"] / 1024
    for name, r in (results.get("precision") or {}).items():
        if "process_peak_mib" in r:
            peaks[name] = r["process_peak_mib"] / 1024
    return peaks


def memory_target(results: dict) -> str:
    what = f"ViT-B/16 training step at batch {results['plan']['batch']} in <= {TARGET_GIB:g} GiB (process peak RSS)"
    peaks = vit16_peaks(results)
    if not peaks:
        return f"target {what}: not measured in this run"
    largest = max(peaks, key=peaks.get)
    missed = [f"{k} (by {v - TARGET_GIB:.2f} GiB)" for k, v in peaks.items() if v > TARGET_GIB]
    if not missed:
        return f"target {what}: met by all {len(peaks)} settings measured (largest: {largest}, {peaks[largest]:.2f} GiB)"
    met = [f"{k} ({v:.2f} GiB)" for k, v in peaks.items() if v <= TARGET_GIB]
    return f"target {what}: met by {', '.join(met) if met else 'no setting'}; missed by {', '.join(missed)}"


def caching_targets(caching: dict | None) -> list[str]:
    speed = f"frozen-prefix caching speeds up local training >= {TARGET_SPEEDUP:g}x"
    exact = "frozen-prefix caching leaves the results identical"
    if not caching:
        return [f"target {speed}: not measured in this run", f"target {exact}: not measured in this run"]
    speeds, same = [], []
    for arch, c in caching.items():
        if "speedup" not in c:
            speeds.append(f"{arch}: failed ({c.get('on', {}).get('error') or c.get('off', {}).get('error')})")
            continue
        s = c["speedup"]
        speeds.append(f"{arch}: " + ("met" if s >= TARGET_SPEEDUP else f"missed by {TARGET_SPEEDUP - s:.2f}x")
                      + f" ({s:.2f}x)")
        same.append(f"{arch}: " + ("met (weights equal, loss equal)" if c["weights_equal"] and c["loss_equal"] else
                                   f"missed by max |diff| {c['max_abs_diff']:.3g} (loss equal: {c['loss_equal']})"))
    return [f"target {speed}: " + "; ".join(speeds), f"target {exact}: " + "; ".join(same)]


# ---------------------------------------------------------------------------------- main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (2-block ViTs, batch 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method, small model (default 20)")
    parser.add_argument("--vit-steps", type=int, default=3, help="timed steps per method, ViT-B models (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the overhead federation (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument("--profile", action="store_true",
                        help="break the runner overhead down with cProfile even if it meets its target")
    parser.add_argument("--out", help="results file stem (default results/cost, cost-quick or cost-<section>)")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: replace that section in the existing results (default results/cost) "
                             "and note the rerun in the report, instead of writing a file of its own")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in its own process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child, CHILDREN)
        return
    plan = make_plan(args)
    plan.sections = [args.only] if args.only else list(SECTIONS)
    plan.profile = args.profile
    stem = "cost" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only and not args.merge else "")
    out = Path(args.out) if args.out else RESULTS / stem
    command = " ".join(["python", "benchmarks/cost.py", *sys.argv[1:]])
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.merge:
        if not args.only or not out.with_suffix(".json").is_file():
            raise SystemExit(f"--merge needs --only and an earlier full run in {out.with_suffix('.json')}")
        merged = json.loads(out.with_suffix(".json").read_text())
        with CpuWatch() as cpu, tempfile.TemporaryDirectory(prefix="fedlrm-cost-") as work:
            merged[args.only] = SECTION_FUNCS[args.only](Runner(plan, Path(work)))
        merged.setdefault("reruns", []).append({"section": args.only, "command": command, "started": started,
                                                "seconds": cpu.seconds, "others_share": cpu.others_share})
        merged["targets"] = target_lines(merged)
        write_report(merged, plan, out, TARGET_GIB)
        return
    results = {"command": command, "plan": asdict(plan), "machine": machine_info(plan.threads), "started": started}
    with CpuWatch() as cpu, tempfile.TemporaryDirectory(prefix="fedlrm-cost-") as work:
        runner = Runner(plan, Path(work))
        for name in plan.sections:
            results[name] = SECTION_FUNCS[name](runner)
    results["seconds"] = cpu.seconds
    results["cpu_use"] = {"others_cpu_s": cpu.others_cpu_s, "others_share": cpu.others_share}
    results["load_average"] = {"before": cpu.load_before, "after": cpu.load_after}
    results["targets"] = target_lines(results)
    write_report(results, plan, out, TARGET_GIB)


if __name__ == "__main__":
    main()
